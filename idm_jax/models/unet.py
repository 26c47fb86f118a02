"""The conditional UNet: an ADM-style (guided-diffusion) denoiser in Flax linen.

Layout follows openai/guided-diffusion's `UNetModel` / `SuperResModel`, so the parity configs
(configs/adm_sr_*.py) have the same blocks and parameter count as the PyTorch reference:

  input conv → per level: num_res_blocks × (ResBlock [+ attention]), then a downsample
  (except at the last level) → middle ResBlock, attention, ResBlock → per level in reverse:
  (num_res_blocks + 1) × (ResBlock on [h, skip] [+ attention]), then an upsample (except at
  level 0) → GroupNorm, SiLU, zero-initialised output conv.

Additions for IDM:
  * noise conditioning on the continuous log-SNR instead of an integer timestep;
  * LQ conditioning two ways: (a) the LQ image, resized to the output size, is concatenated to
    the noisy input; (b) a light CNN encodes the LQ image and its per-level features are added,
    through zero-initialised 1x1 projections, to the encoder path at every resolution level;
  * `drop_cond` replaces the LQ image by zeros (the null condition for classifier-free guidance).

Every parameter carries logical axis names (`nn.with_logical_partitioning`) and activations are
annotated with `nn.with_logical_constraint`, so parallel.py can shard the model by rules alone.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from idm_jax.models import platform_ops

# Logical axis names (parallel.py maps them to mesh axes).
CONV_KERNEL_AXES = ('conv_h', 'conv_w', 'conv_in', 'conv_out')
DENSE_KERNEL_AXES = ('embed_in', 'embed_out')
CHANNEL_AXES = ('channels',)
IMAGE_AXES = ('batch', 'height', 'width', 'channels')
TOKEN_AXES = ('batch', 'tokens', 'channels')

# The log-SNR embedding maps logsnr in [-LOGSNR_HALF_RANGE, LOGSNR_HALF_RANGE] linearly onto
# a timestep-like value in [1000, 0] (high noise ↔ large value, as in ADM) before the sinusoidal
# embedding. ADM's frequencies (periods 2π … 2π·10⁴) were chosen for inputs spanning ~0…1000;
# fed the raw log-SNR (a range of 40) the low-frequency half of the embedding would barely move.
# Values outside the range extrapolate linearly, so any log-SNR works.
LOGSNR_HALF_RANGE = 20.0
EMBED_TIME_SCALE = 1000.0
EMBED_MAX_PERIOD = 10000.0

DTYPE_OF = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
DTYPES = tuple(DTYPE_OF)
ATTENTION_IMPLS = ('auto', 'xla', 'cudnn')  # auto: jax.nn.dot_product_attention chooses

# PyTorch's default conv/linear init (kaiming_uniform with a=√5 ⇒ Var = 1 / (3 fan_in)), which
# ADM was trained with; keeps our initial activations statistically like the reference.
_torch_like_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def _kernel_init(zero: bool, names: Tuple[str, ...]):
  init = nn.initializers.zeros_init() if zero else _torch_like_init
  return nn.with_logical_partitioning(init, names)


def _bias_init():
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), CHANNEL_AXES)


def _constrain_image(x):
  return nn.with_logical_constraint(x, IMAGE_AXES)


def logsnr_embedding(logsnr: jax.Array, dim: int) -> jax.Array:
  """Sinusoidal embedding (B,) → (B, dim), float32, of the log-SNR mapped to a timestep scale.

  Computed in float32 whatever the model's dtype: sin/cos of arguments up to 1000 in bfloat16
  would lose all but the lowest frequencies.
  """
  logsnr = jnp.asarray(logsnr, jnp.float32)
  t = (LOGSNR_HALF_RANGE - logsnr) * (EMBED_TIME_SCALE / (2.0 * LOGSNR_HALF_RANGE))
  half = dim // 2
  freqs = jnp.exp(-math.log(EMBED_MAX_PERIOD) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class Conv(nn.Module):
  """A 2-D convolution with logical axis names and PyTorch-style symmetric padding."""

  features: int
  kernel_size: int = 3
  stride: int = 1
  zero_init: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    pad = self.kernel_size // 2
    # Explicit (p, p) padding: flax 'SAME' with stride 2 pads (0, 1), torch pads (1, 1).
    return nn.Conv(
      self.features,
      (self.kernel_size, self.kernel_size),
      strides=(self.stride, self.stride),
      padding=((pad, pad), (pad, pad)),
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=_kernel_init(self.zero_init, CONV_KERNEL_AXES),
      bias_init=_bias_init(),
      conv_general_dilated=platform_ops.conv_general_dilated,
      name='conv',
    )(x.astype(self.dtype))


class Dense(nn.Module):
  """A dense layer with logical axis names."""

  features: int
  zero_init: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return nn.Dense(
      self.features,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=_kernel_init(self.zero_init, DENSE_KERNEL_AXES),
      bias_init=_bias_init(),
      name='dense',
    )(x.astype(self.dtype))


def group_norm(x, gamma, beta, num_groups: int, epsilon: float, scale=None, shift=None):
  """GroupNorm of NHWC float32 `x` with per-channel `gamma`, `beta`, then `* (1 + scale) + shift`
  when given ((B, 1, 1, C) each): flax.linen.GroupNorm's arithmetic (the variance as
  E[x^2] - E[x]^2, floored at 0), written as one per-(image, channel) affine map of `x`.

  The statistics are per-channel sums over the pixels first, then sums over each group's
  channels; flax reduces over pixels and the channels of a group at once, a reduction XLA's CPU
  backend runs several times slower (docs/PERFORMANCE.md, "The train step on the CPU").
  """
  b, h, w, c = x.shape
  per_group = c // num_groups
  pixels = x.reshape(b, h * w, c)
  count = h * w * per_group
  mean = jnp.sum(pixels, axis=1).reshape(b, num_groups, per_group).sum(-1) / count
  mean_sq = jnp.sum(pixels * pixels, axis=1).reshape(b, num_groups, per_group).sum(-1) / count
  inv = jax.lax.rsqrt(jnp.maximum(mean_sq - mean * mean, 0.0) + epsilon)
  mul = gamma * jnp.repeat(inv, per_group, axis=1)  # (B, C)
  add = beta - jnp.repeat(mean, per_group, axis=1) * mul
  if scale is not None:
    scale = scale.reshape(b, c)
    mul, add = mul * (1.0 + scale), add * (1.0 + scale) + shift.reshape(b, c)
  return x * mul[:, None, None, :] + add[:, None, None, :]


class _NormParams(nn.Module):
  """GroupNorm's per-channel scale and bias, at flax.linen.GroupNorm's parameter paths."""

  channels: int
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self):
    scale_init = nn.with_logical_partitioning(nn.initializers.ones_init(), CHANNEL_AXES)
    gamma = self.param('scale', scale_init, (self.channels,), self.param_dtype)
    beta = self.param('bias', _bias_init(), (self.channels,), self.param_dtype)
    return gamma.astype(jnp.float32), beta.astype(jnp.float32)


class GroupNorm(nn.Module):
  """GroupNorm with float32 statistics and float32 output (callers cast after the activation),
  optionally followed by the embedding's scale and shift (`group_norm`)."""

  num_groups: int
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, scale=None, shift=None):
    gamma, beta = _NormParams(x.shape[-1], self.param_dtype, name='norm')()
    # epsilon 1e-5: torch.nn.GroupNorm's default, as in the reference.
    return group_norm(x.astype(jnp.float32), gamma, beta, self.num_groups, 1e-5, scale, shift)


def _downsample_pool(x):
  """2x2 average pooling (BigGAN-style down ResBlocks resample without parameters)."""
  return platform_ops.avg_pool_2x2(x)


def _upsample_nearest(x):
  """Nearest-neighbour 2x upsampling."""
  return platform_ops.upsample_nearest_2x(x)


class ResBlock(nn.Module):
  """ADM residual block, optionally resampling (BigGAN-style up/down).

  GN → SiLU → [resample] → conv3x3 → GN modulated by the embedding (scale-shift or additive) →
  SiLU → dropout → zero-initialised conv3x3, plus a skip (1x1 conv when the width changes).
  """

  out_channels: int
  num_groups: int
  dropout: float = 0.0
  scale_shift_norm: bool = True
  resample: str = 'none'  # none | up | down
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, emb, train: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    in_channels = x.shape[-1]
    h = platform_ops.silu(GroupNorm(self.num_groups, self.param_dtype, name='in_norm')(x)).astype(
      self.dtype
    )
    if self.resample == 'down':
      h, x = _downsample_pool(h), _downsample_pool(x)
    elif self.resample == 'up':
      h, x = _upsample_nearest(h), _upsample_nearest(x)
    h = Conv(self.out_channels, 3, name='in_conv', **kw)(h)
    h = _constrain_image(h)

    emb_out = Dense((2 if self.scale_shift_norm else 1) * self.out_channels, name='emb', **kw)(
      platform_ops.silu(emb)
    )
    emb_out = emb_out.astype(jnp.float32)[:, None, None, :]
    if self.scale_shift_norm:
      scale, shift = jnp.split(emb_out, 2, axis=-1)
      h = GroupNorm(self.num_groups, self.param_dtype, name='out_norm')(h, scale, shift)
    else:
      h = GroupNorm(self.num_groups, self.param_dtype, name='out_norm')(h + emb_out.astype(h.dtype))
    h = platform_ops.silu(h).astype(self.dtype)
    if self.dropout > 0:
      h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = Conv(self.out_channels, 3, zero_init=True, name='out_conv', **kw)(h)

    if in_channels != self.out_channels:
      x = Conv(self.out_channels, 1, name='skip', **kw)(x)
    return _constrain_image(x.astype(self.dtype) + h)


class AttentionBlock(nn.Module):
  """Multi-head self-attention over all pixels, with a zero-initialised output projection."""

  head_channels: int
  num_groups: int
  attention_impl: str = 'auto'
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, hgt, wid, c = x.shape
    heads = c // self.head_channels
    h = GroupNorm(self.num_groups, self.param_dtype, name='norm')(x).astype(self.dtype)
    h = nn.with_logical_constraint(h.reshape(b, hgt * wid, c), TOKEN_AXES)
    qkv = Dense(3 * c, name='qkv', **kw)(h).reshape(b, hgt * wid, 3, heads, self.head_channels)
    q, k, v = (qkv[:, :, i].astype(self.dtype) for i in range(3))
    impl = None if self.attention_impl == 'auto' else self.attention_impl
    h = platform_ops.dot_product_attention(q, k, v, implementation=impl)
    h = nn.with_logical_constraint(h.reshape(b, hgt * wid, c), TOKEN_AXES)
    h = Dense(c, zero_init=True, name='proj_out', **kw)(h)
    return _constrain_image(x.astype(self.dtype) + h.reshape(b, hgt, wid, c))


class LQEncoder(nn.Module):
  """A light CNN over the (resized) LQ image; returns one feature map per resolution level.

  Level l has width `channels * channel_mult[l]` (following the UNet's own channel profile, so
  the deep, low-resolution levels get more capacity where it is cheap) at resolution H / 2^l.
  """

  channels: int
  channel_mult: Tuple[int, ...]
  num_groups: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, lq):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    feats = []
    h = Conv(self.channels * self.channel_mult[0], 3, name='in_conv', **kw)(lq)
    for level, mult in enumerate(self.channel_mult):
      width = self.channels * mult
      if level > 0:
        h = Conv(width, 3, stride=2, name=f'down_{level}', **kw)(platform_ops.silu(h))
      # One pre-activation residual block per level: GN → SiLU → conv → GN → SiLU → conv.
      groups = math.gcd(self.num_groups, width)
      r = platform_ops.silu(GroupNorm(groups, self.param_dtype, name=f'norm_{level}_0')(h)).astype(
        self.dtype
      )
      r = Conv(width, 3, name=f'conv_{level}_0', **kw)(r)
      r = platform_ops.silu(GroupNorm(groups, self.param_dtype, name=f'norm_{level}_1')(r)).astype(
        self.dtype
      )
      r = Conv(width, 3, name=f'conv_{level}_1', **kw)(r)
      h = _constrain_image(h + r)
      feats.append(h)
    return feats


class UNet(nn.Module):
  """ADM-style UNet denoiser conditioned on log-SNR and (optionally) an LQ image.

  `conditional=False` makes an unconditional generator: no LQ parameters exist at all and
  `lq_concat` / `lq_encoder` are ignored.
  """

  resolution: int
  channels: int = 128
  channel_mult: Tuple[int, ...] = (1, 1, 2, 2, 4, 4)
  num_res_blocks: int = 2
  attention_resolutions: Tuple[int, ...] = (32, 16)
  head_channels: int = 64
  dropout: float = 0.0
  resblock_updown: bool = True
  scale_shift_norm: bool = True
  num_groups: int = 32
  conditional: bool = True
  lq_concat: bool = True
  lq_encoder: bool = True
  lq_encoder_channels: int = 32
  out_channels: int = 3
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False
  attention_impl: str = 'auto'

  def _check_inputs(self, x_t, logsnr, lq, drop_cond):
    if x_t.ndim != 4:
      raise ValueError(f'UNet: x_t must be (B, H, W, C), got shape {x_t.shape}')
    b, hgt, wid, _ = x_t.shape
    factor = 2 ** (len(self.channel_mult) - 1)
    if hgt % factor or wid % factor:
      raise ValueError(
        f'UNet: x_t is {hgt}x{wid}, not divisible by 2^{len(self.channel_mult) - 1}'
        f' = {factor} (one halving per level of channel_mult)'
      )
    if jnp.shape(logsnr) != (b,):
      raise ValueError(f'UNet: logsnr must have shape ({b},), got {jnp.shape(logsnr)}')
    if self.conditional:
      if not (self.lq_concat or self.lq_encoder):
        raise ValueError('UNet: a conditional model needs lq_concat or lq_encoder')
      if lq is None:
        raise ValueError('UNet: this model is conditional (conditional=True): pass the LQ image')
      if lq.ndim != 4 or lq.shape[0] != b or lq.shape[-1] != 3:
        raise ValueError(f'UNet: lq must be (B={b}, h, w, 3), got shape {lq.shape}')
      if drop_cond is not None and jnp.shape(drop_cond) != (b,):
        raise ValueError(f'UNet: drop_cond must have shape ({b},), got {jnp.shape(drop_cond)}')
    else:
      if lq is not None:
        raise ValueError('UNet: this model is unconditional (conditional=False): lq must be None')
      if drop_cond is not None:
        raise ValueError('UNet: drop_cond needs a conditional model (conditional=True)')

  @nn.compact
  def __call__(self, x_t, logsnr, lq=None, *, train: bool = False, drop_cond=None):
    """Predicts the model output (ε, v or x0 per the objective) for noisy `x_t`.

    Args:
      x_t: (B, H, W, 3) noisy image, float.
      logsnr: (B,) float32 log-SNR of each example's noise level.
      lq: (B, h, w, 3) LQ image in [-1, 1]; resized bilinearly to (H, W) when smaller/larger.
        Required iff the model is conditional.
      train: enables dropout (needs the 'dropout' rng).
      drop_cond: optional (B,) bool; where True the LQ image is replaced by zeros (null
        condition for classifier-free guidance).
    Returns:
      (B, H, W, out_channels) float32.
    """
    self._check_inputs(x_t, logsnr, lq, drop_cond)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, hgt, wid, _ = x_t.shape
    use_concat = self.conditional and self.lq_concat
    use_encoder = self.conditional and self.lq_encoder

    # Noise-level embedding → MLP (4 × channels, SiLU), shared by every ResBlock.
    emb_dim = 4 * self.channels
    emb = logsnr_embedding(logsnr, self.channels)
    emb = Dense(emb_dim, name='time_embed_0', **kw)(emb)
    emb = Dense(emb_dim, name='time_embed_1', **kw)(platform_ops.silu(emb))

    lq_feats = None
    h = x_t.astype(self.dtype)
    if self.conditional:
      lq = lq.astype(jnp.float32)
      if lq.shape[1:3] != (hgt, wid):
        lq = jax.image.resize(lq, (b, hgt, wid, lq.shape[-1]), method='bilinear')
      if drop_cond is not None:
        lq = jnp.where(jnp.asarray(drop_cond, bool)[:, None, None, None], 0.0, lq)
      lq = _constrain_image(lq.astype(self.dtype))
      if use_concat:
        h = jnp.concatenate([h, lq], axis=-1)
      if use_encoder:
        lq_feats = LQEncoder(
          self.lq_encoder_channels,
          tuple(self.channel_mult),
          self.num_groups,
          name='lq_encoder',
          **kw,
        )(lq)
    h = _constrain_image(h)

    res_block = nn.remat(ResBlock, static_argnums=(3,)) if self.remat else ResBlock
    block_kw = dict(
      num_groups=self.num_groups, dropout=self.dropout, scale_shift_norm=self.scale_shift_norm, **kw
    )
    attn_kw = dict(
      head_channels=self.head_channels,
      num_groups=self.num_groups,
      attention_impl=self.attention_impl,
      **kw,
    )

    def add_lq_features(h, level):
      # Zero-init projection: training starts from the concat-only model.
      if lq_feats is None:
        return h
      return h + Conv(h.shape[-1], 1, zero_init=True, name=f'lq_proj_{level}', **kw)(
        lq_feats[level]
      )

    # Encoder.
    # LQ features join at each level's entry (after the input conv, after each downsample), so
    # they reach that level's ResBlocks and, through the skip, the decoder too.
    h = Conv(self.channels, 3, name='input_conv', **kw)(h)
    h = add_lq_features(h, 0)
    levels = len(self.channel_mult)
    skips = [h]
    res = hgt
    for level, mult in enumerate(self.channel_mult):
      for i in range(self.num_res_blocks):
        h = res_block(self.channels * mult, name=f'down_{level}_res_{i}', **block_kw)(h, emb, train)
        if res in self.attention_resolutions:
          h = AttentionBlock(name=f'down_{level}_attn_{i}', **attn_kw)(h)
        skips.append(h)
      if level != levels - 1:
        if self.resblock_updown:
          h = res_block(h.shape[-1], resample='down', name=f'down_{level}_downsample', **block_kw)(
            h, emb, train
          )
        else:
          h = Conv(h.shape[-1], 3, stride=2, name=f'down_{level}_downsample', **kw)(h)
        h = add_lq_features(_constrain_image(h), level + 1)
        skips.append(h)
        res //= 2

    # Middle: ResBlock, attention, ResBlock.
    h = res_block(h.shape[-1], name='mid_res_0', **block_kw)(h, emb, train)
    h = AttentionBlock(name='mid_attn', **attn_kw)(h)
    h = res_block(h.shape[-1], name='mid_res_1', **block_kw)(h, emb, train)

    # Decoder: num_res_blocks + 1 ResBlocks per level, each on [h, skip].
    for level in reversed(range(levels)):
      mult = self.channel_mult[level]
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
        h = res_block(self.channels * mult, name=f'up_{level}_res_{i}', **block_kw)(h, emb, train)
        if res in self.attention_resolutions:
          h = AttentionBlock(name=f'up_{level}_attn_{i}', **attn_kw)(h)
      if level > 0:
        if self.resblock_updown:
          h = res_block(h.shape[-1], resample='up', name=f'up_{level}_upsample', **block_kw)(
            h, emb, train
          )
        else:
          h = Conv(h.shape[-1], 3, name=f'up_{level}_upsample', **kw)(_upsample_nearest(h))
        h = _constrain_image(h)
        res *= 2
    assert not skips, 'every encoder activation must be consumed by the decoder'

    h = platform_ops.silu(GroupNorm(self.num_groups, self.param_dtype, name='out_norm')(h)).astype(
      self.dtype
    )
    out = Conv(self.out_channels, 3, zero_init=True, name='out_conv', **kw)(h)
    return _constrain_image(out.astype(jnp.float32))


def dummy_inputs(model: UNet, batch_size: int = 1):
  """(x_t, logsnr, lq) of the right shapes for initialisation (lq None if unconditional)."""
  shape = (batch_size, model.resolution, model.resolution, 3)
  x_t = jnp.zeros(shape, jnp.float32)
  logsnr = jnp.zeros((batch_size,), jnp.float32)
  lq = jnp.zeros(shape, jnp.float32) if model.conditional else None
  return x_t, logsnr, lq


def _init_boxed(model: UNet, rng, x_t, logsnr, lq):
  return model.init(rng, x_t, logsnr, lq, train=False)['params']


# Inputs are jit arguments, not constants, so XLA does not try to constant-fold the forward pass.
_init_jit = jax.jit(_init_boxed, static_argnums=(0,))


def init_params(model: UNet, rng, batch_size: int = 1, *, partitionable: bool = False):
  """Initial parameters as a plain (unboxed) pytree: apply with `{'params': params}`.

  By default a single-device convenience. partitionable=True is for a sharded initialisation
  (train.Trainer jits this with sharded out_shardings): partitionable threefry lets XLA have
  each device generate only the bits of its own shard, where the default threefry makes every
  device draw whole tensors and then slice them. The two give different values for one key.
  """
  # Non-partitionable threefry by default: the partitionable variant (JAX's default) makes this
  # compile 4-5x slower on CPU (one threefry kernel per parameter) and buys nothing on one
  # device. It also makes the values independent of the global flag, so a key always gives the
  # same init.
  with jax.threefry_partitionable(partitionable):
    boxed = _init_jit(model, rng, *dummy_inputs(model, batch_size))
  return nn.meta.unbox(boxed)


@functools.lru_cache(maxsize=16)
def param_shapes(model: UNet):
  """The params pytree as abstract arrays, still boxed in `nn.LogicallyPartitioned`.

  Nothing is allocated (jax.eval_shape); `nn.get_partition_spec(param_shapes(model))` gives
  the logical PartitionSpecs with the same tree structure as `init_params`' result. Cached per
  model (modules are frozen and hashable): loading a checkpoint and checking its params against
  the model would otherwise trace the whole UNet twice.
  """
  return jax.eval_shape(
    functools.partial(_init_boxed, model), jax.random.key(0), *dummy_inputs(model, 1)
  )


def count_params(model: UNet) -> int:
  """Number of parameters of `model`, without allocating any."""
  shapes = nn.meta.unbox(param_shapes(model))
  return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes)))
