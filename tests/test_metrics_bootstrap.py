"""Paired bootstrap: the same numbers as a plain loop, coverage of a known mean, edge cases."""

import numpy as np
import pytest

from idm_jax.metrics import bootstrap


def _reference(a, b, num_resamples, confidence, seed):
  """The textbook procedure, one resample at a time, from the same seeded generator."""
  d = np.asarray(a, float) - np.asarray(b, float)
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, len(d), size=(num_resamples, len(d)))
  means = []
  for r in range(num_resamples):
    means.append(sum(d[i] for i in idx[r]) / len(d))
  means = np.sort(means)
  tail = (1 - confidence) / 2
  return np.quantile(means, tail), np.quantile(means, 1 - tail)


def test_matches_a_plain_loop():
  rng = np.random.default_rng(3)
  a, b = rng.normal(0.2, 1, 40), rng.normal(0, 1, 40)
  got = bootstrap.paired_interval(a, b, num_resamples=500, seed=7)
  low, high = _reference(a, b, 500, 0.95, 7)
  assert got['low'] == pytest.approx(low, rel=1e-12, abs=1e-12)
  assert got['high'] == pytest.approx(high, rel=1e-12, abs=1e-12)
  assert got['mean'] == pytest.approx(np.mean(a - b), rel=1e-12)
  assert got['n'] == 40 and got['dropped'] == 0
  assert got['improved'] == pytest.approx(np.mean(a > b))


def test_seeded_and_covers_a_known_shift():
  rng = np.random.default_rng(0)
  b = rng.normal(0, 1, 200)
  a = b + 0.5 + rng.normal(0, 0.1, 200)  # pairs differ by 0.5 +- 0.1
  first = bootstrap.paired_interval(a, b, seed=1)
  assert first == bootstrap.paired_interval(a, b, seed=1)
  assert first['low'] < 0.5 < first['high'] and first['excludes_zero']
  # The interval is about +-1.96 * 0.1 / sqrt(200) wide: pairing removed the unit spread of b.
  assert first['high'] - first['low'] < 4 * 0.1 / np.sqrt(200)
  wider = bootstrap.paired_interval(a, b, confidence=0.99, seed=1)
  assert wider['low'] < first['low'] and wider['high'] > first['high']


def test_no_effect_straddles_zero():
  rng = np.random.default_rng(5)
  b = rng.normal(0, 1, 100)
  a = b + rng.normal(0, 1, 100) - 0.0
  got = bootstrap.paired_interval(a - np.mean(a - b), b)
  assert got['low'] < 0 < got['high'] and not got['excludes_zero']


def test_non_finite_pairs_are_dropped_and_counted():
  got = bootstrap.paired_interval(
    [1.0, np.inf, 3.0, 2.0], [0.0, 1.0, 1.0, np.nan], num_resamples=100
  )
  assert got['n'] == 2 and got['dropped'] == 2 and got['mean'] == pytest.approx(1.5)


def test_bad_input():
  with pytest.raises(ValueError, match='equal length'):
    bootstrap.paired_interval([1.0, 2.0], [1.0])
  with pytest.raises(ValueError, match='no pair'):
    bootstrap.paired_interval([np.nan], [1.0])
  with pytest.raises(ValueError, match='confidence'):
    bootstrap.paired_interval([1.0], [1.0], confidence=1.0)


def test_seeds_and_faces_with_one_seed_is_the_faces_interval():
  rng = np.random.default_rng(2)
  a, b = rng.normal(0.3, 1, (1, 60)), rng.normal(0, 1, (1, 60))
  both = bootstrap.seeds_and_faces_interval(a, b, num_resamples=4000, seed=3)
  faces = bootstrap.paired_interval(a[0], b[0], num_resamples=4000, seed=3)
  assert both['mean'] == pytest.approx(faces['mean'], rel=1e-12)
  # Different draws of the same distribution: the bounds agree to resampling noise.
  assert both['low'] == pytest.approx(faces['low'], abs=0.03)
  assert both['high'] == pytest.approx(faces['high'], abs=0.03)
  assert both['seeds'] == 1 and both['n'] == 60


def test_seed_spread_widens_the_interval_and_a_real_effect_survives_it():
  rng = np.random.default_rng(4)
  faces = rng.normal(0, 1, 100)
  noise = lambda: rng.normal(0, 0.05, 100)
  # Arm a beats b by 0.1 per face on average, but each training seed shifts the difference by
  # +-0.3 (run-to-run variance): with the faces alone the interval is far too narrow.
  offsets = np.array([0.3, -0.3, 0.25, -0.2])
  a = np.stack([faces + 0.1 + o + noise() for o in offsets])
  b = np.stack([faces + noise() for _ in offsets])
  per_faces = bootstrap.paired_interval(a[0], b[0])
  both = bootstrap.seeds_and_faces_interval(a, b)
  assert per_faces['excludes_zero'] and per_faces['high'] - per_faces['low'] < 0.05
  assert not both['excludes_zero'] and both['high'] - both['low'] > 0.3
  assert both['per_seed'] == pytest.approx(list(0.1 + offsets), abs=0.02)
  # A shift larger than the seed spread still shows.
  assert bootstrap.seeds_and_faces_interval(a + 1.0, b)['excludes_zero']


def test_seeds_and_faces_rejects_mismatched_or_missing_scores():
  with pytest.raises(ValueError, match='one shape'):
    bootstrap.seeds_and_faces_interval(np.zeros((2, 5)), np.zeros((3, 5)))
  with pytest.raises(ValueError, match='finite'):
    bootstrap.seeds_and_faces_interval(np.array([[np.inf, 1.0]]), np.zeros((1, 2)))


def test_gap_share_recovers_the_share_round_1_wins_back():
  rng = np.random.default_rng(5)
  faces = rng.normal(0, 1, (2, 80))
  noise = lambda: rng.normal(0, 0.05, (2, 80))
  round0 = faces + noise()
  oracle = faces + 1.0 + noise()  # the pristine data's lead: 1.0 per face
  round1 = faces + 0.4 + noise()  # cleaning wins back 40% of it
  share = bootstrap.gap_share_interval(round0, round1, oracle, num_resamples=2000)
  assert share['mean'] == pytest.approx(0.4, abs=0.03)
  assert share['low'] < 0.4 < share['high'] and share['low'] > 0.2 and share['high'] < 0.6
  assert share['gap']['excludes_zero'] and share['gap']['mean'] == pytest.approx(1.0, abs=0.03)
  assert share['seeds'] == 2 and share['n'] == 80
  # Round 1 no better than round 0: the share's interval holds 0.
  none = bootstrap.gap_share_interval(round0, round0 + noise(), oracle, num_resamples=2000)
  assert none['low'] < 0 < none['high']


def test_gap_share_without_a_gap_says_so():
  rng = np.random.default_rng(6)
  round0 = rng.normal(0, 1, (2, 50))
  oracle = round0 + rng.normal(0, 0.2, (2, 50))  # no lead: the gap's interval holds zero
  share = bootstrap.gap_share_interval(round0, round0 + 0.1, oracle, num_resamples=2000)
  assert not share['gap']['excludes_zero']
  assert share['high'] - share['low'] > 1  # a ratio over a near-zero gap: unbounded
  with pytest.raises(ValueError, match='one shape'):
    bootstrap.gap_share_interval(round0, round0, oracle[:1])


# Seed-level intervals (docs/PROTOCOL.md): a t-interval over per-seed means, and Fieller's
# interval of a ratio of two such means.


def test_seed_t_interval_known_values():
  r = bootstrap.seed_t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
  # sd 1.5811, se 0.7071, t(0.975, 4) = 2.7764
  assert r['mean'] == 3.0 and r['seeds'] == 5
  assert r['t'] == pytest.approx(2.776445, abs=1e-6)
  assert (r['low'], r['high']) == (
    pytest.approx(1.036757, abs=1e-5),
    pytest.approx(4.963243, abs=1e-5),
  )
  assert r['excludes_zero']
  assert not bootstrap.seed_t_interval([-1.0, 0.5, 1.0])['excludes_zero']
  for bad in ([1.0], [1.0, float('nan')], [[1.0, 2.0]]):
    with pytest.raises(ValueError, match='per-seed'):
      bootstrap.seed_t_interval(bad)


def test_seed_level_interval_averages_faces_within_each_seed():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(5, 100))
  b = a - np.array([0.1, 0.2, 0.3, 0.4, 0.5])[:, None]
  r = bootstrap.seed_level_interval(a, b)
  assert r['per_seed'] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
  assert r['mean'] == pytest.approx(0.3)
  assert r == {
    **bootstrap.seed_t_interval([0.1, 0.2, 0.3, 0.4, 0.5]),
    'per_seed': r['per_seed'],
    'mean': r['mean'],
    'low': r['low'],
    'high': r['high'],
    'se': r['se'],
  }


def test_seed_t_interval_covers_the_true_mean_95_percent_with_five_seeds():
  rng = np.random.default_rng(1)
  samples = rng.normal(0.7, 2.0, (4000, 5))
  hits = 0
  for x in samples:
    r = bootstrap.seed_t_interval(x)
    hits += r['low'] <= 0.7 <= r['high']
  assert 0.935 <= hits / len(samples) <= 0.965


def test_fieller_endpoints_solve_its_quadratic():
  num = np.array([0.10, 0.14, 0.08, 0.12, 0.11])
  den = np.array([0.13, 0.15, 0.12, 0.16, 0.12])
  r = bootstrap.fieller_ratio_interval(num, den)
  assert r['bounded'] and r['mean'] == pytest.approx(num.mean() / den.mean())
  n = len(num)
  cov = np.cov(num, den) / n
  a, b = num.mean(), den.mean()
  for rho in (r['low'], r['high']):
    lhs = (a - rho * b) ** 2
    rhs = r['t'] ** 2 * (cov[0, 0] - 2 * rho * cov[0, 1] + rho**2 * cov[1, 1])
    assert lhs == pytest.approx(rhs, rel=1e-9)
  assert r['low'] < r['mean'] < r['high']
  # A denominator known exactly: the interval is the numerator's t-interval over b.
  exact = bootstrap.fieller_ratio_interval(num, np.full(5, 0.2) + 1e-12 * np.arange(5))
  t_num = bootstrap.seed_t_interval(num)
  assert exact['low'] == pytest.approx(t_num['low'] / 0.2, rel=1e-6)
  assert exact['high'] == pytest.approx(t_num['high'] / 0.2, rel=1e-6)


def test_fieller_is_unbounded_when_the_gap_may_be_zero():
  num = np.array([0.02, 0.05, -0.01, 0.03, 0.00])
  den = np.array([0.05, -0.04, 0.06, -0.02, 0.01])  # its t-interval covers zero
  assert not bootstrap.seed_t_interval(den)['excludes_zero']
  r = bootstrap.fieller_ratio_interval(num, den)
  assert not r['bounded'] and r['low'] is None and r['high'] is None
  assert 'unbounded' in r['reason']
  with pytest.raises(ValueError, match='paired'):
    bootstrap.fieller_ratio_interval([1.0, 2.0], [1.0, 2.0, 3.0])


def test_fieller_covers_the_true_ratio():
  """Per-seed (gap, won back) pairs from a known model: true ratio 0.6, gap clearly non-zero."""
  rng = np.random.default_rng(2)
  hits = trials = 0
  for _ in range(3000):
    den = rng.normal(0.15, 0.04, 5)
    num = 0.6 * den + rng.normal(0, 0.03, 5)
    r = bootstrap.fieller_ratio_interval(num, den)
    if r['bounded']:
      trials += 1
      hits += r['low'] <= 0.6 <= r['high']
  assert trials > 2900 and 0.93 <= hits / trials <= 0.97
