"""idm_jax/models/platform_ops.py: the CPU's forms of convolution and attention compute what XLA's
convolution and jax.nn.dot_product_attention compute (values and gradients), and other platforms
lower the native ops."""

import re

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from idm_jax.models import platform_ops

NHWC_HWIO = ('NHWC', 'HWIO', 'NHWC')


def _rel_err(a, b) -> float:
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def _loss(conv, strides, padding):
  # sin keeps the cotangent different at every output element, so a misplaced one shows.
  return lambda x, w: jnp.sum(jnp.sin(conv(x, w, strides, padding, dimension_numbers=NHWC_HWIO)))


@pytest.mark.parametrize(
  'shape, k, strides, cout',
  [
    ((2, 2, 2, 16), 3, (1, 1), 8),  # a tiny map: patches @ kernel whole
    ((2, 4, 4, 16), 3, (1, 1), 8),
    ((2, 8, 8, 16), 3, (1, 1), 8),  # XLA's convolution
    ((3, 7, 5, 16), 3, (1, 1), 8),
    ((2, 8, 8, 16), 1, (1, 1), 8),  # 1x1: a plain matrix product
    ((2, 8, 8, 16), 3, (2, 2), 8),  # strided
    ((1, 33, 31, 24), 3, (1, 1), 16),  # non-square and odd
    ((1, 16, 16, 8), 5, (1, 1), 8),
  ],
)
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


@pytest.mark.parametrize('tokens, heads', [(64, 2), (5, 3), (1024, 2)])  # 1024: query blocks
def test_attention_and_its_gradients_equal_jax_nn(tokens, heads):
  q, k, v = (
    jax.random.normal(key, (2, tokens, heads, 16))
    for key in jax.random.split(jax.random.PRNGKey(2), 3)
  )
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
      y = platform_ops.conv_general_dilated(
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC_HWIO
      )
      return jnp.sum(y) + jnp.sum(platform_ops.dot_product_attention(q, q, q))

    return jax.grad(loss, (0, 1, 2))(x, w, q)

  args = (
    jax.ShapeDtypeStruct((2, 2, 2, 8), jnp.float32),
    jax.ShapeDtypeStruct((3, 3, 8, 4), jnp.float32),
    jax.ShapeDtypeStruct((2, 16, 2, 8), jnp.float32),
  )
  text = jax.export.export(jax.jit(grads), platforms=[platform])(*args).mlir_module()
  assert ('stablehlo.convolution' in text) == native


def test_silu_and_its_gradient_equal_jax_nn():
  x = jnp.concatenate([jnp.linspace(-30.0, 30.0, 2001), jnp.array([0.0, 1e-8, -1e-8])])
  loss = lambda f: lambda x: jnp.sum(jnp.sin(f(x)))
  (v1, g1), (v2, g2) = (
    jax.jit(jax.value_and_grad(loss(platform_ops.silu)))(x),
    jax.value_and_grad(loss(jax.nn.silu))(x),
  )
  # Far below zero (x < -15) sigmoid(x) = (1 + tanh(x / 2)) / 2 rounds to 0 where
  # 1 / (1 + exp(-x)) keeps its tiny value: the two SiLUs differ there by less than 2e-6.
  np.testing.assert_allclose(platform_ops.silu(x), jax.nn.silu(x), rtol=1e-6, atol=2e-6)
  assert abs(float(v1 - v2)) <= 1e-4
  assert _rel_err(g1, g2) < 1e-5
  # Second derivatives (through the closed form) too: a custom_jvp must stay differentiable.
  h1 = jax.vmap(jax.grad(jax.grad(platform_ops.silu)))(x)
  h2 = jax.vmap(jax.grad(jax.grad(jax.nn.silu)))(x)
  assert _rel_err(h1, h2) < 1e-5


@pytest.mark.parametrize('platform, native', [('cpu', False), ('tpu', True), ('cuda', True)])
def test_silu_lowers_to_tanh_on_the_cpu_only(platform, native):
  text = jax.export.export(
    jax.jit(jax.grad(lambda x: jnp.sum(platform_ops.silu(x)))), platforms=[platform]
  )(jax.ShapeDtypeStruct((4, 8), jnp.float32)).mlir_module()
  # jax.nn.silu's logistic lowers to exp and a division; the CPU form to tanh.
  assert ('stablehlo.exponential' in text) == native
  assert ('stablehlo.tanh' in text) != native


def test_explicit_attention_implementation_is_passed_through():
  q = jnp.ones((1, 4, 1, 8))
  with pytest.raises(Exception):
    # cuDNN does not exist on this CPU: the named implementation must be the one asked for.
    jax.jit(lambda a: platform_ops.dot_product_attention(a, a, a, implementation='cudnn'))(q)


@pytest.mark.parametrize(
  'x_shape, kernel_shape, form',
  [
    ((4, 2, 2, 512), (3, 3, 512, 512), 'patches'),  # the deepest levels
    ((4, 4, 4, 512), (3, 3, 512, 512), 'patches'),
    ((4, 64, 64, 384), (1, 1, 384, 128), 'patches'),  # 1x1 skip
    ((4, 8, 8, 512), (3, 3, 512, 256), 'xla'),
    ((4, 64, 64, 128), (3, 3, 128, 128), 'xla'),
  ],
)
def test_cpu_conv_form(x_shape, kernel_shape, form):
  assert platform_ops.cpu_conv_form(x_shape, kernel_shape) == form


def _ynn_fusions(hlo_text: str) -> list:
  """The bodies of the fused computations XLA's CPU backend hands to YNNPACK."""
  names = set(re.findall(r'calls=%([\w.\-]+), [^\n]*"kind":"__ynn_fusion"', hlo_text))
  return [
    body
    for name, body in re.findall(r'\n%([\w.\-]+) [^\n]*\{\n(.*?)\n\}', hlo_text, re.S)
    if name in names
  ]


def test_cpu_programs_give_ynnpack_reductions_but_not_convolutions():
  """With `compiler_options('cpu')` a train step's convolutions stay XLA's own, the kernel
  gradient above all, while reductions still go to YNNPACK; XLA's defaults hand YNNPACK the
  convolutions, several times slower here."""

  def step(x, w):
    # As in the train step: the kernel gradient feeds the update and the gradient norm.
    g = jax.grad(
      lambda w_: jnp.sum(
        jnp.sin(
          platform_ops.conv_general_dilated(
            x, w_, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC_HWIO
          )
        )
      )
    )(w)
    return w - 0.1 * g, jnp.sum(g * g), jnp.sum(x * x, axis=(0, 1, 2))

  args = (
    jax.ShapeDtypeStruct((4, 16, 16, 32), jnp.float32),
    jax.ShapeDtypeStruct((3, 3, 32, 32), jnp.float32),
  )
  options = platform_ops.compiler_options('cpu')
  if options is None:  # a later XLA may rename it: re-measure there (docs/PERFORMANCE.md)
    pytest.skip("this jaxlib's XLA does not take the CPU option")
  ours = _ynn_fusions(jax.jit(step, compiler_options=options).lower(*args).compile().as_text())
  defaults = _ynn_fusions(jax.jit(step).lower(*args).compile().as_text())
  assert any('convolution(' in body for body in defaults)  # what the option is there to stop
  assert ours and not any('convolution(' in body for body in ours)
  assert any(' reduce(' in body for body in ours)
  assert platform_ops.compiler_options('tpu') is None
  assert platform_ops.compiler_options('gpu') is None


def test_an_xla_without_the_cpu_option_compiles_with_its_defaults(monkeypatch):
  monkeypatch.setattr(platform_ops, '_CPU_OPTIONS', {'xla_cpu_no_such_option': 'x'})
  platform_ops._cpu_options_accepted.cache_clear()
  try:
    assert platform_ops.compiler_options('cpu') is None
  finally:
    platform_ops._cpu_options_accepted.cache_clear()
  out = jax.jit(lambda v: v * 2, compiler_options=None)(jnp.ones(2))
  np.testing.assert_array_equal(out, [2, 2])


def test_cpu_attention_keeps_the_logits_matmul_out_of_ynnpack():
  """YNNPACK takes a softmax's row maximum into one fusion with the matmul that produces the
  logits, and runs that several times slower than XLA's matmul: the CPU's attention forward
  leaves YNNPACK its reductions but no matmul."""
  options = platform_ops.compiler_options('cpu')
  if options is None:
    pytest.skip("this jaxlib's XLA does not take the CPU option")
  qkv = (jax.ShapeDtypeStruct((4, 1024, 2, 64), jnp.float32),) * 3
  forward = lambda f: jax.jit(f, compiler_options=options).lower(*qkv).compile().as_text()
  naive = lambda q, k, v: jnp.einsum(
    'bhqk,bkhd->bqhd', jax.nn.softmax(jnp.einsum('bqhd,bkhd->bhqk', q, k), axis=-1), v
  )
  assert any(' dot(' in body for body in _ynn_fusions(forward(naive)))  # what ours avoids
  ours = _ynn_fusions(forward(platform_ops.softmax_attention))
  assert ours and not any(' dot(' in body for body in ours)


def _ref_upsample(x):
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _ref_pool(x):
  import flax.linen as nn  # noqa: PLC0415 (flax's own pooling: the reference)

  return nn.avg_pool(x, (2, 2), strides=(2, 2))


# odd sizes: the last row drops
@pytest.mark.parametrize('shape', [(2, 8, 8, 3), (1, 6, 10, 4), (2, 7, 5, 2)])
def test_resampling_and_its_gradients_equal_the_reference(shape):
  x = jax.random.normal(jax.random.PRNGKey(3), shape)
  loss = lambda f: lambda x: jnp.sum(jnp.sin(f(x)) * jnp.arange(f(x).size).reshape(f(x).shape))
  for ours, ref in (
    (platform_ops.upsample_nearest_2x, _ref_upsample),
    (platform_ops.avg_pool_2x2, _ref_pool),
  ):
    (v1, g1), (v2, g2) = (
      jax.jit(jax.value_and_grad(loss(ours)))(x),
      jax.value_and_grad(loss(ref))(x),
    )
    np.testing.assert_allclose(ours(x), ref(x), rtol=1e-6, atol=1e-6)
    assert abs(float(v1 - v2)) <= 1e-4 * abs(float(v2)) + 1e-4
    assert _rel_err(g1, g2) < 1e-5


def test_cpu_resampling_keeps_the_convolutions_out_of_ynnpack():
  """A down block pools a convolution's output and an up block's convolution gradient flows
  into the upsampling's gradient: YNNPACK would take each convolution into the reduction's
  fusion (45 ms where XLA's convolution takes a few)."""
  options = platform_ops.compiler_options('cpu')
  if options is None:
    pytest.skip("this jaxlib's XLA does not take the CPU option")

  def conv(x, w):
    return platform_ops.conv_general_dilated(
      x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC_HWIO
    )

  def step(up, pool):
    loss = lambda x, w: jnp.sum(jnp.sin(pool(conv(up(x), w))))
    return jax.jit(jax.grad(loss, (0, 1)), compiler_options=options)

  args = (
    jax.ShapeDtypeStruct((4, 16, 16, 64), jnp.float32),
    jax.ShapeDtypeStruct((3, 3, 64, 64), jnp.float32),
  )
  fused = lambda f: [
    b for b in _ynn_fusions(f.lower(*args).compile().as_text()) if 'convolution(' in b
  ]
  assert fused(step(_ref_upsample, _ref_pool))  # what the CPU forms avoid
  assert not fused(step(platform_ops.upsample_nearest_2x, platform_ops.avg_pool_2x2))
