"""The A/B of docs/PERFORMANCE.md (2026-12-07), kept as it ran: the old CPU forms (jax.nn.softmax,
JAX-differentiated patches @ kernel, reduce-window pooling, jnp.repeat upsampling) against
this tree's, both compiled in one process.

Run from the repository root: PYTHONPATH=. python docs/results/cpu_speed/ab_step_2026-12-07.py
configs/adm_sr_64_cpu.py PGID ROUNDS (PGID 0: pause nothing).

A/B of the whole parity step: variants compiled in one process, timed alternately; the P1
process group (argv[2]) is paused with SIGSTOP while timing, so the cores are idle."""

import os
import signal
import statistics
import sys
import time

import jax
from jax import lax
import jax.numpy as jnp

from bench import train_step as ts
from idm_jax.models import platform_ops as po
from idm_jax.runtime import configlib
from idm_jax.training import train

config = configlib.load(sys.argv[1])
pgid = int(sys.argv[2])
rounds = int(sys.argv[3])
bs = config.train.batch_size
trainer, state, batch = ts.setup(config)
spec = trainer.batch_spec(bs)
new_block = po._attention_block


def old_block(q, k, v):
  logits = jnp.einsum('bqhd,bkhd->bhqk', q * (q.shape[-1] ** -0.5), k)
  return jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(logits, axis=-1), v)


progs = {}
new_mm = po._matmul
new_pool, new_up = po.avg_pool_2x2, po.upsample_nearest_2x

old_pool = lambda x: lax.reduce_window(x, 0.0, lax.add, (1, 2, 2, 1), (1, 2, 2, 1), 'VALID') / 4
old_up = lambda x: jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
old_mm = lambda c, k, p: jnp.dot(c, k, precision=p)
for name, blk, mm, pool, up in [
  ('old', old_block, old_mm, old_pool, old_up),
  ('new', new_block, new_mm, new_pool, new_up),
]:
  po._attention_block = blk
  po._matmul = mm
  po.avg_pool_2x2 = pool
  po.upsample_nearest_2x = up
  fn = lambda s, b: train.train_step(
    s, b, model=trainer.model, config=config, logsnr_fn=trainer.logsnr_fn
  )
  t = time.perf_counter()
  progs[name] = ts.compile_part(fn, trainer, spec)
  print(name, 'compiled in', round(time.perf_counter() - t), 's', flush=True)
os.killpg(pgid, signal.SIGSTOP) if pgid > 0 else None
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
  os.killpg(pgid, signal.SIGCONT) if pgid > 0 else None
print({k: (round(min(v), 3), round(statistics.median(v), 3)) for k, v in res.items()})
