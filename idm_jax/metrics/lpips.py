"""LPIPS (Zhang et al., CVPR 2018), VGG16 variant, in Flax.

Learned perceptual distance: VGG16 activations at relu1_2, relu2_2, relu3_3, relu4_3 and
relu5_3 of both images, each unit-normalised along channels, squared differences weighted per
channel by the learned linear layers, averaged over space and summed over the five layers.
Lower is more similar. Weights come from an .npz made by convert_weights.py from torchvision's
vgg16 and LPIPS's vgg.pth (v0.1); there is no fallback to random weights.
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from idm_jax.metrics import npz_weights
from idm_jax.models import platform_ops

# (name, out channels) of VGG16's conv layers, grouped into the five LPIPS slices.
VGG_SLICES = (
  (('conv1_1', 64), ('conv1_2', 64)),
  (('conv2_1', 128), ('conv2_2', 128)),
  (('conv3_1', 256), ('conv3_2', 256), ('conv3_3', 256)),
  (('conv4_1', 512), ('conv4_2', 512), ('conv4_3', 512)),
  (('conv5_1', 512), ('conv5_2', 512), ('conv5_3', 512)),
)
CHANNELS = tuple(s[-1][1] for s in VGG_SLICES)
# LPIPS's ScalingLayer: ImageNet mean/std expressed for inputs in [-1, 1].
_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
_SCALE = np.array([0.458, 0.448, 0.450], np.float32)
_EPS = 1e-10


class VGG16Features(nn.Module):
  """The five ReLU feature maps LPIPS compares (NHWC, float)."""

  @nn.compact
  def __call__(self, x):
    feats = []
    for i, block in enumerate(VGG_SLICES):
      if i > 0:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      for name, ch in block:
        x = nn.relu(nn.Conv(ch, (3, 3), padding=((1, 1), (1, 1)), name=name)(x))
      feats.append(x)
    return feats


def normalize(f: jnp.ndarray) -> jnp.ndarray:
  """Unit length along channels (LPIPS's normalize_tensor)."""
  return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + _EPS)


def distance_from_features(
  feats0: Sequence[jnp.ndarray], feats1: Sequence[jnp.ndarray], lins: Sequence[jnp.ndarray]
) -> jnp.ndarray:
  """LPIPS from per-layer features (N, H, W, C) and per-layer channel weights (C,) -> (N,)."""
  total = 0.0
  for f0, f1, w in zip(feats0, feats1, lins):
    d = (normalize(f0) - normalize(f1)) ** 2
    total = total + jnp.mean(jnp.sum(d * w, axis=-1), axis=(1, 2))
  return total


class LPIPS(nn.Module):
  """LPIPS distance between two batches of images in [-1, 1] (N, H, W, 3) -> (N,)."""

  @nn.compact
  def __call__(self, x0, x1):
    vgg = VGG16Features(name='vgg')
    lins = [self.param(f'lin{i}', nn.initializers.ones, (c,)) for i, c in enumerate(CHANNELS)]
    x = jnp.concatenate([x0, x1], axis=0)
    feats = vgg((x - _SHIFT) / _SCALE)
    n = x0.shape[0]
    return distance_from_features([f[:n] for f in feats], [f[n:] for f in feats], lins)


def abstract_variables(size: int = 64):
  """The model's variable tree as shapes, for checking weight files without allocating."""
  x = jnp.zeros((1, size, size, 3), jnp.float32)
  return jax.eval_shape(LPIPS().init, jax.random.PRNGKey(0), x, x)


@functools.lru_cache(maxsize=2)
def load(path: str) -> dict:
  """LPIPS variables from an .npz written by convert_weights.py (checked key by key)."""
  return npz_weights.load_variables(path, abstract_variables(), 'LPIPS')


@functools.cache
def _lpips_jit():
  # Compiled as the trainer's programs are on this backend (platform_ops.compiler_options).
  return jax.jit(
    lambda variables, x0, x1: LPIPS().apply(variables, x0, x1),
    compiler_options=platform_ops.compiler_options(jax.default_backend()),
  )


def _lpips_batch(variables, x0, x1):
  return _lpips_jit()(variables, x0, x1)


def lpips_distances(
  pred: Sequence[np.ndarray],
  gt: Sequence[np.ndarray],
  weights: str | os.PathLike | dict,
  batch_size: int = 8,
) -> list[float]:
  """LPIPS of each (pred, gt) pair of uint8 RGB images of equal size (lower is better)."""
  variables = load(os.fspath(weights)) if not isinstance(weights, dict) else weights
  if len(pred) != len(gt):
    raise ValueError(f'lpips: {len(pred)} pred images but {len(gt)} gt images')
  out = []
  for i in range(0, len(pred), batch_size):
    p_batch, g_batch = pred[i : i + batch_size], gt[i : i + batch_size]
    shapes = {im.shape for im in p_batch} | {im.shape for im in g_batch}
    # Mixed sizes cannot be stacked: fall back to one pair at a time.
    groups = (
      [(p_batch, g_batch)] if len(shapes) == 1 else [([p], [g]) for p, g in zip(p_batch, g_batch)]
    )
    for ps, gs in groups:
      p = np.stack(ps).astype(np.float32) / 127.5 - 1
      g = np.stack(gs).astype(np.float32) / 127.5 - 1
      out.extend(np.asarray(_lpips_batch(variables, p, g)).tolist())
  return out
