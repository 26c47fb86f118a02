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
