"""The blind degradation model: HQ face -> LQ face (DESIGN.md, point 1).

GFPGAN's FFHQ degradation with BasicSR's kernel convention:

  LQ = jitter(gray(shift(up(JPEG_q(clip(down_s(k * HQ) + n_sigma))))))

Everything random is drawn once by `sample_params` into a plain JSON-serialisable dict; `apply`
is a pure function of (image, params), so a recorded params.jsonl replays byte for byte.

Numerics: float32 in [0, 1] throughout, as BasicSR. The blur is a correlation with reflect-101
borders (what cv2.filter2D does by default), computed as one real FFT of the reflect-padded image
(scipy.fft, single thread). It agrees with cv2.filter2D to ~1e-7 (both are FFT-based in float32
for a 41x41 kernel, with different tilings) and takes about half its time. Every stage runs
single-threaded code or OpenCV row-parallel code, so the output bytes do not depend on the
number of threads.
"""
from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np
import scipy.fft

JITTER_OPS = ('brightness', 'contrast', 'saturation', 'hue')

# torchvision's rgb_to_grayscale weights, used by its adjust_contrast / adjust_saturation.
_TV_GRAY = np.array([[0.2989, 0.587, 0.114]], np.float32)


def _get(cfg, name: str):
  """cfg[name] for a ConfigDict or a plain dict, with an error naming the field."""
  try:
    return cfg[name]
  except (KeyError, AttributeError) as e:
    raise KeyError(f'degradation config has no field {name!r}') from e


def _pair(cfg, name: str) -> tuple[float, float]:
  lo, hi = _get(cfg, name)
  if lo > hi:
    raise ValueError(f'degradation.{name}: low {lo} > high {hi}')
  return float(lo), float(hi)


def sample_params(rng: np.random.Generator, cfg, size: int) -> dict:
  """Draws one degradation from the ranges in `cfg` (configlib.degradation_config).

  Args:
    rng: the only source of randomness. Every call consumes the same number of draws whatever
      the probabilities, so changing e.g. gray_prob does not reshuffle the other draws.
    cfg: degradation config (ConfigDict or dict).
    size: HQ width in pixels; the scale is capped at `size` so the LQ keeps at least 1 pixel.

  Returns:
    A JSON-serialisable dict of python scalars (see module docstring and `apply`).
  """
  kernel_size = int(_get(cfg, 'kernel_size'))
  if kernel_size < 1 or kernel_size % 2 != 1:
    raise ValueError(f'degradation.kernel_size: {kernel_size} must be a positive odd number')
  blur_sigma = _pair(cfg, 'blur_sigma')
  if blur_sigma[0] <= 0:
    raise ValueError(f'degradation.blur_sigma: {blur_sigma} must be > 0')
  scale_range = _pair(cfg, 'scale')
  if scale_range[0] <= 0:
    raise ValueError(f'degradation.scale: {scale_range} must be > 0')
  q_lo, q_hi = (int(q) for q in _pair(cfg, 'jpeg_quality'))
  if not 1 <= q_lo <= q_hi <= 100:
    raise ValueError(f'degradation.jpeg_quality: ({q_lo}, {q_hi}) must lie in [1, 100]')

  # A fixed sequence of draws (see Args).
  iso = rng.random() < float(_get(cfg, 'iso_prob'))
  sigma_x = rng.uniform(*blur_sigma)
  sigma_y = rng.uniform(*blur_sigma)
  theta = rng.uniform(-math.pi, math.pi)
  scale = rng.uniform(*scale_range)
  noise_sigma = rng.uniform(*_pair(cfg, 'noise_sigma'))
  noise_seed = rng.integers(0, 2**32)
  jpeg_quality = rng.integers(q_lo, q_hi + 1)  # both ends included
  shift_on = rng.random() < float(_get(cfg, 'color_shift_prob'))
  shift_max = float(_get(cfg, 'color_shift'))
  shift = rng.uniform(-shift_max, shift_max, 3) / 255.0
  gray = rng.random() < float(_get(cfg, 'gray_prob'))
  jitter_on = rng.random() < float(_get(cfg, 'jitter_prob'))
  order = rng.permutation(len(JITTER_OPS))
  factors = {op: rng.uniform(*_pair(cfg, op)) for op in JITTER_OPS}
  flip = rng.random() < float(_get(cfg, 'flip_prob'))

  if iso:
    sigma_y, theta = sigma_x, 0.0
  return {
      'kernel_type': 'iso' if iso else 'aniso',
      'sigma_x': float(sigma_x),
      'sigma_y': float(sigma_y),
      'theta': float(theta),
      'kernel_size': kernel_size,
      'scale': float(min(scale, size)),
      'noise_sigma': float(noise_sigma),
      'noise_seed': int(noise_seed),
      'jpeg_quality': int(jpeg_quality),
      'color_shift': [float(s) for s in shift] if shift_on else None,
      'gray': bool(gray),
      'jitter': ({'order': [JITTER_OPS[i] for i in order],
                  **{op: float(f) for op, f in factors.items()}} if jitter_on else None),
      'flip': bool(flip),
  }


def make_kernel(kernel_type: str, sigma_x: float, sigma_y: float, theta: float,
                kernel_size: int) -> np.ndarray:
  """BasicSR's bivariate Gaussian blur kernel, (k, k) float64, sums to 1.

  Sigma = R(theta) diag(sx^2, sy^2) R(theta)^T with R = [[cos, -sin], [sin, cos]];
  k[v, u] ∝ exp(-1/2 [u v] Sigma^-1 [u v]^T) for column offset u and row offset v in -r..r.
  'iso' ignores sigma_y and theta.
  """
  if kernel_type not in ('iso', 'aniso'):
    raise ValueError(f"kernel_type {kernel_type!r} is not 'iso' or 'aniso'")
  if kernel_size < 1 or kernel_size % 2 != 1:
    raise ValueError(f'kernel_size {kernel_size} must be a positive odd number')
  if kernel_type == 'iso':
    sigma_y, theta = sigma_x, 0.0
  if not (sigma_x > 0 and sigma_y > 0):
    raise ValueError(f'blur sigmas must be > 0, got sigma_x={sigma_x}, sigma_y={sigma_y}')
  c, s = math.cos(theta), math.sin(theta)
  rot = np.array([[c, -s], [s, c]])
  inv = np.linalg.inv(rot @ np.diag([sigma_x**2, sigma_y**2]) @ rot.T)
  r = kernel_size // 2
  ax = np.arange(-r, r + 1, dtype=np.float64)
  u, v = ax[None, :], ax[:, None]
  k = np.exp(-0.5 * (inv[0, 0] * u * u + (inv[0, 1] + inv[1, 0]) * u * v + inv[1, 1] * v * v))
  return k / k.sum()


def blur(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
  """Correlation of float32 (H, W, C) `img` with `kernel`, reflect-101 borders, float32 out.

  Same maths as cv2.filter2D(img, -1, kernel) (to ~1e-7: both use float32 FFTs), via one
  real FFT per channel at a size pocketfft likes.
  """
  kh, kw = kernel.shape
  ry, rx = kh // 2, kw // 2
  h, w = img.shape[:2]
  shape = (scipy.fft.next_fast_len(h + 2 * ry, real=True),
           scipy.fft.next_fast_len(w + 2 * rx, real=True))
  # Pad straight to the FFT size. Output p reads padded rows p..p+2r only, so for p < h the
  # extra reflected rows/cols past h + 2r never reach the kept outputs (nor wrap around).
  # One contiguous plane per channel (pocketfft is fastest on contiguous rows), padded in place.
  channels = cv2.split(img) if img.ndim == 3 else [img]
  planes = np.empty((len(channels),) + shape, np.float32)
  for c, ch in enumerate(channels):
    cv2.copyMakeBorder(ch, ry, shape[0] - h - ry, rx, shape[1] - w - rx,
                       cv2.BORDER_REFLECT_101, dst=planes[c])
  # Circular correlation: out[p] = sum_j k[j] x[p + j] = IFFT(X conj(K)). The kernel's
  # spectrum skips the transforms of its all-zero padding rows (same bytes as rfft2(k, s)).
  spec = scipy.fft.rfft2(planes)
  k_spec = scipy.fft.fft(scipy.fft.rfft(kernel.astype(np.float32), n=shape[1], axis=1),
                         n=shape[0], axis=0)
  spec *= np.conj(k_spec)
  out = scipy.fft.irfft2(spec, s=shape, overwrite_x=True)[:, :h, :w]
  return cv2.merge(list(out)) if out.shape[0] > 1 else out[0][:, :, None]


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
  """float32 RGB [0, 1] -> libjpeg at integer `quality` -> float32 RGB [0, 1]."""
  u8 = np.rint(img * np.float32(255)).astype(np.uint8)
  ok, buf = cv2.imencode('.jpg', cv2.cvtColor(u8, cv2.COLOR_RGB2BGR),
                         [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
  if not ok:
    raise RuntimeError(f'OpenCV failed to JPEG-encode a {u8.shape} image at quality {quality}')
  dec = cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
  return dec.astype(np.float32) / np.float32(255)


def _tv_gray(img: np.ndarray) -> np.ndarray:
  """torchvision's rgb_to_grayscale of float32 RGB (H, W, 3) -> (H, W, 1)."""
  return cv2.transform(img, _TV_GRAY)[:, :, None]


def _blend(a: np.ndarray, b, ratio: float) -> np.ndarray:
  """torchvision's _blend: clamp(ratio * a + (1 - ratio) * b, 0, 1)."""
  r = np.float32(ratio)
  return np.clip(r * a + (np.float32(1) - r) * b, 0, 1)


def _adjust_hue(img: np.ndarray, factor: float) -> np.ndarray:
  """Rotates hue by `factor` turns in HSV, as torchvision.adjust_hue (factor in [-0.5, 0.5])."""
  hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)  # float32: H in degrees [0, 360)
  hsv[:, :, 0] = np.mod(hsv[:, :, 0] + np.float32(factor * 360.0), np.float32(360))
  return np.clip(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), 0, 1)


def _jitter(img: np.ndarray, jitter: dict) -> np.ndarray:
  """Brightness/contrast/saturation/hue with torchvision semantics, in jitter['order']."""
  for op in jitter['order']:
    f = float(jitter[op])
    if op == 'brightness':  # blend with black
      img = _blend(img, np.float32(0), f)
    elif op == 'contrast':  # blend with the mean gray level
      img = _blend(img, np.float32(_tv_gray(img).mean(dtype=np.float64)), f)
    elif op == 'saturation':  # blend with the grayscale image
      img = _blend(img, _tv_gray(img), f)
    elif op == 'hue':
      img = _adjust_hue(img, f)
    else:
      raise ValueError(f'jitter order names an unknown op {op!r}; known: {JITTER_OPS}')
  return img


_REQUIRED = ('kernel_type', 'sigma_x', 'sigma_y', 'theta', 'kernel_size', 'scale', 'noise_sigma',
             'noise_seed', 'jpeg_quality', 'color_shift', 'gray', 'jitter')


def _check_inputs(hq: np.ndarray, params: dict):
  if not isinstance(hq, np.ndarray) or hq.dtype != np.uint8 or hq.ndim != 3 or hq.shape[2] != 3:
    desc = f'{hq.dtype} {hq.shape}' if isinstance(hq, np.ndarray) else type(hq).__name__
    raise ValueError(f'degradations.apply needs a uint8 (H, W, 3) RGB image, got {desc}')
  missing = [k for k in _REQUIRED if k not in params]
  if missing:
    raise KeyError(f'degradation params lack {missing}; got keys {sorted(params)}')


def apply(hq: np.ndarray, params: dict) -> np.ndarray:
  """Degrades uint8 RGB (H, W, 3) `hq` with `params` (from sample_params) -> uint8 LQ, same size.

  Order: blur -> bilinear down to (int(w // s), int(h // s)) -> + Gaussian noise, clip ->
  JPEG -> bilinear up to (w, h) -> colour shift -> grayscale -> jitter -> round to uint8.
  Does not flip: `degrade_pair` flips the pair.
  """
  _check_inputs(hq, params)
  h, w = hq.shape[:2]
  img = hq.astype(np.float32) / np.float32(255)

  kernel = make_kernel(params['kernel_type'], params['sigma_x'], params['sigma_y'],
                       params['theta'], int(params['kernel_size']))
  img = blur(img, kernel)

  s = float(params['scale'])
  # INTER_LINEAR without antialias, half-pixel centres, as BasicSR/GFPGAN.
  small = (max(1, int(w // s)), max(1, int(h // s)))
  img = cv2.resize(img, small, interpolation=cv2.INTER_LINEAR)

  noise = np.random.default_rng(int(params['noise_seed'])).standard_normal(
      img.shape, dtype=np.float32)
  img = np.clip(img + noise * np.float32(float(params['noise_sigma']) / 255.0), 0, 1)

  img = _jpeg(img, int(params['jpeg_quality']))
  img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)

  if params['color_shift'] is not None:
    shift = np.asarray(params['color_shift'], np.float32).reshape(3)
    img = np.clip(img + shift, 0, 1)
  if params['gray']:
    img = np.repeat(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[:, :, None], 3, axis=2)
  if params['jitter'] is not None:
    img = _jitter(img, params['jitter'])

  return np.rint(np.clip(img * np.float32(255), 0, 255)).astype(np.uint8)


def degrade_pair(hq: np.ndarray, rng: np.random.Generator,
                 cfg) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
  """Samples params and returns (hq, lq, params), both flipped when params['flip'].

  The HQ is flipped before degrading (as GFPGAN), so apply(returned_hq, params) reproduces the
  returned LQ exactly.
  """
  params = sample_params(rng, cfg, hq.shape[1])
  if params['flip']:
    hq = np.ascontiguousarray(hq[:, ::-1])
  return hq, apply(hq, params), params
