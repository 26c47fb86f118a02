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
