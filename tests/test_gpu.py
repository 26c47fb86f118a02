"""Checks that only mean something on an accelerator (skipped on the CPU): bf16 numerics, fused
attention, and the sharded paths on real devices. Run by bench/gpu_check.sh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idm_jax.inference import engine
from idm_jax.models import unet
from idm_jax.runtime import configlib
from idm_jax.runtime import parallel
from idm_jax.training import train

pytestmark = pytest.mark.skipif(jax.default_backend() == 'cpu', reason='needs a GPU or TPU')


def _loss_after_steps(config, steps=3):
  mesh = parallel.make_mesh(config.mesh)
  trainer = train.Trainer(config, mesh)
  state = trainer.init(jax.random.PRNGKey(0))
  step = trainer.compile_step(config.train.batch_size)
  r = config.data.resolution
  rng = np.random.default_rng(0)
  batch = parallel.local_batch_to_global(
    {
      k: rng.integers(0, 256, (config.train.batch_size, r, r, 3), dtype=np.uint8)
      for k in ('hq', 'lq')
    },
    mesh,
  )
  losses = []
  for _ in range(steps):
    state, m = step(state, batch)
    losses.append(float(m['loss']))
  return np.array(losses), state


def test_bf16_training_tracks_float32(test_config):
  """bf16 compute (f32 params) gives finite losses within a few percent of f32, params stay f32."""
  test_config.model.dtype = 'float32'
  f32, _ = _loss_after_steps(test_config)
  test_config.model.dtype = 'bfloat16'
  bf16, state = _loss_after_steps(test_config)
  assert np.isfinite(bf16).all()
  np.testing.assert_allclose(bf16, f32, rtol=5e-2)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))


def test_cudnn_and_xla_attention_agree(test_config):
  if jax.default_backend() != 'gpu':
    pytest.skip('cuDNN attention is a GPU path')
  test_config.model.dtype = 'bfloat16'
  outs = []
  for impl in ('xla', 'cudnn'):
    test_config.model.attention_impl = impl
    model = configlib.build_model(test_config.model, 32)
    params = engine.random_params(model, seed=0)
    x, logsnr, lq = unet.dummy_inputs(model, 4)
    x = jax.random.normal(jax.random.PRNGKey(1), x.shape)
    outs.append(np.asarray(jax.jit(lambda p: model.apply({'params': p}, x, logsnr, lq))(params)))
  rel = np.abs(outs[0] - outs[1]).max() / np.abs(outs[0]).max()
  assert rel < 3e-2, rel


def test_restorer_on_all_local_devices_is_deterministic(test_config):
  model = configlib.build_model(test_config.model, 32)
  restorer = engine.Restorer(test_config, engine.random_params(model, seed=0))
  lq = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
  a = restorer.restore(lq, steps=3, seed=1)
  b = restorer.restore(lq, steps=3, seed=1)
  np.testing.assert_array_equal(a, b)
  single = engine.Restorer(
    test_config,
    engine.random_params(model, seed=0),
    mesh=parallel.sampling_mesh(jax.local_devices()[:1]),
  ).restore(lq, steps=3, seed=1)
  assert np.abs(a.astype(int) - single.astype(int)).max() <= 2  # cross-device float order
