"""Restoration throughput: faces/s of the whole sampler loop (one jit) at a batch size.

python -m bench.sample --config=configs/ffhq.py --steps 25 --batch 16 [--repeats 5] [--json F]

Random weights (the speed does not depend on them); the batch is sharded over local devices.
Reports the median of `--repeats` timed restorations after one warm-up (which compiles).
"""

import argparse
import os
import statistics
import time

import jax
import numpy as np

from bench.train_step import emit
from idm_jax.inference import engine
from idm_jax.runtime import configlib


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--config', required=True)
  p.add_argument('--steps', type=int, default=25)
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--sampler', default='ddim')
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--json', default='')
  a = p.parse_args()
  config = configlib.load(a.config)
  res = config.data.resolution
  model = configlib.build_model(config.model, res)
  restorer = engine.Restorer(config, engine.random_params(model, seed=0))
  lq = np.random.default_rng(0).integers(0, 256, (a.batch, res, res, 3), dtype=np.uint8)
  kw = dict(steps=a.steps, sampler=a.sampler)
  t = time.perf_counter()
  restorer.restore(lq, **kw)
  compile_s = time.perf_counter() - t
  times = []
  for i in range(a.repeats):
    t = time.perf_counter()
    restorer.restore(lq, seed=i, **kw)  # returns host uint8: the timing includes the transfer
    times.append(time.perf_counter() - t)
  med = statistics.median(times)
  result = dict(
    config=os.path.basename(a.config),
    device=jax.devices()[0].device_kind,
    num_devices=len(jax.local_devices()),
    batch=a.batch,
    steps=a.steps,
    sampler=a.sampler,
    seconds_per_batch=round(med, 3),
    images_per_sec=round(a.batch / med, 2),
    first_call_s=round(compile_s, 1),
    jax=jax.__version__,
    date=time.strftime('%Y-%m-%d'),
  )
  emit(result, a.json)


if __name__ == '__main__':
  main()
