"""The evaluate CLI on a few real faces (its library: test_metrics_scoring, test_metrics_reports)."""

import json

import cv2
import numpy as np
from PIL import Image
import pytest

from idm_jax import score
from idm_jax.metrics import fidelity
from idm_jax.metrics import identity


@pytest.fixture(scope='module')
def folders(tmp_path_factory, celeba_dir):
  """gt/ (JPEG), pred/ (blurred PNG), lq/ (32 px PNG) for 3 faces, matched by stem."""
  root = tmp_path_factory.mktemp('eval')
  for sub in ('gt', 'pred', 'lq'):
    (root / sub).mkdir()
  for path in sorted(celeba_dir.glob('*.jpg'))[:3]:
    img = np.asarray(Image.open(path).convert('RGB'))
    Image.fromarray(img).save(root / 'gt' / path.name, quality=95)
    Image.fromarray(cv2.GaussianBlur(img, (0, 0), 1.5)).save(root / 'pred' / f'{path.stem}.png')
    lq = cv2.resize(img, (32, 32), interpolation=cv2.INTER_AREA)
    Image.fromarray(lq).save(root / 'lq' / f'{path.stem}.png')
  return root


def _read(folder):
  return [np.asarray(Image.open(p).convert('RGB')) for p in sorted(folder.iterdir())]


def test_cli_writes_report(folders, niqe_params_path, tmp_path):
  before = sorted(p.name for p in (folders / 'gt').iterdir())
  out = tmp_path / 'report'
  rc = score.main(
    [
      '--pred',
      str(folders / 'pred'),
      '--gt',
      str(folders / 'gt'),
      '--lq',
      str(folders / 'lq'),
      '--niqe_params',
      str(niqe_params_path),
      '--niqe_upscale',
      '2',
      '--out',
      str(out),
      '--title',
      'blur test',
    ]
  )
  assert rc == 0
  report = json.loads((out / 'metrics.json').read_text())
  m = report['metrics']
  assert report['num_images'] == 3 and len(report['names']) == 3
  want_psnr = np.mean(
    [fidelity.psnr(p, g) for p, g in zip(_read(folders / 'pred'), _read(folders / 'gt'))]
  )
  assert m['psnr']['mean'] == pytest.approx(want_psnr)
  assert len(m['ssim_y']['per_image']) == 3 and 0.5 < m['ssim_y']['mean'] < 1
  assert m['consistency']['mean'] > 25  # a blur of the HQ agrees with its area-downsampled LQ
  assert m['niqe']['upscale'] == 2 and 3 < m['niqe']['mean'] < 20
  assert m['lpips']['mean'] is None and 'lpips_weights' in m['lpips']['reason']
  if identity.unavailable_reason() is None:
    assert 0.95 < m['identity']['mean'] <= 1 and m['identity']['fallbacks'] == 0
  else:
    assert m['identity']['mean'] is None and m['identity']['reason']
  md = (out / 'metrics.md').read_text()
  assert '# blur test' in md and 'NIQE (2x Lanczos upscale)' in md and '| PSNR (RGB, dB)' in md
  assert sorted(p.name for p in (folders / 'gt').iterdir()) == before
  # --lq: each metric's per-image difference against the LQ (bicubic-upsampled to 128 px).
  lq_big = [
    np.asarray(Image.fromarray(l).resize((128, 128), Image.BICUBIC)) for l in _read(folders / 'lq')
  ]
  lq_psnr = [fidelity.psnr(l, g) for l, g in zip(lq_big, _read(folders / 'gt'))]
  d = report['delta']
  assert d['reference'] == 'LQ input'
  assert d['metrics']['psnr']['mean'] == pytest.approx(want_psnr - np.mean(lq_psnr))
  assert d['metrics']['psnr']['low'] <= d['metrics']['psnr']['mean'] <= d['metrics']['psnr']['high']
  assert d['metrics']['psnr']['n'] == 3 and 'consistency' not in d['metrics']
  assert 'Per-image difference against LQ input' in md and 'paired-bootstrap 95%' in md


@pytest.mark.parametrize(
  'problem, message',
  [
    ('missing', 'have no --gt file'),
    ('size', 'size mismatch'),
    ('unreadable', 'cannot read image'),
    ('out_in_gt', 'inside --gt'),
  ],
)
def test_cli_errors_name_the_problem(folders, tmp_path, capsys, problem, message):
  gt = tmp_path / 'gt'
  gt.mkdir()
  for p in (folders / 'gt').iterdir():
    gt.joinpath(p.name).write_bytes(p.read_bytes())
  victim = sorted(gt.iterdir())[0]
  out = tmp_path / 'out'
  if problem == 'missing':
    victim.unlink()
  elif problem == 'size':
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(victim)
  elif problem == 'unreadable':
    victim.write_bytes(b'not an image')
  else:
    out = gt / 'report'
  rc = score.main(
    ['--pred', str(folders / 'pred'), '--gt', str(gt), '--out', str(out), '--no_identity']
  )
  err = capsys.readouterr().err
  assert rc == 2 and message in err
  if problem != 'out_in_gt':
    assert victim.stem in err
  assert not (out / 'metrics.json').exists()


def test_cli_reads_and_writes_a_bucket_as_it_does_a_local_folder(
  folders, tmp_path, gcs_bucket, capsys
):
  """--pred/--gt/--lq and --out in a bucket: the same report as from the local folders."""
  from idm_jax.storage import files

  for rel in files.walk_files(folders):
    files.copy_file(folders / rel, files.join(gcs_bucket, 'data', rel))
  common = ['--no_identity', '--title', 'bucket test']
  local = tmp_path / 'report'
  assert (
    score.main(
      [
        '--pred',
        str(folders / 'pred'),
        '--gt',
        str(folders / 'gt'),
        '--lq',
        str(folders / 'lq'),
        '--out',
        str(local),
        *common,
      ]
    )
    == 0
  )
  printed_local = capsys.readouterr().out
  data, out = f'{gcs_bucket}/data', f'{gcs_bucket}/eval/run1'
  assert (
    score.main(
      ['--pred', f'{data}/pred', '--gt', f'{data}/gt', '--lq', f'{data}/lq', '--out', out, *common]
    )
    == 0
  )
  assert capsys.readouterr().out == printed_local
  assert files.walk_files(out) == ['metrics.json', 'metrics.md']
  for name in ('metrics.json', 'metrics.md'):
    assert files.read_text(files.join(out, name)) == (local / name).read_text()
  report = json.loads(files.read_text(files.join(out, 'metrics.json')))
  assert report['num_images'] == 3 and report['metrics']['psnr']['mean'] > 20
  assert report['delta']['reference'] == 'LQ input'
  # --out inside an input folder of the bucket, and a missing bucket, are refused at once.
  missing = 'gs://no-such-bucket-5d1e'
  for bad_out, why in (
    (f'{data}/gt/report', 'inside --gt'),
    (f'{missing}/eval', f'{missing} does not exist'),
  ):
    assert (
      score.main(['--pred', f'{data}/pred', '--gt', f'{data}/gt', '--out', bad_out, *common]) == 2
    )
    err = capsys.readouterr().err
    assert why in err and len(err.strip().splitlines()) == 1, err
  assert files.walk_files(f'{data}/gt') == sorted(p.name for p in (folders / 'gt').iterdir())


def test_cli_scores_niqe_with_the_shipped_params_unless_overridden(tmp_path, capsys):
  from idm_jax.data import sources

  faces = tmp_path / 'faces'
  faces.mkdir()
  for i in range(2):
    Image.fromarray(sources.BuiltinSource('validation', 128)[i]['image']).save(faces / f'{i}.png')
  common = ['--pred', str(faces), '--gt', str(faces), '--no_identity', '--niqe_upscale', '2']
  assert score.main([*common, '--out', str(tmp_path / 'default')]) == 0
  report = json.loads((tmp_path / 'default' / 'metrics.json').read_text())
  # The library's score of each face (test_metrics_niqe pins the library to BasicSR's), pinned
  # here to its value so that a wrong file, upscale or colour conversion in the CLI shows.
  assert report['metrics']['niqe']['per_image'] == pytest.approx([6.3707, 6.1671], abs=2e-3)
  assert report['metrics']['niqe']['mean'] == pytest.approx(6.2689, abs=2e-3)
  missing = tmp_path / 'mine.npz'
  assert score.main([*common, '--niqe_params', str(missing), '--out', str(tmp_path / 'o')]) == 2
  assert str(missing) in capsys.readouterr().err


def test_fid_mode_without_weights_reports_niqe(folders, niqe_params_path, tmp_path):
  out = tmp_path / 'fid'
  rc = score.main(
    [
      '--fid',
      '--pred',
      str(folders / 'pred'),
      '--ref',
      str(folders / 'gt'),
      '--niqe_params',
      str(niqe_params_path),
      '--niqe_upscale',
      '2',
      '--out',
      str(out),
    ]
  )
  assert rc == 0
  m = json.loads((out / 'metrics.json').read_text())['metrics']
  assert m['fid']['mean'] is None and 'inception_weights' in m['fid']['reason']
  # Blurred faces look less natural than the originals.
  assert m['niqe']['mean'] > m['niqe_ref']['mean']
  assert m['face_rate']['mean'] == m['face_rate_ref']['mean'] == 1.0
  assert m['fd_dlib']['mean'] > 0
  with pytest.raises(SystemExit):
    score.main(['--fid', '--pred', str(folders / 'pred'), '--out', str(out)])
