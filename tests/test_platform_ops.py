"""idm_jax/models/platform_ops.py: the CPU's forms of convolution and attention compute what XLA's
convolution and jax.nn.dot_product_attention compute (values and gradients), and other platforms
lower the native ops."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from idm_jax.models import platform_ops

NHWC_HWIO = ('NHWC', 'HWIO', 'NHWC')


def _rel_err(a, b) -> float:
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def _loss(conv, strides, padding):
  # sin keeps the cotangent different at every output element, so a misplaced one shows.
  return lambda x, w: jnp.sum(jnp.sin(conv(x, w, strides, padding, dimension_numbers=NHWC_HWIO)))


@pytest.mark.parametrize('shape, k, strides, cout', [
    ((2, 2, 2, 16), 3, (1, 1), 8),      # a tiny map: patches @ kernel whole
    ((2, 4, 4, 16), 3, (1, 1), 8),
    ((2, 8, 8, 16), 3, (1, 1), 8),      # XLA's convolution
    ((3, 7, 5, 16), 3, (1, 1), 8),
    ((2, 8, 8, 16), 1, (1, 1), 8),      # 1x1: a plain matrix product
    ((2, 8, 8, 16), 3, (2, 2), 8),      # strided
    ((2, 32, 32, 128), 3, (1, 1), 128),  # XLA's forward and input gradient, row-range kernel grad
    ((1, 33, 31, 128), 3, (1, 1), 136),  # the same, non-square and odd
    ((1, 32, 32, 128), 5, (1, 1), 128),
])
def test_convolution_and_its_gradients_equal_xlas(shape, k, strides, cout):
  pad = ((k // 2, k // 2),) * 2
  kx, kw = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(kx, shape)
  w = jax.random.normal(kw, (k, k, shape[-1], cout)) / (k * shape[-1] ** 0.5)
  ours = jax.jit(jax.value_and_grad(_loss(platform_ops.conv_general_dilated, strides, pad), (0, 1)))
  ref = jax.value_and_grad(_loss(lax.conv_general_dilated, strides, pad), (0, 1))
  (v1, (dx1, dw1)), (v2, (dx2, dw2)) = ours(x, w), ref(x, w)
  assert abs(float(v1 - v2)) <= 1e-4 * abs(float(v2)) + 1e-4
  assert dx1.shape == dx2.shape and dw1.shape == dw2.shape
  assert _rel_err(dx1, dx2) < 1e-5
  assert _rel_err(dw1, dw2) < 1e-5


def test_large_same_convolutions_take_the_row_range_kernel_gradient():
  x = jax.ShapeDtypeStruct((1, 32, 32, 128), jnp.float32)
  w = jax.ShapeDtypeStruct((3, 3, 128, 128), jnp.float32)
  grads = jax.jit(jax.grad(_loss(platform_ops.conv_general_dilated, (1, 1), ((1, 1), (1, 1))),
                           (0, 1)))
  text = grads.lower(x, w).as_text()
  # XLA's own kernel gradient would be a convolution with a 32x32 window.
  assert text.count('dot_general') >= 9 and 'convolution' in text


def test_kernel_gradient_keeps_rows_that_wrap_into_the_next_image_out():
  # Batch 3 and an impulse at the last pixel of image 0: a row range that ran on into image 1
  # would add image 1's pixels to the gradient.
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 6, 6, 4))
  dy = jnp.zeros((3, 6, 6, 2)).at[0, -1, -1, :].set(1.0).at[2].set(1.0)
  w = jnp.zeros((3, 3, 4, 2))
  _, vjp = jax.vjp(
      lambda w_: lax.conv_general_dilated(x, w_, (1, 1), ((1, 1), (1, 1)),
                                          dimension_numbers=NHWC_HWIO), w)
  expected, = vjp(dy)
  got = platform_ops.kernel_grad_same(x, dy, (3, 3))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('tokens, heads', [(64, 2), (5, 3)])
def test_attention_and_its_gradients_equal_jax_nn(tokens, heads):
  q, k, v = (jax.random.normal(key, (2, tokens, heads, 16))
             for key in jax.random.split(jax.random.PRNGKey(2), 3))
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
  ours = jax.jit(jax.value_and_grad(loss(platform_ops.dot_product_attention), (0, 1, 2)))(q, k, v)
  ref = jax.value_and_grad(loss(jax.nn.dot_product_attention), (0, 1, 2))(q, k, v)
  assert abs(float(ours[0] - ref[0])) < 1e-4
  for a, b in zip(ours[1], ref[1]):
    assert _rel_err(a, b) < 1e-5


@pytest.mark.parametrize('platform, native', [('cpu', False), ('tpu', True), ('cuda', True)])
def test_each_platform_lowers_its_own_form(platform, native):
  """The TPU and GPU programs keep XLA's convolution and attention (an AOT compile for a TPU on a
  CPU host lowers the TPU form); the CPU's has no convolution."""
  def grads(x, w, q):
    def loss(x, w, q):
      y = platform_ops.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                            dimension_numbers=NHWC_HWIO)
      return jnp.sum(y) + jnp.sum(platform_ops.dot_product_attention(q, q, q))
    return jax.grad(loss, (0, 1, 2))(x, w, q)
  args = (jax.ShapeDtypeStruct((2, 2, 2, 8), jnp.float32),
          jax.ShapeDtypeStruct((3, 3, 8, 4), jnp.float32),
          jax.ShapeDtypeStruct((2, 16, 2, 8), jnp.float32))
  text = jax.export.export(jax.jit(grads), platforms=[platform])(*args).mlir_module()
  assert ('stablehlo.convolution' in text) == native


def test_explicit_attention_implementation_is_passed_through():
  q = jnp.ones((1, 4, 1, 8))
  with pytest.raises(Exception):
    # cuDNN does not exist on this CPU: the named implementation must be the one asked for.
    jax.jit(lambda a: platform_ops.dot_product_attention(a, a, a, implementation='cudnn'))(q)


@pytest.mark.parametrize('x_shape, kernel_shape, strides, form', [
    ((4, 2, 2, 512), (3, 3, 512, 512), (1, 1), 'patches'),      # the deepest levels
    ((4, 64, 64, 384), (1, 1, 384, 128), (1, 1), 'patches'),     # 1x1 skip
    ((4, 64, 64, 128), (3, 3, 128, 128), (1, 1), 'rows_kernel_grad'),
    ((4, 16, 16, 512), (3, 3, 512, 256), (1, 1), 'xla'),         # too few pixels
    ((16, 64, 64, 32), (3, 3, 32, 32), (1, 1), 'xla'),           # too few channels
    ((16, 64, 64, 16), (3, 3, 16, 32), (2, 2), 'xla'),           # strided
])
def test_cpu_conv_form(x_shape, kernel_shape, strides, form):
  pad = ((kernel_shape[0] // 2,) * 2,) * 2
  assert platform_ops.cpu_conv_form(x_shape, kernel_shape, strides, pad) == form
