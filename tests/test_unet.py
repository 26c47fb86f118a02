"""Tests for idm_jax.models.unet on the tiny test config (CPU, seconds).

Compilation dominates the cost, so the models are built once per module and the tests that need
nonzero zero-inits use random parameters drawn with numpy from `param_shapes` (no compile).
"""

import functools

from conftest import REPO
from conftest import load_config
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idm_jax.models import unet
from idm_jax.runtime import configlib

B = 2
RES = 32
# guided-diffusion SuperResModel parameter counts (PyTorch), for configs/adm_sr_*.py.
REFERENCE_COUNTS = {'adm_sr_256': 133.0e6, 'adm_sr_512': 34.3e6}


def _model(**overrides):
  cfg = load_config('test')
  cfg.model.update(overrides)
  return configlib.build_model(cfg.model, cfg.data.resolution)


def _random_params(model, seed):
  """Random params for every leaf (zero-inits included), scaled like a sensible init."""
  rng = np.random.default_rng(seed)
  shapes = nn.meta.unbox(unet.param_shapes(model))

  def draw(path, s):
    name = jax.tree_util.keystr(path)
    if len(s.shape) > 1:  # kernels: unit-variance activations
      fan_in = int(np.prod(s.shape[:-1]))
      x = rng.normal(0.0, 1.0 / np.sqrt(fan_in), s.shape)
    elif 'scale' in name:  # norm scales around 1
      x = 1.0 + 0.1 * rng.normal(size=s.shape)
    else:  # biases and norm offsets
      x = 0.1 * rng.normal(size=s.shape)
    return jnp.asarray(x, s.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _inputs(seed, lq_size=RES // 4):
  rng = np.random.default_rng(seed)
  x_t = jnp.asarray(rng.normal(size=(B, RES, RES, 3)), jnp.float32)
  logsnr = jnp.asarray(rng.uniform(-10, 10, size=(B,)), jnp.float32)
  lq = jnp.asarray(rng.uniform(-1, 1, size=(B, lq_size, lq_size, 3)), jnp.float32)
  return x_t, logsnr, lq


def _apply_fn(model):
  return jax.jit(functools.partial(model.apply), static_argnames=('train',))


@pytest.fixture(scope='module')
def base():
  """The test config's model (conditional, LQ concat + encoder, float32)."""
  model = _model()
  return model, _apply_fn(model)


@pytest.fixture(scope='module')
def base_params(base):
  return _random_params(base[0], seed=1)


def _max_diff(a, b):
  return float(jnp.max(jnp.abs(a - b)))


def test_all_configs_build_and_count_without_allocating():
  # param_shapes is abstract (nothing allocated) and count_params sums exactly its leaves.
  cfg = load_config('test')
  leaves = jax.tree_util.tree_leaves(
    nn.meta.unbox(unet.param_shapes(configlib.build_model(cfg.model, cfg.data.resolution)))
  )
  assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  assert unet.count_params(configlib.build_model(cfg.model, cfg.data.resolution)) == sum(
    int(np.prod(x.shape)) for x in leaves
  )
  for path in sorted((REPO / 'configs').glob('*.py')):
    cfg = load_config(path.stem)
    n = unet.count_params(configlib.build_model(cfg.model, cfg.data.resolution))
    assert n > 0, path.stem
    if path.stem in REFERENCE_COUNTS:
      ref = REFERENCE_COUNTS[path.stem]
      print(f'{path.stem}: ours {n / 1e6:.2f} M, guided-diffusion {ref / 1e6:.1f} M')
      assert abs(n - ref) / ref < 0.02, (path.stem, n, ref)
  assert set(REFERENCE_COUNTS) <= {p.stem for p in (REPO / 'configs').glob('*.py')}


def test_init_output_is_exactly_zero_and_lq_projections_start_at_zero(base):
  model, apply = base
  params = unet.init_params(model, jax.random.key(0))
  x_t, logsnr, lq = _inputs(0)
  out = apply({'params': params}, x_t, logsnr, lq)
  assert out.shape == (B, RES, RES, 3) and out.dtype == jnp.float32
  assert not np.any(np.asarray(out))
  lq_projs = [k for k in params if k.startswith('lq_proj_')]
  assert len(lq_projs) == len(model.channel_mult)
  for k in lq_projs + ['out_conv']:
    assert all(not np.any(np.asarray(v)) for v in jax.tree_util.tree_leaves(params[k])), k
  # A non-zero-init layer really is random.
  assert np.std(np.asarray(params['input_conv']['conv']['kernel'])) > 0


def test_init_is_deterministic_and_params_are_float32(base):
  model, _ = base
  a = unet.init_params(model, jax.random.key(3))
  b = unet.init_params(model, jax.random.key(3))
  c = unet.init_params(model, jax.random.key(4))
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y)
  ka, kc = a['input_conv']['conv']['kernel'], c['input_conv']['conv']['kernel']
  assert not np.allclose(ka, kc)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(a))
  # Input conv sees noisy image + concatenated LQ.
  assert ka.shape == (3, 3, 6, model.channels)


def test_output_depends_on_every_input(base, base_params):
  _, apply = base
  v = {'params': base_params}
  x_t, logsnr, lq = _inputs(0)
  out = apply(v, x_t, logsnr, lq)
  assert out.shape == (B, RES, RES, 3) and out.dtype == jnp.float32
  assert np.all(np.isfinite(out)) and float(jnp.std(out)) > 1e-3
  np.testing.assert_array_equal(out, apply(v, x_t, logsnr, lq))  # deterministic
  x2, logsnr2, lq2 = _inputs(1)
  assert _max_diff(out, apply(v, x2, logsnr, lq)) > 1e-3
  assert _max_diff(out, apply(v, x_t, logsnr + 1.0, lq)) > 1e-3
  assert _max_diff(out, apply(v, x_t, logsnr, lq2)) > 1e-3
  # The examples of a batch are independent: changing example 1 leaves example 0 alone.
  x_mix = x_t.at[1].set(x2[1])
  np.testing.assert_allclose(apply(v, x_mix, logsnr, lq)[0], out[0], atol=1e-5)


def test_quarter_size_lq_equals_bilinear_upsampled_lq(base, base_params):
  _, apply = base
  x_t, logsnr, lq = _inputs(0)
  lq_full = jax.image.resize(lq, (B, RES, RES, 3), 'bilinear')
  np.testing.assert_allclose(
    apply({'params': base_params}, x_t, logsnr, lq),
    apply({'params': base_params}, x_t, logsnr, lq_full),
    atol=1e-5,
  )


def test_lq_reaches_output_through_concat_and_through_encoder(base, base_params):
  _, apply = base
  x_t, logsnr, lq = _inputs(0)
  _, _, lq2 = _inputs(1)
  # Concat path alone: projections zero as at init ⇒ the encoder contributes nothing...
  no_proj = {
    k: (jax.tree_util.tree_map(jnp.zeros_like, v) if k.startswith('lq_proj_') else v)
    for k, v in base_params.items()
  }
  assert (
    _max_diff(
      apply({'params': no_proj}, x_t, logsnr, lq), apply({'params': no_proj}, x_t, logsnr, lq2)
    )
    > 1e-3
  )
  # ...and the encoder path alone, in a model without the concat.
  model = _model(lq_concat=False, lq_encoder=True)
  params = _random_params(model, seed=2)
  assert params['input_conv']['conv']['kernel'].shape[2] == 3
  enc_apply = _apply_fn(model)
  out = enc_apply({'params': params}, x_t, logsnr, lq)
  assert _max_diff(out, enc_apply({'params': params}, x_t, logsnr, lq2)) > 1e-3
  # Each level's projection matters: zero one of them and the output changes.
  for level in range(len(model.channel_mult)):
    p = dict(params)
    p[f'lq_proj_{level}'] = jax.tree_util.tree_map(jnp.zeros_like, params[f'lq_proj_{level}'])
    assert _max_diff(out, enc_apply({'params': p}, x_t, logsnr, lq)) > 1e-4, level
  # With every projection zero the encoder-only model ignores lq.
  p = {
    k: (jax.tree_util.tree_map(jnp.zeros_like, v) if k.startswith('lq_proj_') else v)
    for k, v in params.items()
  }
  np.testing.assert_array_equal(
    enc_apply({'params': p}, x_t, logsnr, lq), enc_apply({'params': p}, x_t, logsnr, lq2)
  )


def test_drop_cond_equals_zero_lq(base, base_params):
  _, apply = base
  v = {'params': base_params}
  x_t, logsnr, lq = _inputs(0)
  zeros = apply(v, x_t, logsnr, jnp.zeros_like(lq))
  cond = apply(v, x_t, logsnr, lq)
  assert _max_diff(zeros, cond) > 1e-3
  np.testing.assert_array_equal(apply(v, x_t, logsnr, lq, drop_cond=jnp.ones((B,), bool)), zeros)
  np.testing.assert_array_equal(apply(v, x_t, logsnr, lq, drop_cond=jnp.zeros((B,), bool)), cond)
  mixed = apply(v, x_t, logsnr, lq, drop_cond=jnp.array([True, False]))
  np.testing.assert_allclose(mixed[0], zeros[0], atol=1e-5)
  np.testing.assert_allclose(mixed[1], cond[1], atol=1e-5)


def test_conditioning_argument_errors():
  x_t, logsnr, lq = _inputs(0)
  key = jax.random.key(0)
  cond = _model()
  with pytest.raises(ValueError, match='conditional'):
    jax.eval_shape(cond.init, key, x_t, logsnr)
  with pytest.raises(ValueError, match='logsnr'):
    jax.eval_shape(cond.init, key, x_t, logsnr[:1], lq)
  uncond = _model(conditional=False, lq_concat=False, lq_encoder=False)
  with pytest.raises(ValueError, match='unconditional'):
    jax.eval_shape(uncond.init, key, x_t, logsnr, lq)
  with pytest.raises(ValueError, match='drop_cond'):
    jax.eval_shape(functools.partial(uncond.init, drop_cond=jnp.ones((B,), bool)), key, x_t, logsnr)
  # The unconditional model has no LQ parameters and maps x_t alone to an output.
  shapes = nn.meta.unbox(unet.param_shapes(uncond))
  assert not any(k.startswith('lq_') for k in shapes)
  assert shapes['input_conv']['conv']['kernel'].shape[2] == 3
  out = jax.eval_shape(uncond.apply, {'params': shapes}, x_t, logsnr)
  assert out.shape == (B, RES, RES, 3) and out.dtype == jnp.float32


def test_gradients_reach_every_parameter(base, base_params):
  model, _ = base
  x_t, logsnr, lq = _inputs(0)
  w = jnp.asarray(np.random.default_rng(5).normal(size=(B, RES, RES, 3)), jnp.float32)

  def loss(params):
    return jnp.sum(w * model.apply({'params': params}, x_t, logsnr, lq))

  grads = jax.jit(jax.grad(loss))(base_params)
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  assert len(flat) == len(jax.tree_util.tree_leaves(base_params))
  dead = [jax.tree_util.keystr(p) for p, g in flat if not np.any(np.asarray(g) != 0)]
  assert not dead, f'no gradient reaches {dead}'


def test_bfloat16_compute_with_float32_params(base, base_params):
  model16 = _model(dtype='bfloat16', param_dtype='float32')
  shapes = nn.meta.unbox(unet.param_shapes(model16))
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(shapes))
  assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(base_params)
  x_t, logsnr, lq = _inputs(0)
  out16 = _apply_fn(model16)({'params': base_params}, x_t, logsnr, lq)
  out32 = base[1]({'params': base_params}, x_t, logsnr, lq)
  assert out16.dtype == jnp.float32 and np.all(np.isfinite(out16))
  # bf16 has an 8-bit mantissa: expect percent-level, not exact, agreement with float32.
  rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
  assert 0 < rel < 0.1, rel


def test_dropout_with_remat(base, base_params):
  """Dropout (through nn.remat'd ResBlocks): random in training, off in evaluation."""
  model = _model(dropout=0.3, remat=True)
  apply = _apply_fn(model)
  v = {'params': base_params}
  x_t, logsnr, lq = _inputs(0)
  k1, k2 = jax.random.key(1), jax.random.key(2)
  a = apply(v, x_t, logsnr, lq, train=True, rngs={'dropout': k1})
  b = apply(v, x_t, logsnr, lq, train=True, rngs={'dropout': k2})
  assert _max_diff(a, b) > 1e-3
  np.testing.assert_array_equal(a, apply(v, x_t, logsnr, lq, train=True, rngs={'dropout': k1}))
  # Evaluation mode: no dropout, identical to the same params in the dropout-free model.
  np.testing.assert_allclose(apply(v, x_t, logsnr, lq), base[1](v, x_t, logsnr, lq), atol=1e-5)


def test_every_param_is_boxed_with_logical_names_of_its_rank(base):
  model, _ = base
  boxed = unet.param_shapes(model)
  leaves = jax.tree_util.tree_leaves(
    boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
  )
  assert len(leaves) == len(jax.tree_util.tree_leaves(nn.meta.unbox(boxed)))
  allowed = {4: unet.CONV_KERNEL_AXES, 2: unet.DENSE_KERNEL_AXES, 1: unet.CHANNEL_AXES}
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned), leaf
    assert len(leaf.names) == leaf.value.ndim
    assert tuple(leaf.names) == allowed[leaf.value.ndim]
  specs = nn.get_partition_spec(boxed)
  assert specs['input_conv']['conv']['kernel'] == jax.sharding.PartitionSpec(*unet.CONV_KERNEL_AXES)


def test_activation_constraints_trace_under_a_mesh_with_rules(base):
  """The activation annotations name axes of the right rank (checked when rules are active)."""
  model, _ = base
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  rules = [
    ('batch', 'data'),
    ('height', None),
    ('width', None),
    ('channels', None),
    ('tokens', None),
  ]
  x_t, logsnr, lq = _inputs(0)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    out = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x_t, logsnr, lq)[0])
  assert out.shape == (B, RES, RES, 3)


def test_logsnr_embedding_is_finite_and_resolves_the_whole_range():
  logsnr = jnp.linspace(-20.0, 20.0, 81)
  emb = unet.logsnr_embedding(logsnr, 64)
  assert emb.shape == (81, 64) and emb.dtype == jnp.float32 and np.all(np.isfinite(emb))
  d = np.linalg.norm(np.diff(np.asarray(emb), axis=0), axis=1)  # steps of 0.5 in log-SNR
  assert d.min() > 0.5  # neighbouring noise levels are clearly distinguishable
  assert np.all(np.isfinite(unet.logsnr_embedding(jnp.array([-40.0, 40.0]), 7)))


@pytest.mark.parametrize(
  'shape, groups', [((2, 8, 8, 32), 8), ((3, 5, 7, 12), 3), ((1, 4, 4, 8), 8)]
)
def test_group_norm_equals_flax_group_norm_with_the_scale_and_shift(shape, groups):
  """unet.group_norm (sums over pixels, then over a group's channels) computes flax's GroupNorm
  followed by `* (1 + scale) + shift`, values and gradients, at an offset mean so that the
  variance formula is exercised."""
  keys = jax.random.split(jax.random.PRNGKey(3), 5)
  x = 3.0 + 2.0 * jax.random.normal(keys[0], shape)
  gamma = 1.0 + 0.1 * jax.random.normal(keys[1], shape[-1:])
  beta = 0.1 * jax.random.normal(keys[2], shape[-1:])
  scale = 0.2 * jax.random.normal(keys[3], (shape[0], 1, 1, shape[-1]))
  shift = 0.2 * jax.random.normal(keys[4], (shape[0], 1, 1, shape[-1]))
  flax_norm = nn.GroupNorm(num_groups=groups, epsilon=1e-5)
  params = {'params': {'scale': gamma, 'bias': beta}}

  def ref(x, gamma, beta, scale, shift):
    h = flax_norm.apply({'params': {'scale': gamma, 'bias': beta}}, x)
    return h * (1.0 + scale) + shift

  def ours(x, gamma, beta, scale, shift):
    return unet.group_norm(x, gamma, beta, groups, 1e-5, scale, shift)

  args = (x, gamma, beta, scale, shift)
  np.testing.assert_allclose(ours(*args), ref(*args), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    unet.group_norm(x, gamma, beta, groups, 1e-5), flax_norm.apply(params, x), rtol=1e-5, atol=1e-5
  )
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(3.0 * f(*a)))
  for got, want in zip(jax.grad(loss(ours), range(5))(*args), jax.grad(loss(ref), range(5))(*args)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))
