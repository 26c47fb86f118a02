"""metrics.reports: metrics.json (strict JSON, per image) and metrics.md (the tables)."""

import json

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


def test_table_lines():
  assert reports.table(['', 'PSNR'], [['LQ input', '16.6'], ['restored', '17.2']]) == [
    '| | PSNR |',
    '| --- | --- |',
    '| LQ input | 16.6 |',
    '| restored | 17.2 |',
  ]


def test_library_api_unavailable_metrics_and_inf(faces, tmp_path):
  gt = faces[0]
  res = scoring.evaluate_images(gt, gt, niqe_params=None, identity=False, progress=False)
  m = res['metrics']
  assert m['psnr']['mean'] == float('inf') and m['ssim']['mean'] == pytest.approx(1)
  assert m['niqe']['mean'] is None and 'NIQE parameters' in m['niqe']['reason']
  assert m['identity']['mean'] is None and 'consistency' not in m
  reports.write_report(res, tmp_path, 'identical')
  saved = json.loads((tmp_path / 'metrics.json').read_text())  # strict JSON: no Infinity
  assert saved['metrics']['psnr']['mean'] == 'inf'
  assert 'n/a' in (tmp_path / 'metrics.md').read_text()


def test_write_report_compares_several_results(faces, tmp_path):
  gt, pred, lq = faces
  rows = {
    'restored, 5 steps': scoring.evaluate_images(
      pred, gt, lq, niqe_params=None, identity=False, progress=False
    ),
    'LQ input': scoring.evaluate_images(
      gt[:1], gt[:1], niqe_params=None, identity=False, progress=False
    ),
  }
  reports.write_report(rows, tmp_path, 'validation')
  md = (tmp_path / 'metrics.md').read_text().splitlines()
  header = next(line for line in md if line.startswith('| |'))
  assert 'PSNR (RGB, dB)' in header and 'Consistency' in header
  row = next(line for line in md if line.startswith('| restored, 5 steps |'))
  assert f'{rows["restored, 5 steps"]["metrics"]["psnr"]["mean"]:.4f}' in row
  assert next(line for line in md if line.startswith('| LQ input |')).count('n/a') >= 3
  assert any('NIQE' in line and 'parameters' in line for line in md)  # the n/a reason
  saved = json.loads((tmp_path / 'metrics.json').read_text())
  assert len(saved['LQ input']['metrics']['psnr']['per_image']) == 1
  with pytest.raises(ValueError, match='neither'):
    reports.write_report({'x': 1}, tmp_path, 'bad')
