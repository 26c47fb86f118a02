"""The optimiser: the per-leaf AdamW + EMA against optax, the finite guard, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from idm_jax.runtime import parallel
from idm_jax.training import optim
from idm_jax.training import train


def _trainer_state(config):
  trainer = train.Trainer(config, parallel.make_mesh(config.mesh))
  return trainer.init(jax.random.PRNGKey(0))


@pytest.mark.parametrize('clip', [0.0, 1e-3])
def test_update_equals_optax_then_the_ema(test_config, clip):
  """Three steps of apply_gradients equal make_optimizer's optax update followed by the EMA
  (with clipping active, and off): a bias correction or EMA step one off fails this."""
  c = test_config
  c.train.update(grad_clip=clip, warmup_steps=2, ema_decay=0.9, ema_warmup=True, weight_decay=0.01)
  state = _trainer_state(c)
  tx = optim.make_optimizer(c.train)
  rng = np.random.default_rng(0)
  grads = [
    jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 1e-2, p.dtype), state.params)
    for _ in range(3)
  ]
  params, ema, opt_state = state.params, state.ema, state.opt_state
  ours = state
  update = jax.jit(lambda s, g: optim.apply_gradients(s, jnp.float32(1.0), g, train_cfg=c.train))
  for i, g in enumerate(grads):
    updates, opt_state = tx.update(g, opt_state, params)
    params = optax.apply_updates(params, updates)
    d = float(optim.ema_decay(jnp.int32(i), c.train))
    ema = jax.tree.map(lambda e, p, d=d: e + (1 - d) * (p - e), ema, params)
    ours, metrics = update(ours, g)
  assert int(ours.step) == 3 and int(ours.bad_step) == -1
  assert float(metrics['lr']) == pytest.approx(float(optim.learning_rate_schedule(c.train)(2)))
  moved = max(
    float(jnp.abs(a - b).max())
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.params))
  )
  assert moved > 1e-4  # the update did something
  for got, want in [
    (ours.params, params),
    (ours.ema, ema),
    (optim.adam_state(ours.opt_state).mu, optim.adam_state(opt_state).mu),
  ]:
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_ema_decay_warmup_ramps_then_holds(test_config):
  t = test_config.train
  t.update(ema_decay=0.99, ema_warmup=True)
  got = [float(optim.ema_decay(jnp.int32(s), t)) for s in (0, 10, 10_000)]
  assert got[0] == pytest.approx(0.1) and got[1] == pytest.approx(11 / 20)
  assert got[2] == pytest.approx(0.99)
  t.ema_warmup = False
  assert float(optim.ema_decay(jnp.int32(0), t)) == pytest.approx(0.99)


@pytest.mark.parametrize('poison', ['grads', 'loss', 'params'])
def test_nonfinite_step_leaves_every_value_bit_identical(test_config, poison):
  """The guard folded into the update's coefficients keeps params, EMA, moments and counters
  exactly, after a normal step and whatever is non-finite (even params that already are)."""
  state = _trainer_state(test_config)
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 1e-3, p.dtype), state.params)
  update = jax.jit(lambda s, l, g: optim.apply_gradients(s, l, g, train_cfg=test_config.train))
  state, _ = update(state, jnp.float32(1.0), grads)
  loss = jnp.float32(jnp.nan if poison == 'loss' else 1.0)
  if poison == 'grads':
    grads = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.inf), grads)
  if poison == 'params':
    state = state.replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))
    loss = jnp.float32(jnp.nan)
  after, _ = update(state, loss, grads)
  assert int(after.bad_step) == int(state.step) == 1
  for got, want in zip(
    jax.tree.leaves(after.replace(bad_step=state.bad_step)), jax.tree.leaves(state)
  ):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_update_keeps_every_dtype_with_bfloat16_params(test_config):
  """The update computes in float32 but never changes what the state holds (a changed dtype
  would recompile the step and change the checkpoint)."""
  from idm_jax.runtime import parallel

  test_config.model.param_dtype = 'bfloat16'
  trainer = train.Trainer(test_config, parallel.make_mesh(test_config.mesh))
  state = trainer.init(jax.random.PRNGKey(0))
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 1e-3, p.dtype), state.params)
  after, _ = jax.jit(
    lambda s, g: optim.apply_gradients(s, jnp.float32(1.0), g, train_cfg=test_config.train)
  )(state, grads)
  dtypes = lambda tree: [x.dtype for x in jax.tree.leaves(tree)]
  assert jnp.bfloat16 in dtypes(state.params)
  assert dtypes(after) == dtypes(state)
  assert int(after.step) == 1
