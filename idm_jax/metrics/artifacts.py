"""A no-reference outlier score for "not truly HQ" images within a set of comparable faces.

Mild defects leave two traces that NIQE, at 64 px, sees only in part (docs/RESULTS.md measures
both against a known contamination):
  * the ratio of fine to coarse detail, log(|Laplacian(x)| / |Laplacian(blur_1px(x))|): blur and
    down-up resizing remove the finest band (the ratio falls), sensor noise adds to it (rises);
  * JPEG's 8x8 grid: log of the mean gradient across block borders over the mean gradient
    everywhere, which is about 0 for images without blocking.
Each feature is standardised against the set itself (median and MAD), so the score is how far
an image lies from its set's typical sharpness (either way) or above its blocking; the score is
the larger of the two robust z-scores. It ranks images within one set; it is not an absolute
quality measure, and it only knows these kinds of defect.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

MAD_TO_STD = 1.4826  # MAD of a normal distribution times this is its standard deviation


def features(img: np.ndarray) -> tuple[float, float]:
  """(detail ratio, JPEG blocking) of a uint8 RGB image."""
  if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
    raise ValueError(f'artifacts.features: expected uint8 (H, W, 3), got {img.dtype} {img.shape}')
  g = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32)
  fine = np.abs(cv2.Laplacian(g, cv2.CV_32F)).mean()
  coarse = np.abs(cv2.Laplacian(cv2.GaussianBlur(g, (0, 0), 1.0), cv2.CV_32F)).mean()
  dx, dy = np.abs(np.diff(g, axis=1)), np.abs(np.diff(g, axis=0))
  eps = 1e-6
  block = 0.5 * (dx[:, 7::8].mean() / (dx.mean() + eps) + dy[7::8, :].mean() / (dy.mean() + eps))
  return float(np.log((fine + eps) / (coarse + eps))), float(np.log(block + eps))


def robust_z(x: np.ndarray) -> np.ndarray:
  med = np.median(x)
  scale = MAD_TO_STD * np.median(np.abs(x - med))
  return (x - med) / max(scale, 1e-12)


def outlier_scores(feats: Sequence[tuple[float, float]]) -> np.ndarray:
  """Higher = more likely defective: max(|z(detail)|, z(blocking)) within the set."""
  f = np.asarray(feats, np.float64).reshape(-1, 2)
  if len(f) < 3:
    raise ValueError(
      f'artifacts.outlier_scores: need at least 3 images to standardise, got {len(f)}'
    )
  return np.maximum(np.abs(robust_z(f[:, 0])), robust_z(f[:, 1]))
