"""experiments/cleaning_fidelity_summary.py's cleaning section: sharpness and NIQE of the cleaned
faces against the pristine and contaminated ones, from cleaning_eval's reports."""

import json
import sys

from conftest import REPO
from test_cleaning_eval import _oracle_datasets

from idm_jax.extrinsic import cleaning_eval

sys.path.insert(0, str(REPO / 'experiments'))
import cleaning_fidelity_summary  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def test_cleaning_section_shows_sharpness_against_pristine(tmp_path, capsys, niqe_params_path):
  c, p, _ = _oracle_datasets(tmp_path)
  report = cleaning_eval.score(
    str(tmp_path / 'cleaned'), str(c), str(p), identity=False, niqe_params=str(niqe_params_path)
  )
  out = tmp_path / 'out'
  for arm in ('one', 'two'):
    (out / arm / 'cleaning').mkdir(parents=True)
    # The oracle's PSNR is infinite and identity is off here; the section reads finite PSNR,
    # SSIM and identity per face.
    per = report['contaminated_and_cleaned']['per_image']
    for part in ('before', 'after'):
      per[part]['identity'] = [0.9] * len(per[part]['psnr'])
    per['after']['psnr'] = [x + 1 for x in per['before']['psnr']]
    report['clean_but_cleaned']['per_image']['after']['psnr'] = [40.0]
    (out / arm / 'cleaning' / 'cleaning.json').write_text(json.dumps(report))
  cleaning_fidelity_summary.main(str(out), ['one', 'two'])
  text = capsys.readouterr().out
  assert 'What cleaning does to sharpness' in text
  # The oracle cleaner returns the pristine faces: sharpness ratio 1 on damaged and undamaged.
  for faces in ('damaged', 'undamaged'):
    rows = [
      line for line in text.splitlines() if line.startswith(f'| one | {faces} | sharpness_lapvar |')
    ]
    assert len(rows) == 1 and rows[0].endswith('| 1.000 |')
  assert '| one | damaged | niqe |' in text
