"""A/B of the SiLU's form in the whole parity step (2026-12-07, third session), kept as it ran
(its tanh form is now platform_ops.silu's CPU form):
flax's nn.silu (x * sigmoid(x), which XLA's CPU backend lowers as 1 / (1 + exp(-x)) with a
division, and JAX's derivative of it) against x * (0.5 * tanh(x / 2) + 0.5) with its closed-form
derivative s * (1 + x * (1 - s)) (a custom_jvp), both compiled in one process, timed alternately.

Run from the repository root under the driver's allocator:
  LD_PRELOAD=libtcmalloc_minimal.so.4 PYTHONPATH=. python docs/results/cpu_speed/silu_2026-12-07/ab_silu.py \
    configs/adm_sr_64_cpu.py PGID[,PGID] ROUNDS
The process groups given are paused with SIGSTOP while timing, so the cores are idle."""

import os
import signal
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from bench import train_step as ts
from idm_jax.runtime import configlib
from idm_jax.training import train


@jax.custom_jvp
def silu_tanh(x):
  return x * (0.5 * jnp.tanh(0.5 * x) + 0.5)


@silu_tanh.defjvp
def _silu_tanh_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  s = 0.5 * jnp.tanh(0.5 * x) + 0.5
  return x * s, dx * (s * (1 + x * (1 - s)))


config = configlib.load(sys.argv[1])
pgids = [int(p) for p in sys.argv[2].split(',') if int(p) > 0]
rounds = int(sys.argv[3])
trainer, state, batch = ts.setup(config)
spec = trainer.batch_spec(config.train.batch_size)
flax_silu = nn.silu
progs = {}
for name, act in [('exp', flax_silu), ('tanh', silu_tanh)]:
  nn.silu = act  # the UNet looks nn.silu up when traced
  fn = lambda s, b: train.train_step(
    s, b, model=trainer.model, config=config, logsnr_fn=trainer.logsnr_fn
  )
  t = time.perf_counter()
  progs[name] = ts.compile_part(fn, trainer, spec)
  print(name, 'compiled in', round(time.perf_counter() - t), 's', flush=True)
nn.silu = flax_silu
x = jnp.linspace(-20, 20, 100001)
g = jax.vmap(jax.grad(lambda v: flax_silu(v)))(x)
gt = jax.vmap(jax.grad(silu_tanh))(x)
print('max |silu difference|', float(jnp.max(jnp.abs(flax_silu(x) - silu_tanh(x)))),
      'max |derivative difference|', float(jnp.max(jnp.abs(g - gt))), flush=True)
for p in pgids:
  os.killpg(p, signal.SIGSTOP)
try:
  time.sleep(2)
  res = {k: [] for k in progs}
  for name, p in progs.items():
    state, m, _ = ts.time_steps(p, state, batch, warmup=2, steps=1)
  for r in range(rounds):
    for name, p in progs.items() if r % 2 == 0 else reversed(progs.items()):
      state, m, med = ts.time_steps(p, state, batch, warmup=1, steps=3)
      res[name].append(med)
    print('round', r, {k: round(v[-1], 3) for k, v in res.items()}, flush=True)
finally:
  for p in pgids:
    os.killpg(p, signal.SIGCONT)
print({k: (round(min(v), 3), round(statistics.median(v), 3)) for k, v in res.items()})
d = [a - b for a, b in zip(res['exp'], res['tanh'])]
print('paired exp - tanh, s: mean', round(statistics.mean(d), 4), 'per round', [round(v, 3) for v in d])
