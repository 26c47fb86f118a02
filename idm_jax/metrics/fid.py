"""FID: pytorch-fid's InceptionV3 (pool3, 2048-d) in Flax, and the Frechet distance.

The network is the "FID Inception" of TTUR/pytorch-fid, not torchvision's InceptionV3: its
InceptionA/C/E blocks average-pool without counting padding, and the last block max-pools.
Inputs are resized to 299x299 bilinearly (no antialiasing, half-pixel centres, as
torch.nn.functional.interpolate with align_corners=False) and scaled to [-1, 1]. Weights come
from an .npz made by convert_weights.py from pt_inception-2015-12-05-6726825d.pth; there is no
fallback to random weights.
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg

from idm_jax.metrics import npz_weights
from idm_jax.models import platform_ops

INPUT_SIZE = 299
FEATURE_DIM = 2048


class BasicConv(nn.Module):
  """Conv (no bias) + inference BatchNorm (eps 1e-3) + ReLU."""

  features: int
  kernel: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    x = nn.Conv(
      self.features,
      self.kernel,
      strides=self.strides,
      padding=((ph, ph), (pw, pw)),
      use_bias=False,
      name='conv',
    )(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name='bn')(x)
    return nn.relu(x)


def _avg_pool3(x):
  # FID variant: count_include_pad=False.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool3(x, stride=2, pad=0):
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, (1, 1), name='branch1x1')(x)
    b5 = BasicConv(48, (1, 1), name='branch5x5_1')(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name='branch5x5_2')(b5)
    b3 = BasicConv(64, (1, 1), name='branch3x3dbl_1')(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(b3)
    bp = BasicConv(self.pool_features, (1, 1), name='branch_pool')(_avg_pool3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), strides=2, name='branch3x3')(x)
    bd = BasicConv(64, (1, 1), name='branch3x3dbl_1')(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = BasicConv(96, (3, 3), strides=2, name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, _max_pool3(x)], axis=-1)


class InceptionC(nn.Module):
  c7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.c7
    b1 = BasicConv(192, (1, 1), name='branch1x1')(x)
    b7 = BasicConv(c7, (1, 1), name='branch7x7_1')(x)
    b7 = BasicConv(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
    bd = BasicConv(c7, (1, 1), name='branch7x7dbl_1')(x)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(bd)
    bd = BasicConv(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(bd)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(bd)
    bp = BasicConv(192, (1, 1), name='branch_pool')(_avg_pool3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, (1, 1), name='branch3x3_1')(x)
    b3 = BasicConv(320, (3, 3), strides=2, name='branch3x3_2')(b3)
    b7 = BasicConv(192, (1, 1), name='branch7x7x3_1')(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = BasicConv(192, (3, 3), strides=2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool3(x)], axis=-1)


class InceptionE(nn.Module):
  max_pool: bool  # False: FIDInceptionE_1 (avg pool, no pad count); True: FIDInceptionE_2

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, (1, 1), name='branch1x1')(x)
    b3 = BasicConv(384, (1, 1), name='branch3x3_1')(x)
    b3 = jnp.concatenate(
      [
        BasicConv(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(b3),
        BasicConv(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(b3),
      ],
      axis=-1,
    )
    bd = BasicConv(448, (1, 1), name='branch3x3dbl_1')(x)
    bd = BasicConv(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = jnp.concatenate(
      [
        BasicConv(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(bd),
        BasicConv(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(bd),
      ],
      axis=-1,
    )
    pooled = _max_pool3(x, stride=1, pad=1) if self.max_pool else _avg_pool3(x)
    bp = BasicConv(192, (1, 1), name='branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """uint8-range float images (N, H, W, 3) in [0, 255] -> pool3 features (N, 2048)."""

  @nn.compact
  def __call__(self, x):
    n = x.shape[0]
    x = jax.image.resize(x, (n, INPUT_SIZE, INPUT_SIZE, 3), 'linear', antialias=False)
    x = x / 127.5 - 1.0
    x = BasicConv(32, (3, 3), strides=2, name='Conv2d_1a_3x3')(x)
    x = BasicConv(32, (3, 3), name='Conv2d_2a_3x3')(x)
    x = BasicConv(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)
    x = _max_pool3(x)
    x = BasicConv(80, (1, 1), name='Conv2d_3b_1x1')(x)
    x = BasicConv(192, (3, 3), name='Conv2d_4a_3x3')(x)
    x = _max_pool3(x)
    x = InceptionA(32, name='Mixed_5b')(x)
    x = InceptionA(64, name='Mixed_5c')(x)
    x = InceptionA(64, name='Mixed_5d')(x)
    x = InceptionB(name='Mixed_6a')(x)
    x = InceptionC(128, name='Mixed_6b')(x)
    x = InceptionC(160, name='Mixed_6c')(x)
    x = InceptionC(160, name='Mixed_6d')(x)
    x = InceptionC(192, name='Mixed_6e')(x)
    x = InceptionD(name='Mixed_7a')(x)
    x = InceptionE(max_pool=False, name='Mixed_7b')(x)
    x = InceptionE(max_pool=True, name='Mixed_7c')(x)
    return jnp.mean(x, axis=(1, 2))


def abstract_variables():
  """The network's variable tree as shapes (no allocation)."""
  x = jnp.zeros((1, 75, 75, 3), jnp.float32)  # any size: the input is resized to 299
  return jax.eval_shape(FIDInceptionV3().init, jax.random.PRNGKey(0), x)


@functools.lru_cache(maxsize=2)
def load(path: str) -> dict:
  """Inception variables from an .npz written by convert_weights.py (checked key by key)."""
  return npz_weights.load_variables(path, abstract_variables(), 'Inception')


@functools.cache
def _features_jit():
  # Compiled as the trainer's programs are on this backend (platform_ops.compiler_options): on
  # the CPU, XLA's own convolutions run this network about twice as fast as YNNPACK's.
  return jax.jit(
    lambda variables, x: FIDInceptionV3().apply(variables, x),
    compiler_options=platform_ops.compiler_options(jax.default_backend()),
  )


def _features(variables, x):
  return _features_jit()(variables, x)


def inception_features(
  images: Sequence[np.ndarray],
  weights: str | os.PathLike | dict,
  batch_size: int = 32,
  progress=None,
) -> np.ndarray:
  """Pool3 features (N, 2048) of uint8 RGB images (any size; each is resized to 299)."""
  variables = load(os.fspath(weights)) if not isinstance(weights, dict) else weights
  starts = range(0, len(images), batch_size)
  if progress is not None:
    starts = progress(starts)
  out = []
  for i in starts:
    batch = images[i : i + batch_size]
    if len({im.shape for im in batch}) > 1:  # mixed sizes: one at a time
      out.extend(np.asarray(_features(variables, im[None].astype(np.float32))) for im in batch)
    else:
      out.append(np.asarray(_features(variables, np.stack(batch).astype(np.float32))))
  return np.concatenate(out, axis=0).astype(np.float64)


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and covariance (N-1 normalised, as pytorch-fid) of (N, D) features."""
  if features.shape[0] < 2:
    raise ValueError(f'FID needs at least 2 images per set, got {features.shape[0]}')
  return features.mean(axis=0), np.cov(features, rowvar=False)


def _zero_below_rounding(w: np.ndarray) -> np.ndarray:
  """A PSD matrix's eigenvalues with those a symmetric eigensolver cannot tell from 0 set to 0.

  The solver returns each eigenvalue to within about n * eps * max|w|, so the null space of a
  rank-deficient covariance (fewer images than feature dimensions) comes back as values of that
  size and either sign; their square roots, sqrt(eps) each rather than eps, would add up to a
  visible bias in tr((S1 S2)^(1/2)).
  """
  floor = w.size * np.finfo(w.dtype).eps * np.abs(w).max(initial=0.0)
  return np.where(w > floor, w, 0.0)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
  w, v = linalg.eigh(s)
  return (v * np.sqrt(_zero_below_rounding(w))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians.

  tr((S1 S2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the symmetric
  PSD matrix S1^(1/2) S2 S1^(1/2) (similar to S1 S2), which avoids scipy.linalg.sqrtm's complex
  round-off on near-singular covariances.
  """
  mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
  sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(
      f'frechet_distance: shapes differ, {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}'
    )
  r = _psd_sqrt(sigma1)
  m = r @ sigma2 @ r
  eig = _zero_below_rounding(linalg.eigvalsh((m + m.T) / 2))
  diff = mu1 - mu2
  d = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(eig).sum()
  # Equal sets give 0 up to rounding, which may fall on either side; a distance is never < 0.
  return float(max(d, 0.0))


def fid_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
  return frechet_distance(*statistics(f1), *statistics(f2))
