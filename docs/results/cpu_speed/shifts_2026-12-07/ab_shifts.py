"""A/B of the 3x3 convolutions' kernel gradient in the whole train step (2026-12-07, fourth
session): XLA's own (a convolution over operands transposed with the batch innermost) against
`platform_ops.kernel_grad_by_shifts` on maps of at least 32 or 64 pixels a side, all programs
compiled in one process and timed alternately, rounds rotating the order.

Run from the repository root (the allocator as the driver's, TCMalloc where installed):
  PYTHONPATH=. python docs/results/cpu_speed/shifts_2026-12-07/ab_shifts.py CONFIG PGID[,PGID] ROUNDS
The process groups given (0: none) are paused with SIGSTOP while timing, so the cores are idle.
Prints each round's median step per arm, then the paired differences against XLA's form with a
bootstrap 95% interval of their mean."""

import os
import random
import signal
import statistics
import sys
import time

import jax

from bench import train_step as ts
from idm_jax.models import platform_ops
from idm_jax.runtime import allocator, configlib
from idm_jax.training import train

if __name__ == '__main__':
  allocator.use_tcmalloc()
  config = configlib.load(sys.argv[1])
  pgids = [int(p) for p in sys.argv[2].split(',') if int(p) > 0]
  rounds = int(sys.argv[3])
  print('allocator', allocator.in_use(), 'devices', jax.devices(), flush=True)
  trainer, state, batch = ts.setup(config)
  spec = trainer.batch_spec(config.train.batch_size)
  default = platform_ops._LARGE_MAP
  progs = {}
  for name, large in [('xla', 10**9), ('shifts>=32', 32), ('shifts>=64', 64)]:
    platform_ops._LARGE_MAP = large  # read by cpu_conv_form when the step is traced
    fn = lambda s, b: train.train_step(
      s, b, model=trainer.model, config=config, logsnr_fn=trainer.logsnr_fn
    )
    t = time.perf_counter()
    progs[name] = ts.compile_part(fn, trainer, spec)
    print(name, 'compiled in', round(time.perf_counter() - t), 's', flush=True)
  platform_ops._LARGE_MAP = default
  for p in pgids:
    os.killpg(p, signal.SIGSTOP)
  try:
    time.sleep(2)
    res = {k: [] for k in progs}
    for name, p in progs.items():
      state, m, _ = ts.time_steps(p, state, batch, warmup=2, steps=1)
    names = list(progs)
    for r in range(rounds):
      order = names[r % len(names) :] + names[: r % len(names)]
      for name in order:
        state, m, med = ts.time_steps(progs[name], state, batch, warmup=1, steps=3)
        res[name].append(med)
      print('round', r, {k: round(v[-1], 3) for k, v in res.items()}, flush=True)
  finally:
    for p in pgids:
      os.killpg(p, signal.SIGCONT)
  print({k: (round(min(v), 3), round(statistics.median(v), 3)) for k, v in res.items()})
  rng = random.Random(0)
  for name in names[1:]:
    d = [a - b for a, b in zip(res['xla'], res[name])]
    boots = sorted(statistics.mean(rng.choices(d, k=len(d))) for _ in range(10000))
    print(f'xla - {name}, s: mean {statistics.mean(d):.4f} [{boots[249]:.4f}, {boots[9749]:.4f}]',
          'per round', [round(v, 3) for v in d], flush=True)
