"""The optimiser: learning-rate schedule, AdamW, the EMA and the guard against non-finite steps.

`make_optimizer` is the optax chain whose `init` gives the train state's layout and whose update
`apply_gradients` reproduces (tests/test_optim.py checks it against optax). `apply_gradients`
writes the arithmetic out per leaf so that the finite guard costs nothing: a non-finite step
runs with unit decays and a zero step size, which leaves every value as it was, instead of
selecting between the old and the new state after the update, a select that made XLA copy every
donated leaf first (docs/PERFORMANCE.md has the measurements).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from idm_jax.training.train_state import TrainState

ADAM_EPS = 1e-8  # optax.adamw's default, which make_optimizer uses


def learning_rate_schedule(train_cfg) -> optax.Schedule:
  warmup = optax.linear_schedule(0.0, train_cfg.learning_rate, max(train_cfg.warmup_steps, 1))
  if train_cfg.lr_schedule == 'cosine':
    after = optax.cosine_decay_schedule(
      train_cfg.learning_rate, max(train_cfg.num_steps - train_cfg.warmup_steps, 1)
    )
  else:
    after = optax.constant_schedule(train_cfg.learning_rate)
  return optax.join_schedules([warmup, after], [train_cfg.warmup_steps])


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  """Global-norm clipping (if train.grad_clip > 0), then AdamW on the schedule."""
  parts = []
  if train_cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(train_cfg.grad_clip))
  parts.append(
    optax.adamw(
      learning_rate_schedule(train_cfg),
      b1=train_cfg.b1,
      b2=train_cfg.b2,
      weight_decay=train_cfg.weight_decay,
    )
  )
  return optax.chain(*parts)


def ema_decay(step: jax.Array, train_cfg) -> jax.Array:
  """Constant decay, or the warmup form min(decay, (1 + s) / (10 + s)) so early EMA tracks."""
  decay = jnp.asarray(train_cfg.ema_decay, jnp.float32)
  if train_cfg.ema_warmup:
    s = step.astype(jnp.float32)
    decay = jnp.minimum(decay, (1.0 + s) / (10.0 + s))
  return decay


def apply_gradients(state: TrainState, loss, grads, *, train_cfg) -> tuple[TrainState, dict]:
  """make_optimizer(train_cfg).update, then the EMA, skipped as a whole if loss or gradient
  norm is not finite (the state's bad_step records the first such step). The state keeps
  optax's layout and every leaf's dtype; the arithmetic runs in float32."""
  t = train_cfg
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  clip = jnp.float32(1.0)
  if t.grad_clip > 0:  # optax.clip_by_global_norm
    clip = jnp.where(grad_norm < t.grad_clip, 1.0, t.grad_clip / grad_norm)
  adam = adam_state(state.opt_state)
  count = adam.count + finite.astype(adam.count.dtype)
  # (1 - b) in Python floats, as optax takes it: 1 - float32(0.999) is 1.3e-5 off.
  b1, one_minus_b1 = jnp.where(finite, t.b1, 1.0), jnp.where(finite, 1.0 - t.b1, 0.0)
  b2, one_minus_b2 = jnp.where(finite, t.b2, 1.0), jnp.where(finite, 1.0 - t.b2, 0.0)
  bias1 = 1.0 - t.b1 ** count.astype(jnp.float32)
  bias2 = 1.0 - t.b2 ** count.astype(jnp.float32)
  lr = learning_rate_schedule(t)(state.step)
  decay = ema_decay(state.step, t)

  def one_leaf(p, g, m, v, e):
    dtypes = p.dtype, m.dtype, v.dtype, e.dtype  # kept: the arithmetic runs in float32
    g = jnp.where(finite, g * clip, 0.0)
    m = b1 * m + one_minus_b1 * g
    v = b2 * v + one_minus_b2 * g * g
    update = (m / bias1) / (jnp.sqrt(v / bias2) + ADAM_EPS) + t.weight_decay * p
    p = p - jnp.where(finite, lr * update, 0.0)
    e = e + jnp.where(finite, (1.0 - decay) * (p.astype(dtypes[0]) - e), 0.0)
    return tuple(x.astype(d) for x, d in zip((p, m, v, e), dtypes))

  treedef = jax.tree.structure(state.params)
  out = treedef.flatten_up_to(
    jax.tree.map(one_leaf, state.params, grads, adam.mu, adam.nu, state.ema)
  )
  params, mu, nu, ema = (treedef.unflatten([leaf[i] for leaf in out]) for i in range(4))

  def advance(node):  # every counter in the chain (Adam's, the schedule's) counts finite steps
    if node is adam:
      return adam._replace(count=count, mu=mu, nu=nu)
    if has_count(node):
      return node._replace(count=node.count + finite.astype(node.count.dtype))
    return node

  opt_state = jax.tree.map(advance, state.opt_state, is_leaf=has_count)
  step = state.step + finite.astype(state.step.dtype)
  bad_step = jnp.where((state.bad_step < 0) & ~finite, state.step, state.bad_step)
  new = state.replace(step=step, params=params, ema=ema, opt_state=opt_state, bad_step=bad_step)
  metrics = dict(loss=loss, grad_norm=grad_norm, lr=lr, ema_decay=decay)
  return new, metrics


def has_count(node) -> bool:
  """An optax state with a step counter (a NamedTuple with a `count` field)."""
  return 'count' in getattr(node, '_fields', ())


def adam_state(opt_state):
  """The ScaleByAdamState (count, mu, nu) inside make_optimizer's chain."""
  found = [
    s for s in jax.tree.leaves(opt_state, is_leaf=has_count) if has_count(s) and hasattr(s, 'mu')
  ]
  if len(found) != 1:
    raise ValueError(f'expected one Adam state in the optimiser state, found {len(found)}')
  return found[0]
