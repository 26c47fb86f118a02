"""Restores a fixed LQ set with validation.restore_all in a fresh process (device count and
multi-host set before jax starts).

python tests/restore_worker.py --out F.npy [--devices N]
    [--process-id I --num-processes P --port PORT]
Process 0 saves the restored images to F.npy. Used by tests/test_validation.py.
"""
import argparse
import os
import sys


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--out', required=True)
  sys.path.insert(0, os.path.dirname(__file__))
  from conftest import add_process_args, load_config, start_cpu_processes
  add_process_args(p)
  a = p.parse_args()
  jax = start_cpu_processes(a)
  import numpy as np
  from idm_jax import inference, validation
  from idm_jax.models import unet

  config = load_config('test')
  r = config.data.resolution
  params = inference.random_params(unet.build_model(config.model, r), seed=0)
  restorer = inference.Restorer(config, params)
  lq = np.random.default_rng(0).integers(0, 256, (7, r, r, 3), dtype=np.uint8)
  out = validation.restore_all(restorer, lq, batch_size=3, seed=5, steps=3)
  if jax.process_index() == 0:
    np.save(a.out, out)


if __name__ == '__main__':
  main()
