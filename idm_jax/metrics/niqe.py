"""NIQE (Mittal et al., "Making a 'Completely Blind' Image Quality Analyzer", 2013).

The MATLAB-equivalent definition that BasicSR reproduces: Y of MATLAB's rgb2ycbcr rounded to
integers in [0, 255], cropped to whole 96x96 blocks, MSCN-normalised with a 7x7 Gaussian window
(replicate borders), 18 AGGD features per block at full scale and 18 more at half scale (MATLAB
bicubic imresize with antialiasing), a multivariate Gaussian fitted to the block features and
its distance to the pristine model. Lower is better.

The image, its MSCN coefficients and the half-scale image are float32, as in BasicSR: flat
(saturated) regions give MSCN values that are pure rounding noise, and which side of zero they
fall on moves the score by a few percent, so the precision is part of the definition. With it
we reproduce BasicSR's values to 4 digits.

All blocks are processed at once (stacked into one array), so a 512x512 image takes well under
a second, which matters when NIQE ranks a whole dataset for cleaning.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os

import numpy as np
from scipy import ndimage
from scipy.special import gamma

from idm_jax.metrics import matlab
from idm_jax.metrics import resize
from idm_jax.storage import files

BLOCK = 96
MIN_SIZE = 2 * BLOCK  # NIQE's covariance needs several blocks; MATLAB's niqe demands this too


@dataclasses.dataclass(frozen=True)
class NiqeParams:
  """The pristine multivariate Gaussian (36-d) and the 7x7 normalisation window."""

  mu: np.ndarray  # (36,)
  cov: np.ndarray  # (36, 36)
  window: np.ndarray  # (7, 7)


# The pristine model of the NIQE authors' MATLAB release (modelparameters.mat, Mittal et al.
# 2013), as BasicSR redistributes it; shipped as package data so NIQE works on any folder.
DEFAULT_PARAMS_FILE = 'niqe_pris_params.npz'


def default_params_path() -> str:
  """The shipped pristine parameters (the default wherever a NIQE parameters file is optional)."""
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), DEFAULT_PARAMS_FILE)


def load_default() -> NiqeParams:
  return load_niqe_params(default_params_path())


def load_niqe_params(path: str | os.PathLike) -> NiqeParams:
  """Loads pristine parameters from an .npz with keys mu_pris_param, cov_pris_param,
  gaussian_window (BasicSR's niqe_pris_params.npz, converted from MATLAB's modelparameters.mat).
  """
  path = os.fspath(path)
  if not files.isfile(path):
    raise FileNotFoundError(f'NIQE parameters file {path!r} does not exist')
  try:
    with np.load(io.BytesIO(files.read_bytes(path)), allow_pickle=False) as d:
      arrays = {k: np.asarray(d[k], dtype=np.float64) for k in d.files}
  except Exception as e:  # zip or npy format errors come in many types
    raise ValueError(f'NIQE parameters file {path!r} is not a readable .npz: {e}') from e
  need = ('mu_pris_param', 'cov_pris_param', 'gaussian_window')
  missing = [k for k in need if k not in arrays]
  if missing:
    raise ValueError(f'NIQE parameters file {path!r} lacks keys {missing} (has {sorted(arrays)})')
  mu = arrays['mu_pris_param'].reshape(-1)
  cov, window = arrays['cov_pris_param'], arrays['gaussian_window']
  if mu.shape != (36,) or cov.shape != (36, 36) or window.ndim != 2:
    raise ValueError(
      f'NIQE parameters file {path!r} has wrong shapes: mu_pris_param '
      f'{arrays["mu_pris_param"].shape} (want 36 values), cov_pris_param '
      f'{cov.shape} (want (36, 36)), gaussian_window {window.shape} (want 2-D)'
    )
  return NiqeParams(mu=mu, cov=cov, window=window)


@functools.lru_cache(maxsize=1)
def _gamma_table() -> tuple[np.ndarray, np.ndarray]:
  """The shape grid of the AGGD moment-matching search and its ratio r(gamma)."""
  gam = np.arange(0.2, 10.001, 0.001)
  r_gam = gamma(2 / gam) ** 2 / (gamma(1 / gam) * gamma(3 / gam))
  return gam, r_gam


def aggd_params(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Asymmetric generalised Gaussian fit (alpha, beta_l, beta_r) per row of `x` (N, M).

  Moment matching over the same 0.001-spaced shape grid as the reference. A row with no
  negative (or no positive) values gives NaN, which the model fit later skips, as in MATLAB.
  """
  gam, r_gam = _gamma_table()
  neg, pos = x < 0, x > 0
  with np.errstate(invalid='ignore', divide='ignore'):
    left_std = np.sqrt((np.where(neg, x, 0) ** 2).sum(1) / neg.sum(1))
    right_std = np.sqrt((np.where(pos, x, 0) ** 2).sum(1) / pos.sum(1))
    gammahat = left_std / right_std
    rhat = np.mean(np.abs(x), 1) ** 2 / np.mean(x**2, 1)
    rhatnorm = rhat * (gammahat**3 + 1) * (gammahat + 1) / (gammahat**2 + 1) ** 2
  # argmin over the grid per row; (N, 9801) is small (a few hundred rows at most per image).
  # A NaN row gives index 0 (alpha 0.2) with NaN betas, exactly like the reference.
  pos_idx = np.argmin((r_gam[None, :] - rhatnorm[:, None]) ** 2, axis=1)
  alpha = gam[pos_idx]
  factor = np.sqrt(gamma(1 / alpha) / gamma(3 / alpha))
  return alpha, left_std * factor, right_std * factor


def block_features(blocks: np.ndarray) -> np.ndarray:
  """The 18 NIQE features of each MSCN block: (N, h, w) -> (N, 18)."""
  n = blocks.shape[0]
  alpha, bl, br = aggd_params(blocks.reshape(n, -1))
  feats = [alpha, (bl + br) / 2]
  # Products of neighbours (horizontal, vertical, two diagonals), with circular shifts inside
  # each block as the reference does.
  for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):
    prod = blocks * np.roll(blocks, shift, axis=(1, 2))
    alpha, bl, br = aggd_params(prod.reshape(n, -1))
    mean = (br - bl) * gamma(2 / alpha) / gamma(1 / alpha)
    feats += [alpha, mean, bl, br]
  return np.stack(feats, axis=1)


def _mscn(img: np.ndarray, window: np.ndarray) -> np.ndarray:
  """Mean-subtracted contrast-normalised coefficients (Eq. 1), replicate borders."""
  mu = ndimage.correlate(img, window, mode='nearest')
  sigma = np.sqrt(np.abs(ndimage.correlate(img * img, window, mode='nearest') - mu * mu))
  return (img - mu) / (sigma + 1)


def _to_blocks(img: np.ndarray, bh: int, bw: int) -> np.ndarray:
  """(nh*bh, nw*bw) -> (nh*nw, bh, bw), non-overlapping tiles."""
  nh, nw = img.shape[0] // bh, img.shape[1] // bw
  return img[: nh * bh, : nw * bw].reshape(nh, bh, nw, bw).transpose(0, 2, 1, 3).reshape(-1, bh, bw)


def niqe_y(y: np.ndarray, params: NiqeParams) -> float:
  """NIQE of a luminance image `(H, W)` as float in [0, 255] (already rounded if desired)."""
  y = np.asarray(y)
  if y.ndim != 2:
    raise ValueError(f'niqe_y: expected a luminance image (H, W), got shape {y.shape}')
  y = y.astype(np.float32)  # see the module docstring: float32 is part of the definition
  h, w = y.shape
  if h < MIN_SIZE or w < MIN_SIZE:
    raise ValueError(
      f'NIQE needs images of at least {MIN_SIZE}x{MIN_SIZE} pixels, got {h}x{w} '
      '(upscale small faces first, e.g. niqe_upscale=2)'
    )
  nh, nw = h // BLOCK, w // BLOCK
  img = y[: nh * BLOCK, : nw * BLOCK]
  feats = []
  for scale in (1, 2):
    feats.append(
      block_features(_to_blocks(_mscn(img, params.window), BLOCK // scale, BLOCK // scale))
    )
    if scale == 1:
      img = matlab.imresize(img / 255.0, 0.5, antialiasing=True).astype(np.float32) * 255.0
  feats = np.concatenate(feats, axis=1).astype(np.float64)  # (blocks, 36)
  mu = np.nanmean(feats, axis=0)
  cov = np.cov(feats[~np.isnan(feats).any(axis=1)], rowvar=False)
  diff = params.mu - mu
  quality = diff @ np.linalg.pinv((params.cov + cov) / 2) @ diff
  return float(np.sqrt(quality))


def niqe_score(img: np.ndarray, params: NiqeParams | str | os.PathLike) -> float:
  """NIQE of a uint8 RGB image `(H, W, 3)` (lower is better); `params` may be a path."""
  if not isinstance(params, NiqeParams):
    params = load_niqe_params(params)
  img = np.asarray(img)
  if img.ndim != 3 or img.shape[-1] != 3:
    raise ValueError(f'niqe_score: expected an RGB image (H, W, 3), got shape {img.shape}')
  # MATLAB converts uint8 -> Y as uint8, i.e. rounded; the reference values depend on it.
  return niqe_y(np.round(matlab.rgb_to_y(img)), params)


def upscale_for(size: int) -> int:
  """The smallest integer Lanczos upscale that brings `size` px to NIQE's minimum (2 for 128)."""
  return resize.factor_to_reach(size, MIN_SIZE)
