"""metrics.scoring: every metric of a set of images, differences with intervals, sample sets."""

import cv2
import numpy as np
from PIL import Image
import pytest

from idm_jax.metrics import reports
from idm_jax.metrics import scoring


@pytest.fixture(scope='module')
def faces(celeba_dir):
  """(gt, pred, lq): 3 real faces, the same blurred, and 32 px downsamples of them."""
  gt = [np.asarray(Image.open(p).convert('RGB')) for p in sorted(celeba_dir.glob('*.jpg'))[:3]]
  pred = [cv2.GaussianBlur(g, (0, 0), 1.5) for g in gt]
  lq = [cv2.resize(g, (32, 32), interpolation=cv2.INTER_AREA) for g in gt]
  return gt, pred, lq


def test_library_api_no_reference_and_small_images(faces, niqe_params_path):
  pred = faces[1]
  res = scoring.evaluate_images(pred, None, niqe_params=str(niqe_params_path), progress=False)
  m = res['metrics']
  assert m['psnr']['mean'] is None and m['psnr']['reason'] == 'no ground truth given'
  assert m['niqe']['mean'] is None and '192' in m['niqe']['reason']
  with pytest.raises(ValueError, match='pred is 64x64 but gt is 128x128'):
    scoring.evaluate_images(
      [np.zeros((64, 64, 3), np.uint8)], [pred[0]], niqe_params=None, progress=False
    )


def test_deltas_of_a_table_against_its_reference_row():
  rng = np.random.default_rng(0)
  gt = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(6)]
  noisy = lambda s: [np.clip(g + rng.normal(0, s, g.shape), 0, 255).astype(np.uint8) for g in gt]
  kw = dict(niqe_params=None, identity=False, progress=False)
  rows = {
    'LQ input': scoring.evaluate_images(noisy(40), gt, **kw),
    'restored': scoring.evaluate_images(noisy(5), gt, **kw),
  }
  scoring.add_deltas(rows, 'LQ input', seed=3)
  assert 'delta' not in rows['LQ input']
  d = rows['restored']['delta']['metrics']['psnr']
  want = np.subtract(
    rows['restored']['metrics']['psnr']['per_image'],
    rows['LQ input']['metrics']['psnr']['per_image'],
  )
  assert d['mean'] == pytest.approx(want.mean()) and d['seed'] == 3
  assert d['low'] > 0 and d['excludes_zero'] and d['improved'] == 1.0
  assert reports.format_delta(d).startswith('**+')
  with pytest.raises(ValueError, match='pairs must match'):
    scoring.add_delta(rows['restored'], scoring.evaluate_images(gt[:2], gt[:2], **kw), 'x')


def test_compare_sets_scores_faces_against_noise_and_collapse(celeba_dir):
  """The offline generation scores tell varied faces from non-faces and from one repeated face."""
  paths = sorted(celeba_dir.glob('*.jpg'))[:60]
  faces = [np.asarray(Image.open(p).convert('RGB')) for p in paths]
  small = [cv2.resize(f, (32, 32), interpolation=cv2.INTER_AREA) for f in faces[:30]]
  noise = [
    np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8) for i in range(30)
  ]
  collapsed = [small[0]] * 29 + [small[1]]
  # 32 px "samples" against 128 px references: the references are brought to 32 px first.
  good, bad, same = (
    scoring.compare_sets(x, faces[30:], progress=False) for x in (small, noise, collapsed)
  )
  assert good['ref_resized_to'] == bad['ref_resized_to'] == '32x32'
  g, b, c = good['metrics'], bad['metrics'], same['metrics']
  assert g['face_rate']['mean'] >= 0.8 and b['face_rate']['mean'] == 0.0
  assert g['face_rate_ref']['mean'] == b['face_rate_ref']['mean'] >= 0.8
  assert 0 < 2 * g['fd_dlib']['mean'] < min(b['fd_dlib']['mean'], c['fd_dlib']['mean'])
  assert g['niqe']['mean'] is None and 'NIQE parameters' in g['niqe']['reason']
