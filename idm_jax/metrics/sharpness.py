"""How sharp an image is, without a reference: two standard measures on the luma channel.

  laplacian_variance  the variance of the 3x3 Laplacian (Pech-Pacheco et al. 2000): the energy of
                      the finest detail; blur lowers it sharply, noise raises it;
  gradient_magnitude  the mean magnitude of the Sobel gradient (Tenengrad-style): edges'
                      contrast, less dominated than the Laplacian by pixel-level noise.

Both are on Y (BT.601, 0-255) of a uint8 RGB image, with reflected borders, so they compare
images of one size and kind: a cleaned set against its pristine and contaminated versions, not
against other faces. Averaging restorations (the mean of 16 cleaning draws) smooths what the
draws disagree on, which is what these measure and PSNR does not.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

_LAPLACIAN = np.array([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def _luma(img: np.ndarray) -> np.ndarray:
  img = np.asarray(img)
  if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
    raise ValueError(f'sharpness: need a uint8 (H, W, 3) RGB image, got {img.dtype} {img.shape}')
  x = img.astype(np.float64)
  return 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]


def laplacian_variance(img: np.ndarray) -> float:
  """Variance of the 3x3 Laplacian of the luma (0-255 scale)."""
  return float(ndimage.convolve(_luma(img), _LAPLACIAN, mode='reflect').var())


def gradient_magnitude(img: np.ndarray) -> float:
  """Mean Sobel gradient magnitude of the luma (0-255 scale)."""
  y = _luma(img)
  gx = ndimage.sobel(y, axis=1, mode='reflect')
  gy = ndimage.sobel(y, axis=0, mode='reflect')
  return float(np.hypot(gx, gy).mean())
