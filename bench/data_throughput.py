"""Data pipeline throughput: degradation on one core, and the whole grain train pipeline.

  python bench/data_throughput.py                        # both parts, workers 0 1 2
  python bench/data_throughput.py --workers 0 4 --batches 40

1. Degradation only: images/s on ONE core at --degrade-resolution (512) with random parameters
   from the gfpgan preset (cv2.setNumThreads(1); no file decoding, HQ already in memory).
2. The train pipeline (folder source -> decode/resize -> degrade -> batch) on --data-dir at
   --resolution (128) for each worker count: images/s after a warm-up (worker start-up excluded,
   and reported separately).
Each number is the best of --repeats runs (the machine may be shared: best = least disturbed).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time

import cv2
import numpy as np

from idm_jax.data import degradations
from idm_jax.data import pipeline
from idm_jax.data import sources
from idm_jax.runtime import configlib
from idm_jax.storage import images

REPO = pathlib.Path(__file__).resolve().parents[1]


def bench_degradation(data_dir: str, resolution: int, num_images: int, repeats: int) -> float:
  """Best images/s of degradations.apply(sample_params(...)) on one thread."""
  cv2.setNumThreads(1)
  cfg = configlib.degradation_config('gfpgan')
  paths = images.list_images(data_dir)[:8]
  hqs = [sources.load_image(p, resolution) for p in paths]  # upscaled from 128: fine for timing
  rng = np.random.default_rng(0)
  degradations.degrade_pair(hqs[0], rng, cfg)  # warm caches (kernel grids, FFT plans)
  best = 0.0
  for _ in range(repeats):
    t0 = time.perf_counter()
    for i in range(num_images):
      degradations.degrade_pair(hqs[i % len(hqs)], rng, cfg)
    best = max(best, num_images / (time.perf_counter() - t0))
  return best


def bench_pipeline(
  data_dir: str,
  resolution: int,
  workers: int,
  batch_size: int,
  batches: int,
  warmup: int,
  repeats: int,
) -> tuple[float, float]:
  """(best images/s, seconds to the first batch) of the train pipeline."""
  config = configlib.load(REPO / 'configs' / 'celeba_128.py')
  config.data.update(dir=data_dir, resolution=resolution, num_workers=workers)
  config.train.batch_size = batch_size
  best, startup = 0.0, float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    with pipeline.train_iterator(config) as it:
      next(it)
      startup = min(startup, time.perf_counter() - t0)
      for _ in range(warmup):
        next(it)
      t1 = time.perf_counter()
      for _ in range(batches):
        next(it)
      best = max(best, batches * batch_size / (time.perf_counter() - t1))
  return best, startup


def main():
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument('--data-dir', default=str(REPO.parent / 'shared' / 'data' / 'celeba_hq128_dev'))
  p.add_argument('--degrade-resolution', type=int, default=512)
  p.add_argument('--degrade-images', type=int, default=30)
  p.add_argument('--resolution', type=int, default=128)
  p.add_argument('--workers', type=int, nargs='+', default=[0, 1, 2])
  p.add_argument('--batch-size', type=int, default=32)
  p.add_argument('--batches', type=int, default=20)
  p.add_argument('--warmup', type=int, default=3)
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--skip-degradation', action='store_true')
  args = p.parse_args()

  print(f'CPU cores visible: {os.cpu_count()}; load average: {os.getloadavg()}')
  if not args.skip_degradation:
    ips = bench_degradation(
      args.data_dir, args.degrade_resolution, args.degrade_images, args.repeats
    )
    print(
      f'degradation, 1 core, {args.degrade_resolution}px, gfpgan preset: {ips:.1f} images/s '
      f'(best of {args.repeats} x {args.degrade_images})'
    )
  for w in args.workers:
    ips, startup = bench_pipeline(
      args.data_dir, args.resolution, w, args.batch_size, args.batches, args.warmup, args.repeats
    )
    print(
      f'train pipeline, {args.resolution}px, batch {args.batch_size}, num_workers={w}: '
      f'{ips:.1f} images/s (best of {args.repeats} x {args.batches} batches), '
      f'first batch after {startup:.1f} s'
    )


if __name__ == '__main__':  # grain's worker processes are spawned: keep this guard
  main()
