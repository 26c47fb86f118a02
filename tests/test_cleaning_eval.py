"""Scoring cleaning against a known contamination: selection precision/recall, fidelity deltas."""

import json
import os

import numpy as np
from PIL import Image
import pytest

from idm_jax.data import contaminate
from idm_jax.extrinsic import cleaned_dataset
from idm_jax.extrinsic import cleaning_eval


def test_selection_scores_on_a_known_answer():
  universe = {f'{i}.png' for i in range(10)}
  truth = {'0.png', '1.png', '2.png', '3.png'}
  s = cleaning_eval.selection_scores({'0.png', '1.png', '5.png'}, truth, universe)
  assert s['precision'] == pytest.approx(2 / 3) and s['recall'] == pytest.approx(0.5)
  assert s['f1'] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
  assert s['chance_precision'] == pytest.approx(0.4) and s['true_positives'] == 2
  perfect = cleaning_eval.selection_scores(truth, truth, universe)
  assert perfect['precision'] == perfect['recall'] == perfect['f1'] == 1.0
  none = cleaning_eval.selection_scores(set(), truth, universe)
  assert none['precision'] is None and none['recall'] == 0.0
  # Names outside the universe (e.g. the validation split) do not count.
  s = cleaning_eval.selection_scores({'0.png', 'val.png'}, truth | {'val.png'}, universe)
  assert s['precision'] == 1.0 and s['recall'] == 0.25


def _cleaned_dataset(out, contaminated, pristine, chosen):
  """A cleaned dataset as extrinsic.clean_dataset lays it out: the chosen records 'cleaned' by
  an oracle (the pristine image back), the others copied from the contaminated set."""
  m = json.loads((contaminated / 'manifest.json').read_text())
  records = []
  (out / 'images').mkdir(parents=True)
  for r in m['records']:
    src = (pristine if r['file'] in chosen else contaminated) / 'images' / r['file']
    (out / 'images' / r['file']).write_bytes(src.read_bytes())
    records.append(
      dict(name=r['file'], file=r['file'], action='cleaned' if r['file'] in chosen else 'copied')
    )
  (out / cleaned_dataset.MANIFEST).write_text(json.dumps(dict(records=records, settings={})))


def _oracle_datasets(tmp_path):
  """Contaminated and pristine twins of 12 images, and an oracle cleaning of 4 of the 6
  contaminated ones and of one clean image; returns (c, p, one_clean)."""
  src = tmp_path / 'src'
  src.mkdir()
  rng = np.random.default_rng(0)
  for i in range(12):
    img = Image.fromarray(rng.integers(0, 256, (6, 6, 3)).astype(np.uint8)).resize(
      (32, 32), Image.BICUBIC
    )
    img.save(src / f'{i:02d}.png')
  c, p = tmp_path / 'c', tmp_path / 'p'
  assert (
    contaminate.main(
      [
        '--src',
        str(src),
        '--dst',
        str(c),
        '--fraction',
        '0.5',
        '--resolution',
        '32',
        '--kinds',
        'blur,noise',
      ]
    )
    == 0
  )
  assert (
    contaminate.main(['--src', str(src), '--dst', str(p), '--fraction', '0', '--resolution', '32'])
    == 0
  )
  truth = contaminate.contaminated_names(json.loads((c / 'manifest.json').read_text()))
  one_clean = sorted(set(os.listdir(c / 'images')) - truth)[0]
  chosen = set(sorted(truth)[:4]) | {one_clean}
  _cleaned_dataset(tmp_path / 'cleaned', c, p, chosen)
  return c, p, one_clean


def test_oracle_cleaning_scores_as_perfect(tmp_path):
  c, p, one_clean = _oracle_datasets(tmp_path)
  report = cleaning_eval.score(str(tmp_path / 'cleaned'), str(c), str(p), identity=False)
  assert report['selection']['precision'] == pytest.approx(4 / 5)
  assert report['selection']['recall'] == pytest.approx(4 / 6)
  moved = report['contaminated_and_cleaned']
  assert moved['after']['psnr'] == float('inf') or moved['after']['ssim'] == pytest.approx(1.0)
  assert moved['before']['ssim'] < 1.0 and moved['delta']['ssim']['mean'] > 0
  assert report['clean_but_cleaned']['names'] == [one_clean]
  # Per-face values, in the order of the names, so two cleanings can be compared face by face.
  per = moved['per_image']
  assert len(per['before']['ssim']) == len(moved['names']) == len(moved['kinds']) == 4
  assert set(moved['kinds']) <= {'blur', 'noise'}
  assert np.mean(per['before']['ssim']) == pytest.approx(moved['before']['ssim'])
  assert all(s == pytest.approx(1.0) for s in per['after']['ssim'])
  assert len(report['clean_but_cleaned']['per_image']['after']['ssim']) == 1
  out = tmp_path / 'report'
  assert (
    cleaning_eval.main(
      [
        '--cleaned',
        str(tmp_path / 'cleaned'),
        '--contaminated',
        str(c),
        '--pristine',
        str(p),
        '--out',
        str(out),
        '--no_identity',
      ]
    )
    == 0
  )
  md = (out / 'cleaning.md').read_text()
  assert '| 0.800 | 0.667 |' in md and 'cleaned - contaminated' in md
  # A pristine twin of another contamination is refused.
  assert (
    cleaning_eval.main(
      [
        '--cleaned',
        str(tmp_path / 'cleaned'),
        '--contaminated',
        str(c),
        '--pristine',
        str(c),
        '--out',
        str(out),
      ]
    )
    == 2
  )


def test_datasets_and_report_in_a_bucket_score_as_the_local_ones(tmp_path, gcs_bucket, capsys):
  """--cleaned/--contaminated/--pristine/--out in a bucket (where --config.mode=clean writes a
  bucket workdir's dataset): the same report as from the local folders."""
  from idm_jax.storage import files

  _oracle_datasets(tmp_path)
  for sub in ('c', 'p', 'cleaned'):
    for rel in files.walk_files(tmp_path / sub):
      files.copy_file(tmp_path / sub / rel, f'{gcs_bucket}/runs/{sub}/{rel}')
  common = ['--no_identity', '--seed', '1']
  local = tmp_path / 'report'
  capsys.readouterr()
  assert (
    cleaning_eval.main(
      [
        '--cleaned',
        str(tmp_path / 'cleaned'),
        '--contaminated',
        str(tmp_path / 'c'),
        '--pristine',
        str(tmp_path / 'p'),
        '--out',
        str(local),
        *common,
      ]
    )
    == 0
  )
  printed_local = capsys.readouterr().out
  runs, out = f'{gcs_bucket}/runs', f'{gcs_bucket}/runs/report'
  assert (
    cleaning_eval.main(
      [
        '--cleaned',
        f'{runs}/cleaned',
        '--contaminated',
        f'{runs}/c',
        '--pristine',
        f'{runs}/p',
        '--out',
        out,
        *common,
      ]
    )
    == 0
  )
  assert capsys.readouterr().out == printed_local
  assert files.walk_files(out) == ['cleaning.json', 'cleaning.md']
  for name in ('cleaning.json', 'cleaning.md'):
    assert files.read_text(files.join(out, name)) == (local / name).read_text()
  report = json.loads(files.read_text(files.join(out, 'cleaning.json')))
  assert report['selection']['precision'] == pytest.approx(4 / 5)
  assert (
    cleaning_eval.main(
      [
        '--cleaned',
        f'{runs}/nope',
        '--contaminated',
        f'{runs}/c',
        '--pristine',
        f'{runs}/p',
        '--out',
        out,
        *common,
      ]
    )
    == 2
  )
  assert f'{runs}/nope/manifest.json is missing' in capsys.readouterr().err


def test_quality_shows_a_cleaning_that_smooths(tmp_path, niqe_params_path):
  """A 'cleaning' that returns each pristine face blurred scores its sharpness below the
  pristine faces' (ratio under 1, interval below zero); the oracle cleaning's ratio is 1."""
  import cv2

  c, p, _ = _oracle_datasets(tmp_path)
  oracle = cleaning_eval.score(
    str(tmp_path / 'cleaned'), str(c), str(p), identity=False, niqe_params=str(niqe_params_path)
  )
  q = oracle['contaminated_and_cleaned']['quality']
  assert q['cleaned_over_pristine'] == {
    'sharpness_lapvar': pytest.approx(1.0),
    'sharpness_grad': pytest.approx(1.0),
  }
  assert set(q['means']) == {'pristine', 'contaminated', 'cleaned'}
  assert 'niqe' in q['means']['cleaned']
  assert 'quality' in oracle['clean_but_cleaned']
  smooth = tmp_path / 'smooth'
  shutil_dataset = json.loads((tmp_path / 'cleaned' / cleaned_dataset.MANIFEST).read_text())
  (smooth / 'images').mkdir(parents=True)
  for r in shutil_dataset['records']:
    img = np.asarray(Image.open(p / 'images' / r['file']).convert('RGB'))
    Image.fromarray(cv2.GaussianBlur(img, (0, 0), 1.5)).save(smooth / 'images' / r['file'])
  (smooth / cleaned_dataset.MANIFEST).write_text(json.dumps(shutil_dataset))
  report = cleaning_eval.score(str(smooth), str(c), str(p), identity=False)
  q = report['contaminated_and_cleaned']['quality']
  assert 'niqe' not in q['means']['cleaned']  # no NIQE model given
  for k in ('sharpness_lapvar', 'sharpness_grad'):
    assert q['cleaned_over_pristine'][k] < 0.9
    assert q['cleaned_minus_pristine'][k]['high'] < 0
  out = tmp_path / 'smooth_report'
  assert (
    cleaning_eval.main(
      [
        '--cleaned',
        str(smooth),
        '--contaminated',
        str(c),
        '--pristine',
        str(p),
        '--out',
        str(out),
        '--no_identity',
      ]
    )
    == 0
  )
  md = (out / 'cleaning.md').read_text()
  assert 'Sharpness and NIQE of the contaminated images that were cleaned' in md
  assert '| cleaned / pristine |' in md
