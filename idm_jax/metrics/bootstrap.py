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
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 2 or 0 in a.shape:
    raise ValueError(f'seeds_and_faces_interval: need two (seeds, faces) arrays of one shape, '
                     f'got {a.shape} and {b.shape}')
  if not np.all(np.isfinite(a) & np.isfinite(b)):
    raise ValueError('seeds_and_faces_interval: every score must be finite')
  diff = a - b
  num_seeds, num_faces = diff.shape
  rng = np.random.default_rng(seed)
  means = np.empty(int(num_resamples))
  for r in range(int(num_resamples)):
    s = rng.integers(0, num_seeds, num_seeds)
    f = rng.integers(0, num_faces, num_faces)
    means[r] = diff[np.ix_(s, f)].mean()
  tail = (1 - confidence) / 2
  low, high = np.quantile(means, [tail, 1 - tail])
  return dict(mean=float(diff.mean()), low=float(low), high=float(high), seeds=int(num_seeds),
              n=int(num_faces), per_seed=[float(m) for m in diff.mean(axis=1)],
              excludes_zero=bool(low > 0 or high < 0), confidence=float(confidence),
              num_resamples=int(num_resamples), seed=int(seed))
