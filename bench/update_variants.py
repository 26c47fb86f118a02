"""The optimiser + EMA update alone, in four forms, to price per-leaf kernels and copies on a GPU.

python -m bench.update_variants --config=configs/adm_sr_256.py [--steps 30] [--json F]

The step updates every parameter leaf separately (536 leaves for adm_sr_256). This times
  optax:         optax's update, the EMA, then the finite guard as a select between the old and
                 the new state (the train step's former form; the select makes XLA copy every
                 donated leaf);
  optax_noguard: the same without the guard;
  fused:         optim.apply_gradients, the step's update now: AdamW written out per leaf with
                 the guard folded into its coefficients, no copies;
  flat:          the same function on params, EMA and moments held as one flat vector each
                 (gradients still arrive as a tree and are concatenated first);
on the config's real parameter shapes with random gradients, so a GPU session can see what the
kernels cost and whether a flat train state is worth adopting. All four compute the same update
(tests/test_bench.py).
"""

import argparse
import functools
import os
import time

import flax
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import optax

from bench import kernels
from bench import train_step as bench_train
from idm_jax.models import unet
from idm_jax.runtime import configlib
from idm_jax.training import optim
from idm_jax.training import train_state

VARIANTS = ('optax', 'optax_noguard', 'fused', 'flat')


def random_tree(shapes, key, scale):
  leaves, treedef = jax.tree.flatten(shapes)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(
    treedef, [scale * jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)]
  )


def optax_update(state, grads, *, tx, config, guard=True, loss=jnp.float32(1.0)):
  """The update as optax computes it, then the EMA, then (guard) keep the old state on a
  non-finite step by selecting leaf by leaf."""
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = optim.ema_decay(state.step, config.train)
  ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema, params)
  new = state.replace(step=state.step + 1, params=params, ema=ema, opt_state=opt_state)
  if guard:
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = jax.tree.map(lambda o, u: jnp.where(finite, u, o), state, new)
    new = new.replace(
      bad_step=jnp.where((state.bad_step < 0) & ~finite, state.step, state.bad_step)
    )
  return new, {}


def flat_update(state, grads, *, config):
  """state: a TrainState whose params, ema and opt_state hold flat vectors; grads: a tree."""
  flat_grads, _ = ravel_pytree(grads)
  return optim.apply_gradients(state, jnp.float32(1.0), flat_grads, train_cfg=config.train)


def flatten_state(state, tx):
  flat_params, _ = ravel_pytree(state.params)
  flat_ema, _ = ravel_pytree(state.ema)
  return state.replace(params=flat_params, ema=flat_ema, opt_state=tx.init(flat_params))


def make_inputs(config, seed=0):
  """(a TrainState with random params and fresh optimiser state, a random gradient tree, tx)
  on the config's parameter shapes."""
  model = configlib.build_model(config.model, config.data.resolution)
  shapes = flax.linen.unbox(unet.param_shapes(model))
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  params = random_tree(shapes, k1, 0.05)
  grads = random_tree(shapes, k2, 1e-3)
  tx = optim.make_optimizer(config.train)
  state = train_state.TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    ema=params,
    opt_state=tx.init(params),
    rng=jax.random.PRNGKey(0),
    bad_step=jnp.full((), -1, jnp.int32),
  )
  return state, grads, tx


def program(variant, tx, config):
  if variant == 'optax':
    fn = functools.partial(optax_update, tx=tx, config=config)
  elif variant == 'optax_noguard':
    fn = functools.partial(optax_update, tx=tx, config=config, guard=False)
  elif variant == 'fused':
    fn = lambda s, g: optim.apply_gradients(s, jnp.float32(1.0), g, train_cfg=config.train)
  else:
    fn = functools.partial(flat_update, config=config)
  return jax.jit(fn, donate_argnums=0)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--config', required=True)
  p.add_argument('--steps', type=int, default=30)
  p.add_argument('--json', default='')
  a = p.parse_args()
  config = configlib.load(a.config)
  base, grads, tx = make_inputs(config)
  n_leaves = len(jax.tree.leaves(base.params))
  for variant in VARIANTS:
    state = flatten_state(base, tx) if variant == 'flat' else base
    state = jax.tree.map(jnp.copy, state)  # the program donates its input
    step = program(variant, tx, config)
    t0 = time.perf_counter()
    compiled = step.lower(state, grads).compile()
    compile_s = time.perf_counter() - t0
    launches = kernels.launch_count(compiled.as_text())
    _, _, median_s = bench_train.time_steps(compiled, state, grads, 3, a.steps)
    bench_train.emit(
      dict(
        config=os.path.basename(a.config),
        update=variant,
        device=jax.devices()[0].device_kind,
        leaves=n_leaves,
        params_m=round(sum(x.size for x in jax.tree.leaves(base.params)) / 1e6, 1),
        update_ms=round(median_s * 1e3, 3),
        kernels=launches['kernels'],
        kernel_ops=dict(list(launches['by_op'].items())[:5]),
        compile_s=round(compile_s, 1),
        jax=jax.__version__,
        date=time.strftime('%Y-%m-%d'),
      ),
      a.json,
    )


if __name__ == '__main__':
  main()
