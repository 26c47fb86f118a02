"""Full-reference fidelity: PSNR, SSIM (RGB or MATLAB-Y) and LQ consistency.

PSNR and SSIM follow scikit-image's definitions (`peak_signal_noise_ratio(data_range=255)` and
`structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=255)`, channels averaged), so our numbers can be checked against a library anyone
has. `y_channel=True` first converts both images to the Y of MATLAB's rgb2ycbcr (float, not
rounded), BasicSR's `test_y_channel` convention used by most face-restoration papers.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage

from idm_jax.metrics import matlab

_K1, _K2 = 0.01, 0.03
_SIGMA = 1.5
_TRUNCATE = 3.5  # scikit-image's choice: an 11x11 window for sigma 1.5


def _check_pair(a: np.ndarray, b: np.ndarray, name: str) -> None:
  if a.shape != b.shape:
    raise ValueError(f'{name}: images differ in shape, {a.shape} vs {b.shape}')
  if a.ndim != 3 or a.shape[-1] != 3:
    raise ValueError(f'{name}: expected RGB images (H, W, 3), got shape {a.shape}')


def _prepare(a: np.ndarray, b: np.ndarray, y_channel: bool, name: str):
  a, b = np.asarray(a), np.asarray(b)
  _check_pair(a, b, name)
  if y_channel:
    return matlab.rgb_to_y(a)[..., None], matlab.rgb_to_y(b)[..., None]
  return a.astype(np.float64), b.astype(np.float64)


def psnr(a: np.ndarray, b: np.ndarray, *, y_channel: bool = False) -> float:
  """PSNR in dB of two uint8 RGB images (H, W, 3); inf when they are identical."""
  a, b = _prepare(a, b, y_channel, 'psnr')
  mse = np.mean((a - b) ** 2)
  if mse == 0:
    return float('inf')
  return float(10 * np.log10(255.0**2 / mse))


def ssim(a: np.ndarray, b: np.ndarray, *, y_channel: bool = False) -> float:
  """Mean SSIM of two uint8 RGB images (H, W, 3), Gaussian-weighted (sigma 1.5).

  Each channel is filtered separately (sigma 0 along the channel axis), the SSIM map is cropped
  by the window radius on every side and averaged over pixels and channels, as scikit-image does.
  """
  a, b = _prepare(a, b, y_channel, 'ssim')
  radius = int(_TRUNCATE * _SIGMA + 0.5)
  if min(a.shape[:2]) < 2 * radius + 1:
    raise ValueError(
      f'ssim: images must be at least {2 * radius + 1} pixels on each side, got {a.shape[:2]}'
    )

  def filt(x):
    return ndimage.gaussian_filter(x, sigma=(_SIGMA, _SIGMA, 0), truncate=_TRUNCATE)

  # Population (not sample) covariances: use_sample_covariance=False.
  mu_a, mu_b = filt(a), filt(b)
  var_a = filt(a * a) - mu_a * mu_a
  var_b = filt(b * b) - mu_b * mu_b
  cov = filt(a * b) - mu_a * mu_b
  c1, c2 = (_K1 * 255.0) ** 2, (_K2 * 255.0) ** 2
  s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
  return float(s[radius:-radius, radius:-radius].mean())


def _resize(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """Resize uint8 RGB to (h, w): area averaging when shrinking (antialiased), bicubic else."""
  h, w = hw
  if (h, w) == img.shape[:2]:
    return img
  shrink = h <= img.shape[0] and w <= img.shape[1]
  return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


def consistency(pred: np.ndarray, lq: np.ndarray, *, scale: int = 4) -> float:
  """PSNR between the restored image brought back to LQ resolution and the LQ input (dB).

  A restoration should explain its input: degrading it again should give back the LQ. When the
  LQ is smaller, `pred` is area-downsampled to the LQ's size. When they are the same size (LQ
  already upsampled, as in our pairs), both are area-downsampled by `scale`, which compares the
  low frequencies the LQ still carries and ignores the detail it lost.
  """
  pred, lq = np.asarray(pred), np.asarray(lq)
  for name, x in (('pred', pred), ('lq', lq)):
    if x.ndim != 3 or x.shape[-1] != 3 or x.dtype != np.uint8:
      raise ValueError(f'consistency: {name} must be uint8 RGB (H, W, 3), got {x.dtype} {x.shape}')
  if scale < 1:
    raise ValueError(f'consistency: scale must be >= 1, got {scale}')
  if pred.shape == lq.shape:
    hw = (max(1, lq.shape[0] // scale), max(1, lq.shape[1] // scale))
    return psnr(_resize(pred, hw), _resize(lq, hw))
  return psnr(_resize(pred, lq.shape[:2]), lq)
