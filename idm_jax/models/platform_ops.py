"""The UNet's convolutions and attention in the form each platform runs fastest.

On the CPU backend each convolution takes the form that is fastest for its shape (`cpu_conv`)
and attention is two einsums around `jax.nn.softmax`; elsewhere (TPU, GPU) they stay XLA's
convolution and `jax.nn.dot_product_attention`, whose kernels are native there.
`lax.platform_dependent` picks the branch when the program is lowered for its platform, so an
ahead-of-time TPU compile on a CPU host lowers the TPU branch.

Convolution. XLA's CPU convolutions are uneven across shapes: over a 2x2 or 4x4 feature map (the
UNet's deepest levels) a 3x3 convolution takes a generic loop that runs tens of times slower
than the same arithmetic written as patches @ kernel; 1x1 convolutions are faster as a plain
matrix product; and at wide, large maps XLA's kernel gradient (a convolution whose window is
the whole map) is slower than nine matrix products over row ranges of the flattened input
(`kernel_grad_same`). Everywhere else XLA's convolution is the fastest of the three forms. The
per-shape timings are in docs/PERFORMANCE.md, "The train step on the CPU". The mathematics is the
convolution's; only the order of the float sums differs.

Attention. `jax.nn.dot_product_attention`'s XLA form differentiates its softmax through the
division, so its backward pass streams several token x token tensors; `jax.nn.softmax` has the
closed-form gradient, and the whole block runs about twice as fast on the CPU at 1,024 tokens.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

# flax.linen.Conv's layout for NHWC inputs and HWIO kernels, as ConvDimensionNumbers.
_NHWC_HWIO = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                      out_spec=(0, 3, 1, 2))


def patches(x, kernel_hw, strides, padding):
  """(B, H', W', kh * kw * C) patches of NHWC `x`, in the order of an HWIO kernel reshaped to
  (kh * kw * C, O): offset (i, j) outer, channel inner."""
  (kh, kw), (sh, sw) = kernel_hw, strides
  x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  out_h = (x.shape[1] - kh) // sh + 1
  out_w = (x.shape[2] - kw) // sw + 1
  cols = [x[:, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw, :]
          for i in range(kh) for j in range(kw)]
  return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


def conv_as_matmul(x, kernel, strides, padding, precision=None):
  """The NHWC x HWIO convolution with explicit ((lo, hi), (lo, hi)) padding, as patches @ kernel."""
  kh, kw, cin, cout = kernel.shape
  cols = patches(x, (kh, kw), strides, padding)
  return jnp.dot(cols, kernel.reshape(kh * kw * cin, cout), precision=precision)


def _supported(padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
               batch_group_count=1) -> bool:
  ones = lambda d: d is None or all(int(v) == 1 for v in d)
  return (not isinstance(padding, str) and ones(lhs_dilation) and ones(rhs_dilation)
          and feature_group_count == 1 and batch_group_count == 1
          and dimension_numbers == _NHWC_HWIO)


def _native_conv(x, kernel, strides, padding, precision=None):
  return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC_HWIO,
                                  precision=precision)


def kernel_grad_same(x, dy, kernel_hw, precision=None):
  """The HWIO kernel's gradient of a stride-1 'same' convolution (padding k // 2 on each side),
  as kh * kw matrix products over contiguous row ranges, with no patch matrix built.

  Flattened, the zero-padded input's row r + i * Wp + j is pixel (h + i, w + j) of the padded
  image when r is pixel (h, w) (Wp: the padded width), so the (i, j) slice of the kernel's
  gradient is x_flat[off:off + L]^T @ dy_flat[:L] with dy padded to the same grid with zeros
  (which keeps rows that wrap into the next image out of the sum).
  """
  (kh, kw), (b, h, w, cin), cout = kernel_hw, x.shape, dy.shape[-1]
  ph, pw = kh // 2, kw // 2
  wp = w + 2 * pw
  xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0))).reshape(-1, cin)
  dyp = jnp.pad(dy, ((0, 0), (0, 2 * ph), (0, 2 * pw), (0, 0))).reshape(-1, cout)
  rows = xp.shape[0] - (kh - 1) * wp - (kw - 1)
  grads = [jnp.dot(xp[i * wp + j:i * wp + j + rows].T, dyp[:rows], precision=precision)
           for i in range(kh) for j in range(kw)]
  return jnp.stack(grads).reshape(kh, kw, cin, cout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_same(x, kernel, precision):
  kh, kw = kernel.shape[:2]
  return _native_conv(x, kernel, (1, 1), ((kh // 2, kh // 2), (kw // 2, kw // 2)), precision)


def _conv_same_fwd(x, kernel, precision):
  return _conv_same(x, kernel, precision), (x, kernel)


def _conv_same_bwd(precision, residuals, dy):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x_: _conv_same.fun(x_, kernel, precision), x)
  dx, = input_vjp(dy)
  dkernel = kernel_grad_same(x, dy, kernel.shape[:2], precision)
  return dx, dkernel.astype(kernel.dtype)


_conv_same.defvjp(_conv_same_fwd, _conv_same_bwd)

# Where each form wins on the CPU (docs/PERFORMANCE.md, "The train step on the CPU", has the
# per-shape timings): feature maps this small or smaller go through patches @ kernel whole, as
# XLA's CPU convolution takes a slow generic loop there (forward and input gradient alike) ...
_SMALL_MAP = 4
# ... and a 'same' convolution's kernel gradient is taken as row-range matrix products from
# this many pixels and input x output channels up, where XLA's is slower; below, XLA's
# convolution is the fastest form of all three passes.
_ROWS_GRAD_MIN_PIXELS = 32 * 32
_ROWS_GRAD_MIN_CHANNELS = 128 * 128


def cpu_conv_form(x_shape, kernel_shape, strides, padding) -> str:
  """Which form `cpu_conv` uses for these shapes: 'patches' (1x1 convolutions and tiny maps),
  'rows_kernel_grad' (large 'same' convolutions: XLA's forward pass and input gradient,
  `kernel_grad_same`'s kernel gradient) or 'xla'."""
  kh, kw, cin, cout = kernel_shape
  if (kh, kw) == (1, 1) or min(x_shape[1:3]) <= _SMALL_MAP:
    return 'patches'
  same = (tuple(strides) == (1, 1) and kh == kw and kh % 2 == 1
          and tuple(map(tuple, padding)) == ((kh // 2, kh // 2), (kw // 2, kw // 2)))
  if (same and x_shape[1] * x_shape[2] >= _ROWS_GRAD_MIN_PIXELS
      and cin * cout >= _ROWS_GRAD_MIN_CHANNELS):
    return 'rows_kernel_grad'
  return 'xla'


def cpu_conv(x, kernel, strides, padding, precision=None):
  """The convolution in the form the CPU runs fastest for its shape (`cpu_conv_form`)."""
  form = cpu_conv_form(x.shape, kernel.shape, strides, padding)
  if form == 'patches':
    return conv_as_matmul(x, kernel, strides, padding, precision)
  if form == 'rows_kernel_grad':
    return _conv_same(x, kernel, precision)
  return _native_conv(x, kernel, strides, padding, precision)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
  """A drop-in for `lax.conv_general_dilated` (flax.linen.Conv's `conv_general_dilated`):
  `cpu_conv` on the CPU for plain NHWC/HWIO convolutions, XLA's convolution otherwise."""
  def native(x, k):
    return lax.conv_general_dilated(x, k, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, precision=precision,
                                    **kwargs)
  dims = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  if not _supported(padding, lhs_dilation, rhs_dilation, dims, feature_group_count,
                    kwargs.get('batch_group_count', 1)):
    return native(lhs, rhs)
  strides = tuple(int(s) for s in window_strides)
  pads = tuple(tuple(int(v) for v in p) for p in padding)
  return lax.platform_dependent(
      lhs, rhs, cpu=lambda x, k: cpu_conv(x, k, strides, pads, precision), default=native)


def softmax_attention(q, k, v):
  """Multi-head attention of (B, T, heads, D) queries, keys and values, as two einsums."""
  logits = jnp.einsum('bqhd,bkhd->bhqk', q * (q.shape[-1] ** -0.5), k)
  return jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(logits, axis=-1), v)


def dot_product_attention(q, k, v, implementation=None):
  """`jax.nn.dot_product_attention(q, k, v, implementation=...)`; with no implementation named,
  `softmax_attention` on the CPU."""
  def native(q_, k_, v_):
    return jax.nn.dot_product_attention(q_, k_, v_, implementation=implementation)
  if implementation is not None:
    return native(q, k, v)
  return lax.platform_dependent(q, k, v, cpu=softmax_attention, default=native)
