"""The UNet's convolutions, attention, 2x resampling and SiLU in the form each platform runs fastest.

On the CPU backend, CPU programs are compiled with `compiler_options('cpu')`, each convolution
takes the form that is fastest for its shape (`cpu_conv`) and attention is two einsums around a
softmax; elsewhere (TPU, GPU) they stay XLA's convolution and
`jax.nn.dot_product_attention`, whose kernels are native there. `lax.platform_dependent` picks
the branch when the program is lowered for its platform, so an ahead-of-time TPU compile on a
CPU host lowers the TPU branch.

Which library runs what. XLA's CPU backend hands some fusions to YNNPACK. Its reductions are many
times faster than XLA's own loops (the UNet's GroupNorm statistics and bias gradients), but its
convolutions, and the reductions it fuses a convolution into, run several times slower than
XLA's own Eigen convolutions, above all the kernel gradient (a convolution whose window is the
whole feature map). So CPU programs ask YNNPACK for reductions only.

Convolution. With Eigen's convolutions, XLA's is the fastest form everywhere but over a 2x2 or
4x4 feature map (the UNet's deepest levels), where a 3x3 convolution takes a generic loop that
runs tens of times slower than the same arithmetic written as patches @ kernel; 1x1 convolutions
are a plain matrix product. The per-shape timings are in docs/PERFORMANCE.md, "The train step on
the CPU". The mathematics is the convolution's; only the order of the float sums differs.

Resampling. YNNPACK also takes a reduction together with the convolution that produces its
operand, as slow as its own convolutions: the down blocks' average pooling and the up blocks'
upsampling gradient (a 2x2 block sum) are strided slices on the CPU, not reductions.

SiLU. XLA's CPU backend lowers the logistic in x * sigmoid(x) as 1 / (1 + exp(-x)), a division
per element in the forward pass and in each use of the derivative; on the CPU the SiLU is written
through tanh (sigmoid(x) = (1 + tanh(x / 2)) / 2) with its closed-form derivative, which makes
the train step slightly faster (docs/PERFORMANCE.md). The two forms differ only by rounding.

Attention. `jax.nn.dot_product_attention`'s XLA form differentiates its softmax through the
division, so its backward pass streams several token x token tensors; a softmax with the
closed-form gradient (jax.nn.softmax's) runs the whole block about twice as fast on the CPU at
1,024 tokens. Ours also keeps the logits' matmul out of YNNPACK's reduction fusions.
"""

from __future__ import annotations

import functools

from absl import logging
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

# flax.linen.Conv's layout for NHWC inputs and HWIO kernels, as ConvDimensionNumbers.
_NHWC_HWIO = lax.ConvDimensionNumbers(
  lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2)
)


def patches(x, kernel_hw, strides, padding):
  """(B, H', W', kh * kw * C) patches of NHWC `x`, in the order of an HWIO kernel reshaped to
  (kh * kw * C, O): offset (i, j) outer, channel inner."""
  (kh, kw), (sh, sw) = kernel_hw, strides
  x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  out_h = (x.shape[1] - kh) // sh + 1
  out_w = (x.shape[2] - kw) // sw + 1
  cols = [
    x[:, i : i + sh * (out_h - 1) + 1 : sh, j : j + sw * (out_w - 1) + 1 : sw, :]
    for i in range(kh)
    for j in range(kw)
  ]
  return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


def conv_as_matmul(x, kernel, strides, padding, precision=None):
  """The NHWC x HWIO convolution with explicit ((lo, hi), (lo, hi)) padding, as patches @ kernel."""
  kh, kw, cin, cout = kernel.shape
  cols = patches(x, (kh, kw), strides, padding)
  return _matmul(cols, kernel.reshape(kh * kw * cin, cout), precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(cols, kernel, precision):
  """cols @ kernel, (..., K) x (K, O), whose kernel gradient contracts cols and the output's
  cotangent over their leading axes as they lie. Differentiated by JAX, it is a product with a
  transposed result, and XLA's CPU backend folds that transpose into the cotangent: a copy of the
  whole (..., O) map, transposed, fused with whatever produced it (docs/PERFORMANCE.md has the
  timings)."""
  return jnp.dot(cols, kernel, precision=precision)


def _matmul_fwd(cols, kernel, precision):
  return _matmul(cols, kernel, precision), (cols, kernel)


def _matmul_bwd(precision, residuals, g):
  cols, kernel = residuals
  rows = cols.reshape(-1, cols.shape[-1]), g.reshape(-1, g.shape[-1])
  if rows[0].shape[0] < kernel.shape[0]:
    # Few rows against a long kernel (the deepest levels' maps): kernel @ g.T streams the kernel
    # as it lies, several times faster than g @ kernel.T; the barrier stops XLA from folding the
    # small transpose back into the product.
    d_cols = lax.dot_general(kernel, rows[1], (((1,), (1,)), ((), ())), precision=precision)
    d_cols = lax.optimization_barrier(d_cols).T.reshape(cols.shape)
  else:
    d_cols = lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())), precision=precision)
  d_kernel = lax.dot_general(*rows, (((0,), (0,)), ((), ())), precision=precision)
  return d_cols.astype(cols.dtype), d_kernel.astype(kernel.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _supported(
  padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count, batch_group_count=1
) -> bool:
  ones = lambda d: d is None or all(int(v) == 1 for v in d)
  return (
    not isinstance(padding, str)
    and ones(lhs_dilation)
    and ones(rhs_dilation)
    and feature_group_count == 1
    and batch_group_count == 1
    and dimension_numbers == _NHWC_HWIO
  )


# YNNPACK for reductions only (the module docstring says why).
_CPU_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_REDUCE'}


@functools.cache
def _cpu_options_accepted() -> bool:
  """Whether this jaxlib's XLA knows the option (it is experimental: a later XLA may rename it)."""
  x = jax.device_put(np.zeros(1, np.float32), jax.devices('cpu')[0])
  try:
    jax.jit(lambda v: v + 1, compiler_options=_CPU_OPTIONS).lower(x).compile()
  except jax.errors.JaxRuntimeError as e:
    logging.warning(
      'XLA does not take the CPU option %s (%s): CPU programs compile with '
      "XLA's defaults, and train slower",
      _CPU_OPTIONS,
      str(e).splitlines()[0],
    )
    return False
  return True


def compiler_options(platform: str) -> dict | None:
  """The `jax.jit(..., compiler_options=...)` for a program on `platform`'s devices: YNNPACK for
  reductions only on the CPU, nothing elsewhere."""
  if platform == 'cpu' and _cpu_options_accepted():
    return dict(_CPU_OPTIONS)
  return None


def _native_conv(x, kernel, strides, padding, precision=None):
  return lax.conv_general_dilated(
    x, kernel, strides, padding, dimension_numbers=_NHWC_HWIO, precision=precision
  )


# Feature maps this small or smaller go through patches @ kernel, as XLA's CPU convolution takes a
# slow generic loop there (docs/PERFORMANCE.md, "The train step on the CPU", has the timings).
_SMALL_MAP = 4


def cpu_conv_form(x_shape, kernel_shape) -> str:
  """Which form `cpu_conv` uses for these shapes: 'patches' (1x1 convolutions and tiny maps) or
  'xla'."""
  kh, kw = kernel_shape[:2]
  if (kh, kw) == (1, 1) or min(x_shape[1:3]) <= _SMALL_MAP:
    return 'patches'
  return 'xla'


def cpu_conv(x, kernel, strides, padding, precision=None):
  """The convolution in the form the CPU runs fastest for its shape (`cpu_conv_form`)."""
  if cpu_conv_form(x.shape, kernel.shape) == 'patches':
    return conv_as_matmul(x, kernel, strides, padding, precision)
  return _native_conv(x, kernel, strides, padding, precision)


def conv_general_dilated(
  lhs,
  rhs,
  window_strides,
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count=1,
  precision=None,
  **kwargs,
):
  """A drop-in for `lax.conv_general_dilated` (flax.linen.Conv's `conv_general_dilated`):
  `cpu_conv` on the CPU for plain NHWC/HWIO convolutions, XLA's convolution otherwise."""

  def native(x, k):
    return lax.conv_general_dilated(
      x,
      k,
      window_strides,
      padding,
      lhs_dilation,
      rhs_dilation,
      dimension_numbers,
      feature_group_count,
      precision=precision,
      **kwargs,
    )

  dims = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  if not _supported(
    padding,
    lhs_dilation,
    rhs_dilation,
    dims,
    feature_group_count,
    kwargs.get('batch_group_count', 1),
  ):
    return native(lhs, rhs)
  strides = tuple(int(s) for s in window_strides)
  pads = tuple(tuple(int(v) for v in p) for p in padding)
  return lax.platform_dependent(
    lhs, rhs, cpu=lambda x, k: cpu_conv(x, k, strides, pads, precision), default=native
  )


def _pool_2x2_sum(x):
  h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
  return x[:, 0:h:2, 0:w:2] + x[:, 1:h:2, 0:w:2] + x[:, 0:h:2, 1:w:2] + x[:, 1:h:2, 1:w:2]


def _repeat_2x(x):
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


@jax.custom_vjp
def _cpu_upsample_nearest_2x(x):
  return _repeat_2x(x)


_cpu_upsample_nearest_2x.defvjp(
  lambda x: (_cpu_upsample_nearest_2x(x), None), lambda _, g: (_pool_2x2_sum(g),)
)


def avg_pool_2x2(x):
  """2x2 average pooling of NHWC `x`, stride 2 (flax's `nn.avg_pool(x, (2, 2), (2, 2))`). On the
  CPU as the sum of four strided slices: YNNPACK takes the pooling's reduce-window into one fusion
  with the convolution that produces its operand and runs that several times slower."""
  native = lambda x: lax.reduce_window(x, 0.0, lax.add, (1, 2, 2, 1), (1, 2, 2, 1), 'VALID') / 4
  return lax.platform_dependent(x, cpu=lambda x: _pool_2x2_sum(x) * 0.25, default=native)


def upsample_nearest_2x(x):
  """Nearest-neighbour 2x upsampling of NHWC `x`. Its gradient sums each 2x2 block; on the CPU as
  four strided slices, not a reduction, for the reason `avg_pool_2x2` gives."""
  return lax.platform_dependent(x, cpu=_cpu_upsample_nearest_2x, default=_repeat_2x)


@jax.custom_jvp
def _cpu_silu(x):
  return x * (0.5 * jnp.tanh(0.5 * x) + 0.5)


@_cpu_silu.defjvp
def _cpu_silu_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  s = 0.5 * jnp.tanh(0.5 * x) + 0.5
  return x * s, dx * (s * (1 + x * (1 - s)))


def silu(x):
  """x * sigmoid(x) (flax's `nn.silu`); on the CPU through tanh, without a division."""
  return lax.platform_dependent(x, cpu=_cpu_silu, default=jax.nn.silu)


# Queries per block of `softmax_attention`: at 1,024 tokens, four blocks' logits (8 MB each at
# batch 4, 2 heads) stay in cache where the whole (32 MB) does not; the forward + backward pass
# runs 1.7x faster (docs/PERFORMANCE.md). At 256 tokens or fewer, one block.
_QUERY_BLOCK = 256


def _row_max(x):
  # max as a select: YNNPACK takes a reduce_max into one fusion with the matmul that produces
  # its operand (and the exp after it), and runs that several times slower than XLA's matmul.
  return lax.reduce(
    x, jnp.array(-jnp.inf, x.dtype), lambda a, b: lax.select(a >= b, a, b), (x.ndim - 1,)
  )


@jax.custom_vjp
def _softmax(logits):
  """jax.nn.softmax over the last axis (the same arithmetic, the same closed-form gradient), its
  row maximum kept out of YNNPACK's fusions (`_row_max`)."""
  e = jnp.exp(logits - _row_max(logits)[..., None])
  return e / jnp.sum(e, axis=-1, keepdims=True)


def _softmax_fwd(logits):
  y = _softmax(logits)
  return y, y


def _softmax_bwd(y, g):
  return (y * (g - jnp.sum(g * y, axis=-1, keepdims=True)),)


_softmax.defvjp(_softmax_fwd, _softmax_bwd)


def _attention_block(q, k, v):
  logits = jnp.einsum('bqhd,bkhd->bhqk', q * (q.shape[-1] ** -0.5), k)
  return jnp.einsum('bhqk,bkhd->bqhd', _softmax(logits), v)


def softmax_attention(q, k, v):
  """Multi-head attention of (B, T, heads, D) queries, keys and values, as two einsums per block
  of `_QUERY_BLOCK` queries (each query's softmax is over all the keys, so blocks are exact)."""
  tokens = q.shape[1]
  if tokens <= _QUERY_BLOCK or tokens % _QUERY_BLOCK:
    return _attention_block(q, k, v)
  blocks = jnp.split(q, tokens // _QUERY_BLOCK, axis=1)
  return jnp.concatenate([_attention_block(b, k, v) for b in blocks], axis=1)


def dot_product_attention(q, k, v, implementation=None):
  """`jax.nn.dot_product_attention(q, k, v, implementation=...)`; with no implementation named,
  `softmax_attention` on the CPU."""

  def native(q_, k_, v_):
    return jax.nn.dot_product_attention(q_, k_, v_, implementation=implementation)

  if implementation is not None:
    return native(q, k, v)
  return lax.platform_dependent(q, k, v, cpu=softmax_attention, default=native)
