"""MATLAB-equivalent image operations that published metric values depend on.

NIQE, Y-channel PSNR/SSIM and many SR benchmarks were defined in MATLAB, so reproducing their
numbers needs MATLAB's `rgb2ycbcr` (ITU-R BT.601, studio range) and `imresize` (bicubic with
a=-0.5, kernel widened by 1/scale when downsampling with antialiasing, symmetric padding).
OpenCV's resize and YCrCb conversion differ from both, enough to move NIQE by several percent.
"""

from __future__ import annotations

import math

import numpy as np

# Rows of MATLAB's rgb2ycbcr for the Y channel, applied to RGB in [0, 1]; output in [16, 235].
_Y_WEIGHTS = np.array([65.481, 128.553, 24.966])


def rgb_to_y(img: np.ndarray) -> np.ndarray:
  """Y of MATLAB's rgb2ycbcr for uint8 (or 0..255 float) RGB `(..., 3)`; float64 in [16, 235].

  Not rounded (BasicSR's `test_y_channel` convention for PSNR/SSIM); NIQE rounds it itself.
  """
  img = np.asarray(img)
  if img.shape[-1] != 3:
    raise ValueError(f'rgb_to_y: expected an RGB image (..., 3), got shape {img.shape}')
  return img.astype(np.float64) / 255.0 @ _Y_WEIGHTS + 16.0


def _cubic(x: np.ndarray) -> np.ndarray:
  """Keys' cubic convolution kernel with a = -0.5 (MATLAB's 'bicubic')."""
  ax = np.abs(x)
  ax2, ax3 = ax**2, ax**3
  return (1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1) + (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * (
    (ax > 1) & (ax <= 2)
  )


def resize_matrix(in_len: int, out_len: int, scale: float, antialiasing: bool = True) -> np.ndarray:
  """The (out_len, in_len) matrix M with resized = M @ signal along one axis.

  Follows MATLAB's contributions(): output pixel k (1-based) maps to input coordinate
  u = k / scale + 0.5 (1 - 1 / scale); taps outside [1, in_len] are folded back by symmetric
  (half-sample) reflection, which is what MATLAB's 'symmetric' padding does.
  """
  kernel_width = 4.0
  aa = antialiasing and scale < 1
  if aa:
    kernel_width /= scale  # a wider kernel interpolates and low-passes at once
  x = np.arange(1, out_len + 1, dtype=np.float64)
  u = x / scale + 0.5 * (1 - 1 / scale)
  left = np.floor(u - kernel_width / 2)
  taps = math.ceil(kernel_width) + 2
  idx = left[:, None] + np.arange(taps)[None, :]  # 1-based input indices
  dist = u[:, None] - idx
  w = scale * _cubic(dist * scale) if aa else _cubic(dist)
  w = w / w.sum(axis=1, keepdims=True)
  # Symmetric reflection into 0-based [0, in_len): -1 -> 0, in_len -> in_len - 1, period 2n.
  i0 = (idx - 1).astype(np.int64) % (2 * in_len)
  i0 = np.where(i0 >= in_len, 2 * in_len - 1 - i0, i0)
  m = np.zeros((out_len, in_len))
  np.add.at(m, (np.repeat(np.arange(out_len), taps), i0.ravel()), w.ravel())
  return m


def imresize(img: np.ndarray, scale: float, antialiasing: bool = True) -> np.ndarray:
  """MATLAB `imresize(img, scale, 'bicubic')` for float images `(H, W)` or `(H, W, C)`.

  Output size is ceil(H * scale) x ceil(W * scale), float64, not rounded or clipped.
  """
  img = np.asarray(img, dtype=np.float64)
  if img.ndim not in (2, 3):
    raise ValueError(f'imresize: expected (H, W) or (H, W, C), got shape {img.shape}')
  if scale <= 0:
    raise ValueError(f'imresize: scale must be positive, got {scale}')
  h, w = img.shape[:2]
  mh = resize_matrix(h, math.ceil(h * scale), scale, antialiasing)
  mw = resize_matrix(w, math.ceil(w * scale), scale, antialiasing)
  # Height first, then width, as MATLAB (and BasicSR) do; separable so order only changes
  # floating-point rounding.
  out = np.tensordot(mh, img, axes=(1, 0))
  out = np.moveaxis(np.tensordot(mw, out, axes=(1, 1)), 0, 1)
  return out
