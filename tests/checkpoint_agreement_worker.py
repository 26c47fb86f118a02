"""Reads checkpoints as every process of a pod does, with faults that only one process meets (the
test points process 1's storage clients at the fault proxy, process 0's at the server itself).

python tests/checkpoint_agreement_worker.py --root gs://B --out DIR --process-id I
    --num-processes 2 --port P
Under ROOT: config/, ema/, progress/, hidden/ and unseen/, training workdirs with checkpoints,
and taken.msgpack. In order: load_for_inference of config/ and ema/, of ema/ at step 4,
Checkpointer.train_seconds(2) of progress/ and hidden/, engine.load of unseen/, and an
export of ema/ to taken.msgpack. Writes DIR/<process>.json: what each call returned ([step, the first
EMA value] or seconds) or raised ({"error": ...}). Used by tests/test_checkpoints.py.
"""

import argparse
import json
import os
import sys


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--root', required=True)
  p.add_argument('--out', required=True)
  sys.path.insert(0, os.path.dirname(__file__))
  from conftest import add_process_args
  from conftest import start_cpu_processes

  add_process_args(p)
  a = p.parse_args()
  jax = start_cpu_processes(a)
  import numpy as np

  from idm_jax.inference import engine
  from idm_jax.inference import export
  from idm_jax.training import checkpoints

  def loaded(workdir, step=None):
    _, ema, step = checkpoints.load_for_inference(f'{a.root}/{workdir}', step)
    return [step, float(np.asarray(jax.tree.leaves(ema)[0]).flat[0])]

  def seconds(workdir):
    ckpt = checkpoints.Checkpointer(f'{a.root}/{workdir}', async_save=False)
    try:
      return ckpt.train_seconds(2)
    finally:
      ckpt.close()

  results = {}
  for name, call in (
    ('config', lambda: loaded('config')),
    ('ema', lambda: loaded('ema')),
    ('ema at 4', lambda: loaded('ema', 4)),
    ('progress', lambda: seconds('progress')),
    ('hidden', lambda: seconds('hidden')),
    ('unseen', lambda: engine.load(f'{a.root}/unseen')[1]),
    ('export', lambda: export.export(f'{a.root}/ema', f'{a.root}/taken.msgpack')),
  ):
    try:
      results[name] = call()
    except Exception as e:  # pylint: disable=broad-except  (what it raised is the result)
      results[name] = {'error': f'{type(e).__name__}: {str(e)[:300]}'}
  with open(os.path.join(a.out, f'{jax.process_index()}.json'), 'w') as f:
    json.dump(results, f)


if __name__ == '__main__':
  main()
