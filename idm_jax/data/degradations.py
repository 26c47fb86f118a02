"""The blind degradation model: HQ face -> LQ face (docs/DESIGN.md, the method, point 1).

GFPGAN's FFHQ degradation with BasicSR's kernel convention:

  LQ = jitter(gray(shift(up(JPEG_q(clip(down_s(k * HQ) + n_sigma))))))

Everything random is drawn once by `sample_params` into a plain JSON-serialisable dict; `apply`
is a pure function of (image, params), so a recorded params.jsonl replays byte for byte.

Numerics: float32 in [0, 1] throughout, as BasicSR. The blur is a correlation with reflect-101
borders: cv2.filter2D for anisotropic kernels, cv2.sepFilter2D for isotropic ones (see `blur`).
Every stage is numpy or OpenCV code whose per-pixel arithmetic does not depend on the number of
threads, so the output bytes do not either.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

JITTER_OPS = ('brightness', 'contrast', 'saturation', 'hue')
_TINY_TAP = 1e-30

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

  hue_range = _pair(cfg, 'hue')
  if not -0.5 <= hue_range[0] <= hue_range[1] <= 0.5:
    raise ValueError(f'degradation.hue: {hue_range} must lie in [-0.5, 0.5] (turns)')

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
    'jitter': (
      {'order': [JITTER_OPS[i] for i in order], **{op: float(f) for op, f in factors.items()}}
      if jitter_on
      else None
    ),
    'flip': bool(flip),
  }


def make_kernel(
  kernel_type: str, sigma_x: float, sigma_y: float, theta: float, kernel_size: int
) -> np.ndarray:
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


def gaussian_1d(sigma: float, kernel_size: int) -> np.ndarray:
  """The normalised 1-D Gaussian g with make_kernel('iso', sigma, ...) == outer(g, g)."""
  r = kernel_size // 2
  ax = np.arange(-r, r + 1, dtype=np.float64)
  g = np.exp(-0.5 * ax * ax / (sigma * sigma))
  return g / g.sum()


def blur(img: np.ndarray, params: dict) -> np.ndarray:
  """Correlation of float32 (H, W, 3) `img` with the params' kernel, reflect-101 borders.

  Anisotropic kernels go through cv2.filter2D with make_kernel's kernel (an FFT for 41x41),
  exactly as BasicSR. Isotropic kernels are outer(g, g), so they go through cv2.sepFilter2D,
  several times faster. The two agree to float32 rounding, which now and then tips a rounding
  to uint8 before the JPEG (and JPEG spreads a one-level change over its 8x8 block): almost
  always byte-identical to BasicSR's all-filter2D pipeline (docs/PERFORMANCE.md has the share).
  """
  if params['kernel_type'] == 'iso':
    g = gaussian_1d(float(params['sigma_x']), int(params['kernel_size']))
    # Taps below 1e-30 would be float32 subnormals (or make subnormal products), which run
    # ~6x slower on x86; they change no sum above 1e-23, so drop them.
    g = np.where(g < _TINY_TAP, 0.0, g).astype(np.float32)
    return cv2.sepFilter2D(img, -1, g, g, borderType=cv2.BORDER_REFLECT_101)
  kernel = make_kernel(
    params['kernel_type'],
    params['sigma_x'],
    params['sigma_y'],
    params['theta'],
    int(params['kernel_size']),
  )
  return cv2.filter2D(img, -1, kernel.astype(np.float32), borderType=cv2.BORDER_REFLECT_101)


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
  """float32 RGB [0, 1] -> libjpeg at integer `quality` -> float32 RGB [0, 1]."""
  u8 = np.rint(img * np.float32(255)).astype(np.uint8)
  ok, buf = cv2.imencode(
    '.jpg', cv2.cvtColor(u8, cv2.COLOR_RGB2BGR), [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)]
  )
  if not ok:
    raise RuntimeError(f'OpenCV failed to JPEG-encode a {u8.shape} image at quality {quality}')
  dec = cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
  return dec.astype(np.float32) / np.float32(255)


def _tv_gray(img: np.ndarray) -> np.ndarray:
  """torchvision's rgb_to_grayscale of float32 RGB (H, W, 3) -> (H, W, 1)."""
  return cv2.transform(img, _TV_GRAY)[:, :, None]


def _blend(a: np.ndarray, b, ratio: float) -> np.ndarray:
  """torchvision's _blend, clamp(ratio * a + (1 - ratio) * b, 0, 1), written into `a`."""
  r = np.float32(ratio)
  a *= r
  a += (np.float32(1) - r) * b
  return np.clip(a, 0, 1, out=a)


def _adjust_hue(img: np.ndarray, factor: float) -> np.ndarray:
  """Rotates hue by `factor` turns in HSV, as torchvision.adjust_hue (factor in [-0.5, 0.5])."""
  # One fresh array, updated in place: fresh large arrays cost more than the arithmetic here.
  hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)  # float32: hue in degrees [0, 360)
  hue = hsv[:, :, 0]
  hue += np.float32(factor * 360.0)
  # Wrap into [0, 360): a mod for |factor| <= 1/2, without np.mod's cost.
  np.subtract(hue, np.float32(360), out=hue, where=hue >= 360)
  np.add(hue, np.float32(360), out=hue, where=hue < 0)
  out = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB, dst=hsv)
  return np.clip(out, 0, 1, out=out)


def _jitter(img: np.ndarray, jitter: dict, inplace: bool = False) -> np.ndarray:
  """Brightness/contrast/saturation/hue with torchvision semantics, in jitter['order'].

  With inplace=True `img` may be overwritten (apply owns its intermediate arrays).
  """
  if not inplace:
    img = img.copy()
  for op in jitter['order']:
    f = float(jitter[op])
    if op == 'brightness':  # blend with black
      img = _blend(img, np.float32(0), f)
    elif op == 'contrast':  # blend with the mean gray level (computed before img changes)
      img = _blend(img, np.float32(_tv_gray(img).mean(dtype=np.float64)), f)
    elif op == 'saturation':  # blend with the grayscale image
      img = _blend(img, _tv_gray(img), f)
    elif op == 'hue':
      if not -0.5 <= f <= 0.5:
        raise ValueError(f'jitter hue factor {f} is outside [-0.5, 0.5]')
      img = _adjust_hue(img, f)
    else:
      raise ValueError(f'jitter order names an unknown op {op!r}; known: {JITTER_OPS}')
  return img


# The keys apply() needs ('flip' is optional there: degrade_pair and make_testset act on it).
PARAM_KEYS = (
  'kernel_type',
  'sigma_x',
  'sigma_y',
  'theta',
  'kernel_size',
  'scale',
  'noise_sigma',
  'noise_seed',
  'jpeg_quality',
  'color_shift',
  'gray',
  'jitter',
)


def _check_inputs(hq: np.ndarray, params: dict):
  if not isinstance(hq, np.ndarray) or hq.dtype != np.uint8 or hq.ndim != 3 or hq.shape[2] != 3:
    desc = f'{hq.dtype} {hq.shape}' if isinstance(hq, np.ndarray) else type(hq).__name__
    raise ValueError(f'degradations.apply needs a uint8 (H, W, 3) RGB image, got {desc}')
  missing = [k for k in PARAM_KEYS if k not in params]
  if missing:
    raise KeyError(f'degradation params lack {missing}; got keys {sorted(params)}')


def apply(hq: np.ndarray, params: dict) -> np.ndarray:
  """Degrades uint8 RGB (H, W, 3) `hq` with `params` (from sample_params) -> uint8 LQ, same size.

  Order: blur -> bilinear down to (int(w // s), int(h // s)) -> + Gaussian noise, clip ->
  JPEG -> bilinear up to (w, h) -> colour shift -> grayscale -> jitter -> round to uint8.
  Does not flip: `degrade_pair` flips the pair. params['identity'] (optional) returns a copy
  of `hq`: the mild share's undamaged pairs.
  """
  _check_inputs(hq, params)
  if params.get('identity'):
    return hq.copy()
  h, w = hq.shape[:2]
  img = np.divide(hq, np.float32(255), dtype=np.float32)

  img = blur(img, params)

  s = float(params['scale'])
  # INTER_LINEAR without antialias, half-pixel centres, as BasicSR/GFPGAN.
  small = (max(1, int(w // s)), max(1, int(h // s)))
  img = cv2.resize(img, small, interpolation=cv2.INTER_LINEAR)

  noise = np.random.default_rng(int(params['noise_seed'])).standard_normal(
    img.shape, dtype=np.float32
  )
  noise *= np.float32(float(params['noise_sigma']) / 255.0)
  noise += img
  img = np.clip(noise, 0, 1, out=noise)

  img = _jpeg(img, int(params['jpeg_quality']))
  img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)

  if params['color_shift'] is not None:
    shift = np.asarray(params['color_shift'], np.float32).reshape(3)
    img += shift  # img is our own array from here on: update in place
    np.clip(img, 0, 1, out=img)
  if params['gray']:
    img = np.repeat(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[:, :, None], 3, axis=2)
  if params['jitter'] is not None:
    img = _jitter(img, params['jitter'], inplace=True)

  # = rint(clip(255 x, 0, 255)) (round half to even, saturating), in one pass. Its abs() is a
  # no-op: every stage above keeps values >= 0.
  return cv2.convertScaleAbs(img, alpha=255.0)


def mild_config(cfg) -> dict:
  """`cfg` with its damage ranges replaced by `cfg.mild`'s and its colour changes off."""
  mild = _get(cfg, 'mild')
  merged = {k: cfg[k] for k in cfg.keys() if k not in ('mild',)}
  merged.update({k: _get(mild, k) for k in ('blur_sigma', 'scale', 'noise_sigma', 'jpeg_quality')})
  merged.update(color_shift_prob=0.0, gray_prob=0.0, jitter_prob=0.0)
  return merged


def degrade_pair(
  hq: np.ndarray, rng: np.random.Generator, cfg
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
  """Samples params and returns (hq, lq, params), both flipped when params['flip'].

  With probability cfg.mild_share the draw uses the mild ranges (`mild_config`), and a mild
  draw is no degradation at all (params['identity'], LQ = HQ) with probability
  cfg.mild.identity_prob. With mild_share 0 no extra draw is made, so the stream of pairs is the
  one every earlier run saw.

  The HQ is flipped before degrading (as GFPGAN), so apply(returned_hq, params) reproduces the
  returned LQ exactly.
  """
  mild_share = float(cfg.get('mild_share', 0.0))
  identity = False
  if mild_share > 0 and rng.random() < mild_share:
    identity = rng.random() < float(_get(_get(cfg, 'mild'), 'identity_prob'))
    cfg = mild_config(cfg)
  params = sample_params(rng, cfg, hq.shape[1])
  params['identity'] = identity
  if params['flip']:
    hq = np.ascontiguousarray(hq[:, ::-1])
  return hq, apply(hq, params), params
