"""Runs the three sampling jobs in a fresh process (device count and multi-host set before jax
starts): validation.restore_all on a fixed LQ set, cleaning.clean_dataset of a folder, and
generate.run of an unconditional model.

python tests/restore_worker.py --out DIR --faces DIR [--devices N]
    [--process-id I --num-processes P --port PORT]
Writes DIR/restored.npy (process 0), DIR/info-<process>.json (the mesh, the program launches),
DIR/clean/ and DIR/generated/ (every process its share). Used by tests/test_validation.py.
"""

import argparse
import json
import os
import sys


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--out', required=True)
  p.add_argument('--faces', required=True)
  sys.path.insert(0, os.path.dirname(__file__))
  from conftest import add_process_args
  from conftest import load_config
  from conftest import start_cpu_processes

  add_process_args(p)
  a = p.parse_args()
  jax = start_cpu_processes(a)
  import ml_collections
  import numpy as np

  from idm_jax.data import sources
  from idm_jax.extrinsic import cleaning
  from idm_jax.inference import engine
  from idm_jax.inference import generate
  from idm_jax.inference import validation
  from idm_jax.runtime import configlib
  from idm_jax.storage import images

  # Every program launch, in order, as (job, rows): processes in lockstep launch the same list.
  launches, job = [], ['restore_all']
  run = engine.Restorer._run
  engine.Restorer._run = lambda self, lq, idx, *args: (
    launches.append((job[0], len(idx))),
    run(self, lq, idx, *args),
  )[1]

  config = load_config('test')
  r = config.data.resolution
  params = engine.random_params(configlib.build_model(config.model, r), seed=0)
  restorer = engine.Restorer(config, params)
  # 7 images in batches of 3: with 2 processes one has 4 (two batches), the other 3 (one).
  lq = np.random.default_rng(0).integers(0, 256, (7, r, r, 3), dtype=np.uint8)
  out = validation.restore_all(restorer, lq, batch_size=3, seed=5, steps=3)

  job[0] = 'clean'
  source = sources.FolderSource(tuple(images.list_images(a.faces)), r, root=a.faces)
  # Two draws per face: the mean of several draws keeps the processes in lockstep too.
  clean_cfg = ml_collections.ConfigDict(
    dict(
      sampler='ddim',
      steps=2,
      t_start=0.5,
      samples=2,
      fraction=1.0,
      score='niqe',
      batch_size=2,
      out_dir='',
    )
  )
  manifest = cleaning.clean_dataset(
    source,
    restorer,
    os.path.join(a.out, 'clean'),
    clean_cfg=clean_cfg,
    seed=0,
    niqe_params=None,
    resolution=r,
    provenance={},
  )

  job[0] = 'generate'
  gen_config = load_config('test')
  gen_config.model.update(conditional=False, lq_concat=False, lq_encoder=False)
  gen_config.generate.update(num_samples=5, batch_size=2, out_dir=os.path.join(a.out, 'generated'))
  generator = engine.Restorer(
    gen_config, engine.random_params(configlib.build_model(gen_config.model, r), seed=1)
  )
  generate.engine.load = lambda path, config: (generator, None)  # no checkpoint to read
  generate.run(gen_config, a.out)

  with open(os.path.join(a.out, f'info-{jax.process_index()}.json'), 'w') as f:
    json.dump(
      dict(
        mesh_size=restorer.mesh.size,
        lockstep=restorer.lockstep,
        launches=launches,
        counts=manifest.get('counts'),
      ),
      f,
    )
  if jax.process_index() == 0:
    np.save(os.path.join(a.out, 'restored.npy'), out)


if __name__ == '__main__':
  main()
