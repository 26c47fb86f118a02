"""Runs a short training job in a fresh process (device count and multi-host set before jax starts).

python tests/train_worker.py --workdir W (a folder or gs://...) --steps N [--devices 8] [--overrides JSON]
    [--process-id I --num-processes P --port PORT] [--params-out F.npz] [--compile-delay S]
    [--sigterm-at-step N]
Prints one JSON line: {"losses": [...], "step": ...}. Used by tests/test_train.py.
"""

import argparse
import json
import os
import sys


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--workdir', required=True)
  p.add_argument('--steps', type=int, required=True)
  p.add_argument('--overrides', default='{}')
  p.add_argument('--params-out', default='')
  p.add_argument(
    '--compile-delay',
    type=float,
    default=0.0,
    help='sleep this long before compiling the train step: a slow host',
  )
  p.add_argument(
    '--sigterm-at-step',
    type=int,
    default=0,
    help='send this process SIGTERM while it fetches the batch of step N (1-based), '
    'as a preemption notice arriving mid-run',
  )
  sys.path.insert(0, os.path.dirname(__file__))
  from conftest import add_process_args
  from conftest import load_config
  from conftest import start_cpu_processes

  add_process_args(p)
  a = p.parse_args()
  jax = start_cpu_processes(a)
  import numpy as np

  from idm_jax.runtime import configlib
  from idm_jax.training import train

  config = load_config('test')
  for key, value in json.loads(a.overrides).items():
    node = config
    *parents, leaf = key.split('.')
    for k in parents:
      node = node[k]
    node[leaf] = tuple(value) if isinstance(value, list) else value
  configlib.validate(config)
  if a.compile_delay:
    import time

    compile_step = train.Trainer.compile_step

    def slow_compile_step(self, *args, **kwargs):
      time.sleep(a.compile_delay)
      return compile_step(self, *args, **kwargs)

    train.Trainer.compile_step = slow_compile_step
  if a.sigterm_at_step:
    import signal

    from idm_jax.runtime import parallel

    to_global, fetched = parallel.local_batch_to_global, []

    def signalling_to_global(*args, **kwargs):
      fetched.append(1)
      if len(fetched) == a.sigterm_at_step:
        os.kill(os.getpid(), signal.SIGTERM)
      return to_global(*args, **kwargs)

    parallel.local_batch_to_global = signalling_to_global
  try:
    state = train.train_and_evaluate(config, a.workdir, max_steps=a.steps)
    step = int(jax.device_get(state.step))
  except train.Stopped as e:  # a stop request: the step it saved
    state, step = None, e.step
  if a.params_out and jax.process_index() == 0:
    from idm_jax.runtime import parallel

    leaves = jax.tree.leaves(parallel.to_host(state.params))
    np.savez(a.params_out, *[np.asarray(x) for x in leaves])
  if jax.process_index() == 0:
    from idm_jax.storage import files

    losses = []
    for line in files.iter_lines(files.join(a.workdir, 'metrics.jsonl')):
      m = json.loads(line)
      if 'loss' in m:
        losses.append((m['step'], m['loss']))
    print(json.dumps({'losses': losses, 'step': step}))


if __name__ == '__main__':
  main()
