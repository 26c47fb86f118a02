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
  a = b + 0.5 + rng.normal(0, 0.1, 200)   # pairs differ by 0.5 +- 0.1
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
  got = bootstrap.paired_interval([1., np.inf, 3., 2.], [0., 1., 1., np.nan], num_resamples=100)
  assert got['n'] == 2 and got['dropped'] == 2 and got['mean'] == pytest.approx(1.5)


def test_bad_input():
  with pytest.raises(ValueError, match='equal length'):
    bootstrap.paired_interval([1., 2.], [1.])
  with pytest.raises(ValueError, match='no pair'):
    bootstrap.paired_interval([np.nan], [1.])
  with pytest.raises(ValueError, match='confidence'):
    bootstrap.paired_interval([1.], [1.], confidence=1.)


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
  oracle = faces + 1.0 + noise()          # the pristine data's lead: 1.0 per face
  round1 = faces + 0.4 + noise()          # cleaning wins back 40% of it
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
  oracle = round0 + rng.normal(0, 0.2, (2, 50))     # no lead: the gap's interval holds zero
  share = bootstrap.gap_share_interval(round0, round0 + 0.1, oracle, num_resamples=2000)
  assert not share['gap']['excludes_zero']
  assert share['high'] - share['low'] > 1           # a ratio over a near-zero gap: unbounded
  with pytest.raises(ValueError, match='one shape'):
    bootstrap.gap_share_interval(round0, round0, oracle[:1])
