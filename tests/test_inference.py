"""Restorer: shapes, determinism, per-example seeds, the fidelity and guidance knobs, sharding."""

import json
import os
import subprocess
import sys

from conftest import REPO
from conftest import load_config
import numpy as np
import pytest

from idm_jax.inference import engine
from idm_jax.models import unet
from idm_jax.runtime import configlib


def _restorer(config, seed=0):
  model = configlib.build_model(config.model, config.data.resolution)
  return engine.Restorer(config, engine.random_params(model, seed))


@pytest.fixture(scope='module')
def restorer():
  return _restorer(load_config('test'))


@pytest.fixture(scope='module')
def lq():
  return np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope='module')
def restored(restorer, lq):
  return restorer.restore(lq, seed=1)


def _diff(a, b):
  return np.abs(a.astype(np.int32) - b.astype(np.int32))


def test_restore_shape_dtype_and_determinism(restorer, lq, restored):
  assert restored.shape == lq.shape and restored.dtype == np.uint8
  assert restored.std() > 10  # random params: a non-trivial output, not a constant
  again = restorer.restore(lq, seed=1)
  np.testing.assert_array_equal(again, restored)
  other_seed = restorer.restore(lq, seed=2)
  assert _diff(other_seed, restored).mean() > 5
  # The output depends on the LQ input, not only on the noise.
  swapped = restorer.restore(lq[::-1].copy(), seed=1, indices=[0, 1, 2])
  assert _diff(swapped[0], restored[0]).mean() > 5


def test_result_follows_the_example_not_its_batch_position(restorer, lq, restored):
  # Same compiled batch shape, permuted order with matching indices: identical results.
  perm = restorer.restore(lq[[2, 0, 1]], seed=1, indices=[2, 0, 1])
  assert _diff(perm, restored[[2, 0, 1]]).max() <= 1
  # Batch size 1 with index_offset: the same as inside the batch of 3.
  single = restorer.restore(lq[1:2], seed=1, index_offset=1)
  assert _diff(single[0], restored[1]).max() <= 1


def test_t_start_starts_from_the_noised_lq(restorer, lq, restored):
  # At t_start close to 0 the sampler starts from the LQ with little noise, so the output stays
  # close to it whatever the (random) network predicts; from pure noise it does not.
  near = restorer.restore(lq, seed=1, t_start=0.02)
  assert _diff(near, lq).mean() < 10
  assert _diff(restored, lq).mean() > 40


def test_guidance_changes_the_result_deterministically(restorer, lq, restored):
  g = restorer.restore(lq, seed=1, guidance_scale=3.0)
  assert g.shape == lq.shape and g.dtype == np.uint8
  assert _diff(g, restored).mean() > 5
  np.testing.assert_array_equal(g, restorer.restore(lq, seed=1, guidance_scale=3.0))


def test_bad_inputs_raise(restorer, lq):
  with pytest.raises(ValueError, match='uint8'):
    restorer.restore(lq.astype(np.float32))
  with pytest.raises(ValueError, match=r'\(B, 32, 32, 3\)'):
    restorer.restore(np.zeros((2, 16, 16, 3), np.uint8))
  with pytest.raises(ValueError, match='t_start'):
    restorer.restore(lq, t_start=0.0)
  with pytest.raises(ValueError, match='sampler'):
    restorer.restore(lq, sampler='euler')
  with pytest.raises(ValueError, match='seed'):
    restorer.restore(lq, seed=-1)
  with pytest.raises(ValueError, match='unconditional|conditional'):
    restorer.generate(2)


def test_params_that_do_not_fit_the_config_are_rejected():
  config = load_config('test')
  params = _restorer(config).params
  other = load_config('test')
  other.model.channels = 32
  with pytest.raises(ValueError, match='wrong shapes'):
    engine.Restorer(other, params)


def test_generate_unconditional_is_batching_independent():
  config = load_config('test')
  config.model.conditional = False
  r = _restorer(config)
  three = r.generate(3, seed=4, batch_size=2)
  assert three.shape == (3, 32, 32, 3) and three.dtype == np.uint8
  assert three.std() > 10
  last = r.generate(1, seed=4, batch_size=2, index_offset=2)
  assert _diff(last[0], three[2]).max() <= 1
  assert _diff(three[0], three[1]).mean() > 5  # different samples, not one repeated
  with pytest.raises(ValueError, match='conditional'):
    r.restore(np.zeros((1, 32, 32, 3), np.uint8))


_SHARDED_SCRIPT = r"""
import json, sys
import jax, numpy as np
sys.path.insert(0, sys.argv[1])
from conftest import load_config
from idm_jax.inference import engine
from idm_jax.runtime import configlib
assert len(jax.local_devices()) == 4, jax.local_devices()
config = load_config('test')
r = engine.Restorer(config, engine.random_params(
    configlib.build_model(config.model, config.data.resolution), 0))
lq = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
out = r.restore(lq, seed=1)   # 3 examples padded to 4 devices
print(json.dumps(dict(n=r.mesh.size, out=out.tolist())))
"""


def test_sharded_over_four_devices_matches_one_device(restored):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4', JAX_PLATFORMS='cpu')
  proc = subprocess.run(
    [sys.executable, '-c', _SHARDED_SCRIPT, str(REPO / 'tests')],
    capture_output=True,
    text=True,
    env=env,
    cwd=REPO,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result['n'] == 4
  out = np.array(result['out'], np.uint8)
  assert out.shape == restored.shape
  assert _diff(out, restored).max() <= 1


def test_residual_model_at_init_returns_its_input_and_learns_hq_minus_lq():
  """Zero-initialised output layers: a residual x0 model restores to the LQ exactly, and its
  training loss is the mean square of hq - lq (a plain model's would be that of hq)."""
  import jax

  from idm_jax.runtime import configlib
  from idm_jax.training import train

  config = load_config('test')
  config.diffusion.update(residual=True, parameterization='x0')
  model = configlib.build_model(config.model, config.data.resolution)
  params = unet.init_params(model, jax.random.key(0))
  lq = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  hq = np.random.default_rng(2).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  np.testing.assert_array_equal(engine.Restorer(config, params).restore(lq, steps=3), lq)
  logsnr_fn = configlib.logsnr_fn(config.diffusion, 32)
  batch = {'hq': hq, 'lq': lq}
  f = lambda x: x.astype(np.float32) / 127.5 - 1  # noqa: E731
  loss = train.loss_fn(params, model, batch, jax.random.key(3), config, logsnr_fn)
  np.testing.assert_allclose(loss, np.mean(np.square(f(hq) - f(lq))), rtol=1e-5)
  config.diffusion.residual = False
  loss = train.loss_fn(params, model, batch, jax.random.key(3), config, logsnr_fn)
  np.testing.assert_allclose(loss, np.mean(np.square(f(hq))), rtol=1e-5)
