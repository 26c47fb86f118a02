"""experiments/extrinsic_summary.py's seed-level section (docs/PROTOCOL.md): t-intervals over the
seed means, and shares of the oracle's lead only where that lead is clearly non-zero."""

import sys

from conftest import REPO
import numpy as np
import pytest

sys.path.insert(0, str(REPO / 'experiments'))
import extrinsic_summary  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

METRICS = extrinsic_summary.METRICS


def _arms(offsets, seed_spread, seeds, rng):
  """Per-image scores: arm a of seed s = face + offsets[a] + a seed effect of that arm."""
  faces = rng.normal(17, 1, 50)

  def row(shift):
    return {
      '1 steps': {
        'names': None,
        'metrics': {
          m: {'per_image': list(faces + shift + rng.normal(0, 0.01, 50))} for m in METRICS
        },
      }
    }

  arms = {
    a: {s: row(off + rng.normal(0, seed_spread)) for s in seeds} for a, off in offsets.items()
  }
  lq = {s: {'metrics': {m: {'per_image': list(faces - 0.5)} for m in METRICS}} for s in seeds}
  return arms, lq


def test_clear_gap_gives_fieller_shares(capsys):
  rng = np.random.default_rng(0)
  seeds = list(range(5))
  arms, lq = _arms(dict(round_0=0.0, round_1=0.10, oracle=0.20, control=0.15), 0.01, seeds, rng)
  c = dict(extrinsic_summary.contrasts(arms, lq, seeds, '1 steps', 'psnr'))
  assert np.mean(c['G = oracle − round 0']) == pytest.approx(0.20, abs=0.03)
  assert np.mean(c['oracle − LQ']) == pytest.approx(0.70, abs=0.03)
  n = c["N = R − K (the harm removed, net of the cleaner's output)"]
  assert np.mean(n) == pytest.approx(0.10 - (0.15 - 0.20), abs=0.03)  # R − K
  extrinsic_summary.seed_level(arms, lq, seeds, ['1 steps'])
  out = capsys.readouterr().out
  assert 't-interval over the 5 seed means' in out
  share_rows = [line for line in out.splitlines() if line.startswith('| 1 steps | PSNR')]
  assert len(share_rows) == 1 and 'not given' not in share_rows[0]
  share = float(share_rows[0].split('|')[4].split('[')[0])
  assert share == pytest.approx(0.5, abs=0.15)


def test_a_gap_inside_the_seed_noise_gives_no_share(capsys):
  rng = np.random.default_rng(1)
  seeds = [0, 1]
  arms, lq = _arms(dict(round_0=0.0, round_1=0.10, oracle=0.13), 0.15, seeds, rng)
  extrinsic_summary.seed_level(arms, lq, seeds, ['1 steps'])
  out = capsys.readouterr().out
  rows = [line for line in out.splitlines() if line.startswith('| 1 steps |')]
  assert len(rows) == 3 and all("not given: the lead's interval includes 0" in r for r in rows)
  one = _arms(dict(round_0=0.0, oracle=0.1), 0.1, [0], rng)
  extrinsic_summary.seed_level(*one, [0], ['1 steps'])
  assert 'One training seed: no seed-level interval.' in capsys.readouterr().out


def test_committed_two_seed_summary_reads_as_the_issue_says():
  """The 40% dose's two seeds: the oracle's lead is inside the seed noise at the seed level."""
  text = (REPO / 'docs/results/extrinsic64_doses/dose40/summary_seed_level.md').read_text()
  assert '| G = oracle − round 0 | 1 steps | +0.1336 [-0.1599, +0.4271] |' in text
  assert "not given: the lead's interval includes 0" in text


def test_cleanings_over_the_seeds(tmp_path, capsys):
  """(F): one row per measure, the seeds' values and their t-interval; the sharpness ratios of
  damaged and undamaged faces when the reports have them."""

  def report(psnr, ratio):
    q = dict(
      means=dict(cleaned=dict(niqe=5.0), pristine=dict(niqe=4.0)),
      cleaned_over_pristine=dict(sharpness_lapvar=ratio, sharpness_grad=ratio + 0.01),
    )
    return dict(
      contaminated_and_cleaned=dict(delta={m: dict(mean=psnr) for m in METRICS}, quality=q),
      clean_but_cleaned=dict(quality=q),
    )

  for seed, (psnr, ratio) in enumerate([(0.10, 0.90), (0.12, 0.92), (0.14, 0.94)]):
    d = tmp_path / f'cleaning_seed_{seed}'
    d.mkdir()
    (d / 'cleaning.json').write_text(__import__('json').dumps(report(psnr, ratio)))
  extrinsic_summary.cleaning_seed_level(str(tmp_path))
  out = capsys.readouterr().out
  assert '## The cleanings over the 3 seeds' in out
  psnr = [line for line in out.splitlines() if line.startswith('| psnr: cleaned − contaminated')]
  # mean 0.12, sd 0.02, t(0.975, 2) = 4.3027: 0.12 ± 0.0497
  assert psnr == [
    '| psnr: cleaned − contaminated | +0.1000 | +0.1200 | +0.1400 | '
    '**+0.1200 [+0.0703, +0.1697]** |'
  ]
  # A ratio is read against 1: unsigned, and bold because 0.92 ± 0.0497 lies below 1.
  ratio = [line for line in out.splitlines() if line.startswith('| sharpness_lapvar, undamaged')]
  assert ratio == [
    '| sharpness_lapvar, undamaged faces: cleaned / pristine | 0.9000 | 0.9200 | 0.9400 | '
    '**0.9200 [0.8703, 0.9697]** |'
  ]
  assert '| niqe, damaged faces: cleaned − pristine | +1.0000 |' in out
  (tmp_path / 'cleaning_seed_1' / 'cleaning.json').unlink()
  (tmp_path / 'cleaning_seed_2' / 'cleaning.json').unlink()
  extrinsic_summary.cleaning_seed_level(str(tmp_path))
  assert capsys.readouterr().out == ''  # one seed: no interval to give
