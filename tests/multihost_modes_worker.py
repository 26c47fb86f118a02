"""Runs every mode that loads a trained checkpoint, through idm_jax.main as a user's command does,
in a fresh process (device count and joining set before jax starts).

python tests/multihost_modes_worker.py --root R [--devices N] [--metadata HOST:PORT --port P]
R holds train/ (a trained restoration workdir) and gen/ (a trained unconditional workdir), each
this run's own copy, and ext/ (empty). In order: evaluate, sample and clean (2 draws) on train/,
export of train/ to R/model.msgpack, generate on gen/, two extrinsic rounds in ext/ (round 1
fine-tuned from round 0: train.init_from). Writes R/info-<process>.json.

With --metadata the process joins a job as a Cloud TPU VM worker does: jax's GceTpuCluster finds
the slice through the GCE metadata server at HOST:PORT (tests/gce_metadata.py), the coordinator
listening on port P. Used by tests/test_multihost_modes.py.
"""

import argparse
import json
import os
import sys

# The runs' settings over configs/test.py (the test trains its checkpoints with these as
# --config flags). The hosts' shares are uneven everywhere, so one host runs filler batches:
# 5 training faces (cleaned 3 + 2, batches of 2), 5 validation images, 5 generated samples.
SETTINGS = {
  'data.max_examples': 5,
  'train.num_steps': 2,
  'train.ckpt_every': 2,
  'train.sample_every': 2,
  'eval.num_images': 5,
  'eval.batch_size': 2,
  'eval.identity': False,
  'clean.samples': 2,
  'clean.fraction': 1.0,
  'clean.batch_size': 2,
  'generate.num_samples': 5,
  'generate.batch_size': 2,
  'extrinsic.rounds': 2,
  'extrinsic.init': 'finetune',
  'extrinsic.steps_per_round': 2,
}
UNCONDITIONAL = {'model.conditional': False, 'model.lq_concat': False, 'model.lq_encoder': False}


def config_for(mode: str, overrides: dict | None = None):
  """configs/test.py with SETTINGS and `overrides`, as --config.x=y flags would set them."""
  from conftest import load_config

  config = load_config('test')
  for key, value in {**SETTINGS, 'mode': mode, **(overrides or {})}.items():
    node = config
    *parents, leaf = key.split('.')
    for k in parents:
      node = node[k]
    node[leaf] = value
  return config


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--root', required=True)
  p.add_argument('--metadata', default='')
  sys.path.insert(0, os.path.dirname(__file__))
  from conftest import add_process_args

  add_process_args(p)
  a = p.parse_args()
  os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={a.devices}'
  os.environ['JAX_PLATFORMS'] = 'cpu'
  import jax

  if a.metadata:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    # What a Cloud TPU VM is to jax: it saw TPU chips at import (so it did not set
    # TPU_SKIP_MDS_QUERY), and its metadata server lists the slice's workers.
    from jax._src.clusters import cloud_tpu_cluster

    cloud_tpu_cluster.running_in_cloud_tpu_vm = True
    os.environ.pop('TPU_SKIP_MDS_QUERY', None)
    os.environ['GCE_METADATA_IP'] = a.metadata
    os.environ['JAX_COORDINATOR_PORT'] = str(a.port)
  from idm_jax import main as driver
  from idm_jax.inference import export
  from idm_jax.runtime import parallel

  clusters = []  # what main.run's join detected
  detect = parallel.maybe_initialize_distributed
  parallel.maybe_initialize_distributed = lambda: clusters.append(detect()) or clusters[-1]

  root = a.root
  train, gen, ext = (os.path.join(root, d) for d in ('train', 'gen', 'ext'))
  for mode in ('evaluate', 'sample', 'clean'):
    driver.run(config_for(mode), train)
  export.export(train, os.path.join(root, 'model.msgpack'))
  driver.run(config_for('generate', UNCONDITIONAL), gen)
  driver.run(config_for('extrinsic'), ext)

  with open(os.path.join(root, f'info-{jax.process_index()}.json'), 'w') as f:
    json.dump(
      dict(
        cluster=clusters[0].kind,
        num_processes=jax.process_count(),
        process_index=jax.process_index(),
        devices=jax.device_count(),
      ),
      f,
    )


if __name__ == '__main__':
  main()
