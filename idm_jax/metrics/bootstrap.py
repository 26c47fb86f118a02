"""Paired-bootstrap confidence intervals for the mean difference of two per-image scores.

Two results on the same images (a restoration and its LQ input, two models on one validation
set) are compared per image: d_i = a_i - b_i. Resampling the images with replacement and
taking the mean of d each time gives the bootstrap distribution of the mean difference; its
(1 - confidence) / 2 and (1 + confidence) / 2 percentiles are the interval. Pairing removes the
spread between images (hard faces are hard for both), which is most of the variance.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

NUM_RESAMPLES = 10_000
CONFIDENCE = 0.95


def resample_means(diff: np.ndarray, num_resamples: int, seed: int) -> np.ndarray:
  """Means of `num_resamples` resamples (with replacement) of `diff`, from one seeded draw."""
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, len(diff), size=(num_resamples, len(diff)))
  return diff[idx].mean(axis=1)


def paired_interval(a: Sequence[float], b: Sequence[float], *,
                    num_resamples: int = NUM_RESAMPLES, confidence: float = CONFIDENCE,
                    seed: int = 0) -> dict:
  """The mean of a - b over the pairs where both are finite, with its bootstrap interval.

  Returns {'mean', 'low', 'high', 'n', 'improved' (share of pairs with a > b), 'confidence',
  'num_resamples', 'seed'}; 'excludes_zero' says whether the interval lies on one side of 0.
  Non-finite pairs (an 'inf' PSNR of identical images) are left out and counted in 'dropped'.
  """
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(f'paired_interval: need two 1-D sequences of equal length, got shapes '
                     f'{a.shape} and {b.shape}')
  if not 0 < confidence < 1:
    raise ValueError(f'paired_interval: confidence={confidence} must be in (0, 1)')
  keep = np.isfinite(a) & np.isfinite(b)
  diff = a[keep] - b[keep]
  if len(diff) == 0:
    raise ValueError('paired_interval: no pair with two finite values')
  means = resample_means(diff, int(num_resamples), int(seed))
  tail = (1 - confidence) / 2
  low, high = np.quantile(means, [tail, 1 - tail])
  return dict(mean=float(diff.mean()), low=float(low), high=float(high), n=int(len(diff)),
              dropped=int((~keep).sum()), improved=float(np.mean(diff > 0)),
              excludes_zero=bool(low > 0 or high < 0), confidence=float(confidence),
              num_resamples=int(num_resamples), seed=int(seed))


def seeds_and_faces_interval(a, b, *, num_resamples: int = NUM_RESAMPLES,
                             confidence: float = CONFIDENCE, seed: int = 0) -> dict:
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
  tail = (1 - confidence) / 2
  low, high = np.quantile(means, [tail, 1 - tail])
  return dict(mean=float(diff.mean()), low=float(low), high=float(high), seeds=int(num_seeds),
              n=int(num_faces), per_seed=[float(m) for m in diff.mean(axis=1)],
              excludes_zero=bool(low > 0 or high < 0), confidence=float(confidence),
              num_resamples=int(num_resamples), seed=int(seed))


def gap_share_interval(round0, round1, oracle, *, num_resamples: int = NUM_RESAMPLES,
                       confidence: float = CONFIDENCE, seed: int = 0) -> dict:
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
  return dict(mean=float((r1 - r0).mean() / gap_mean) if gap_mean else float('nan'),
              low=float(low), high=float(high),
              gap=dict(mean=gap_mean, low=float(gap_low), high=float(gap_high),
                       excludes_zero=bool(gap_low > 0 or gap_high < 0)),
              seeds=int(r0.shape[0]), n=int(r0.shape[1]), confidence=float(confidence),
              num_resamples=int(num_resamples), seed=int(seed))


def _seed_face_arrays(caller: str, *arrays) -> list[np.ndarray]:
  arrays = [np.asarray(x, np.float64) for x in arrays]
  shape = arrays[0].shape
  if any(x.shape != shape for x in arrays) or len(shape) != 2 or 0 in shape:
    raise ValueError(f'{caller}: need (seeds, faces) arrays of one shape, got '
                     f'{" and ".join(str(x.shape) for x in arrays)}')
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
