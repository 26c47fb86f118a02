"""Confidence intervals: paired bootstrap over faces, and seed-level intervals over training runs.

Two results on the same images (a restoration and its LQ input, two models on one validation
set) are compared per image: d_i = a_i - b_i. Resampling the images with replacement and
taking the mean of d each time gives the bootstrap distribution of the mean difference; its
(1 - confidence) / 2 and (1 + confidence) / 2 percentiles are the interval. Pairing removes the
spread between images (hard faces are hard for both), which is most of the variance.

That interval says how surely one trained model beats another on these faces; whether the data
made the difference needs the run-to-run spread of training too. `seed_t_interval` takes one
mean difference per training seed and gives the t-interval over them (docs/PROTOCOL.md's
primary interval), and `fieller_ratio_interval` the interval of a ratio of two such means (a
share of a gap), unbounded when the denominator is not clearly non-zero.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import stats

NUM_RESAMPLES = 10_000
CONFIDENCE = 0.95


def resample_means(diff: np.ndarray, num_resamples: int, seed: int) -> np.ndarray:
  """Means of `num_resamples` resamples (with replacement) of `diff`, from one seeded draw."""
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, len(diff), size=(num_resamples, len(diff)))
  return diff[idx].mean(axis=1)


def paired_interval(
  a: Sequence[float],
  b: Sequence[float],
  *,
  num_resamples: int = NUM_RESAMPLES,
  confidence: float = CONFIDENCE,
  seed: int = 0,
) -> dict:
  """The mean of a - b over the pairs where both are finite, with its bootstrap interval.

  Returns {'mean', 'low', 'high', 'n', 'improved' (share of pairs with a > b), 'confidence',
  'num_resamples', 'seed'}; 'excludes_zero' says whether the interval lies on one side of 0.
  Non-finite pairs (an 'inf' PSNR of identical images) are left out and counted in 'dropped'.
  """
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(
      f'paired_interval: need two 1-D sequences of equal length, got shapes {a.shape} and {b.shape}'
    )
  if not 0 < confidence < 1:
    raise ValueError(f'paired_interval: confidence={confidence} must be in (0, 1)')
  keep = np.isfinite(a) & np.isfinite(b)
  diff = a[keep] - b[keep]
  if len(diff) == 0:
    raise ValueError('paired_interval: no pair with two finite values')
  means = resample_means(diff, int(num_resamples), int(seed))
  return _percentile_interval(
    diff,
    means,
    confidence,
    num_resamples,
    seed,
    n=int(len(diff)),
    dropped=int((~keep).sum()),
    improved=float(np.mean(diff > 0)),
  )


def _percentile_interval(diff, means, confidence, num_resamples, seed, **counts) -> dict:
  """The report of a percentile bootstrap: the mean of `diff`, the interval of the resampled
  `means` at `confidence`, the counts the caller adds, and the settings that reproduce it."""
  tail = (1 - confidence) / 2
  low, high = np.quantile(means, [tail, 1 - tail])
  return dict(
    mean=float(diff.mean()),
    low=float(low),
    high=float(high),
    **counts,
    excludes_zero=bool(low > 0 or high < 0),
    confidence=float(confidence),
    num_resamples=int(num_resamples),
    seed=int(seed),
  )


def seeds_and_faces_interval(
  a, b, *, num_resamples: int = NUM_RESAMPLES, confidence: float = CONFIDENCE, seed: int = 0
) -> dict:
  """The mean of a - b over training seeds and faces, with an interval covering both.

  a, b: (seeds, faces) scores of two arms, row s of each from training seed s (the same init
  and data order in both arms) and column i from face i. Each resample draws seeds and faces
  with replacement, the same draws for both arms (pairing both ways), and takes the mean
  difference over the drawn cells. With one seed this is `paired_interval` over the faces;
  with several, the run-to-run spread of training enters the interval, which the faces alone
  cannot show (two models trained alike differ by more than their faces' sampling error).
  Few seeds make a coarse seed distribution: report the seed count beside the interval.
  """
  a, b = _seed_face_arrays('seeds_and_faces_interval', a, b)
  diff = a - b
  num_seeds, num_faces = diff.shape
  means = _resampled_means([diff], int(num_resamples), int(seed))[0]
  return _percentile_interval(
    diff,
    means,
    confidence,
    num_resamples,
    seed,
    seeds=int(num_seeds),
    n=int(num_faces),
    per_seed=[float(m) for m in diff.mean(axis=1)],
  )


def gap_share_interval(
  round0,
  round1,
  oracle,
  *,
  num_resamples: int = NUM_RESAMPLES,
  confidence: float = CONFIDENCE,
  seed: int = 0,
) -> dict:
  """The share of the oracle's lead over round 0 that round 1 wins back, with its interval.

  round0, round1, oracle: (seeds, faces) scores, paired as in `seeds_and_faces_interval`.
  share = (mean(round1) - mean(round0)) / (mean(oracle) - mean(round0)); each resample draws
  seeds and faces as there, the same draws for all three arms, and takes the ratio of the
  resampled mean differences. The ratio means something only where the gap does: 'gap' is
  oracle - round 0 with its interval over the same resamples, and a gap whose interval holds 0
  makes the share's interval unbounded (the resampled denominators cross zero).
  """
  r0, r1, orc = _seed_face_arrays('gap_share_interval', round0, round1, oracle)
  won, gap = _resampled_means([r1 - r0, orc - r0], int(num_resamples), int(seed))
  tail = (1 - confidence) / 2
  with np.errstate(divide='ignore', invalid='ignore'):
    shares = won / gap
  low, high = np.quantile(shares, [tail, 1 - tail])
  gap_low, gap_high = np.quantile(gap, [tail, 1 - tail])
  gap_mean = float((orc - r0).mean())
  return dict(
    mean=float((r1 - r0).mean() / gap_mean) if gap_mean else float('nan'),
    low=float(low),
    high=float(high),
    gap=dict(
      mean=gap_mean,
      low=float(gap_low),
      high=float(gap_high),
      excludes_zero=bool(gap_low > 0 or gap_high < 0),
    ),
    seeds=int(r0.shape[0]),
    n=int(r0.shape[1]),
    confidence=float(confidence),
    num_resamples=int(num_resamples),
    seed=int(seed),
  )


def _seed_face_arrays(caller: str, *arrays) -> list[np.ndarray]:
  arrays = [np.asarray(x, np.float64) for x in arrays]
  shape = arrays[0].shape
  if any(x.shape != shape for x in arrays) or len(shape) != 2 or 0 in shape:
    raise ValueError(
      f'{caller}: need (seeds, faces) arrays of one shape, got '
      f'{" and ".join(str(x.shape) for x in arrays)}'
    )
  if not all(np.all(np.isfinite(x)) for x in arrays):
    raise ValueError(f'{caller}: every score must be finite')
  return arrays


def _resampled_means(arrays: list[np.ndarray], num_resamples: int, seed: int) -> np.ndarray:
  """(len(arrays), num_resamples): each array's mean over the same drawn seeds and faces."""
  num_seeds, num_faces = arrays[0].shape
  rng = np.random.default_rng(seed)
  means = np.empty((len(arrays), num_resamples))
  for r in range(num_resamples):
    s = rng.integers(0, num_seeds, num_seeds)
    f = rng.integers(0, num_faces, num_faces)
    for k, x in enumerate(arrays):
      means[k, r] = x[np.ix_(s, f)].mean()
  return means


def seed_t_interval(per_seed, *, confidence: float = CONFIDENCE) -> dict:
  """The mean of one value per training seed, with the t-interval over the seeds.

  per_seed: e.g. each seed's mean over the faces of arm a − arm b. mean ± t(1 − α/2, n − 1) ·
  sd / √n: the seeds are the sampling unit, so the interval carries the run-to-run spread of
  training; with few seeds it is wide, as it should be. Needs two or more finite values.
  """
  x = np.asarray(per_seed, np.float64)
  if x.ndim != 1 or len(x) < 2 or not np.all(np.isfinite(x)):
    raise ValueError(f'seed_t_interval: need two or more finite per-seed values, got {x!r}')
  if not 0 < confidence < 1:
    raise ValueError(f'seed_t_interval: confidence={confidence} must be in (0, 1)')
  n = len(x)
  se = float(x.std(ddof=1) / np.sqrt(n))
  t = float(stats.t.ppf((1 + confidence) / 2, n - 1))
  mean = float(x.mean())
  low, high = mean - t * se, mean + t * se
  return dict(
    mean=mean,
    low=low,
    high=high,
    seeds=n,
    se=se,
    t=t,
    per_seed=[float(v) for v in x],
    excludes_zero=bool(low > 0 or high < 0),
    confidence=float(confidence),
  )


def seed_level_interval(a, b, *, confidence: float = CONFIDENCE) -> dict:
  """`seed_t_interval` of a − b from (seeds, faces) scores: each seed's mean over the faces."""
  a, b = _seed_face_arrays('seed_level_interval', a, b)
  return seed_t_interval((a - b).mean(axis=1), confidence=confidence)


def fieller_ratio_interval(numerator, denominator, *, confidence: float = CONFIDENCE) -> dict:
  """The ratio of two per-seed means, mean(numerator) / mean(denominator), with Fieller's interval.

  numerator, denominator: one value each per training seed, paired (the same seeds), e.g.
  round 1 − round 0 and oracle − round 0. Fieller's interval is the set of ratios ρ with
  (a − ρb)² ≤ t² (v11 − 2ρ v12 + ρ² v22), a and b the means, v the (co)variances of the means,
  t the t quantile with n − 1 degrees of freedom. It is a bounded interval only when the
  denominator's own t-interval excludes zero (g = t² v22 / b² < 1); otherwise 'bounded' is
  False, low and high are None, and 'reason' says so: a share of a gap that may be zero is not
  a number.
  """
  a_s = np.asarray(numerator, np.float64)
  b_s = np.asarray(denominator, np.float64)
  if (
    a_s.shape != b_s.shape
    or a_s.ndim != 1
    or len(a_s) < 2
    or not (np.all(np.isfinite(a_s)) and np.all(np.isfinite(b_s)))
  ):
    raise ValueError(
      'fieller_ratio_interval: need two paired 1-D sequences of two or more '
      f'finite per-seed values, got shapes {a_s.shape} and {b_s.shape}'
    )
  n = len(a_s)
  a, b = float(a_s.mean()), float(b_s.mean())
  cov = np.cov(a_s, b_s, ddof=1) / n
  v11, v22, v12 = float(cov[0, 0]), float(cov[1, 1]), float(cov[0, 1])
  t = float(stats.t.ppf((1 + confidence) / 2, n - 1))
  out = dict(
    mean=a / b if b else float('nan'),
    seeds=n,
    t=t,
    confidence=float(confidence),
    denominator=seed_t_interval(b_s, confidence=confidence),
  )
  g = t * t * v22 / (b * b) if b else float('inf')
  if g >= 1:
    return dict(
      out,
      low=None,
      high=None,
      bounded=False,
      reason="unbounded: the denominator's interval includes zero",
    )
  r = a / b
  disc = v11 - 2 * r * v12 + r * r * v22 - g * (v11 - (v12 * v12 / v22 if v22 else 0.0))
  half = t / abs(b) * np.sqrt(max(disc, 0.0))
  centre = r - (g * v12 / v22 if v22 else 0.0)
  low, high = (centre - half) / (1 - g), (centre + half) / (1 - g)
  return dict(out, low=float(low), high=float(high), bounded=True, reason='')
