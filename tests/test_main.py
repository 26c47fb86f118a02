"""The driver: its log filter (our lines and every warning, not libraries' INFO chatter), its
storage in a bucket and its compilation cache."""

import logging
import os
import shutil
import subprocess
import sys

import pytest

from idm_jax import main


def _record(path, level):
  return logging.LogRecord('absl', level, path, 1, 'msg', None, None)


def test_the_default_log_keeps_our_lines_and_all_warnings():
  ours = os.path.join(os.path.dirname(main.__file__), 'training', 'train.py')
  orbax = '/site-packages/orbax/checkpoint/checkpoint_manager.py'
  keep = main.OursAndWarnings().filter
  assert keep(_record(ours, logging.INFO))
  assert not keep(_record(orbax, logging.INFO))
  assert keep(_record(orbax, logging.WARNING)) and keep(_record(orbax, logging.ERROR))
  # A sibling folder whose name starts like ours is not ours.
  assert not keep(_record(os.path.dirname(main.__file__) + '_extra/x.py', logging.INFO))


def _write_builtin_faces(folder, n):
  from PIL import Image

  from idm_jax.data import sources

  folder.mkdir()
  for i in range(n):
    Image.fromarray(sources.BuiltinSource('train', 64)[i]['image']).save(folder / f'{i:02d}.png')


def test_every_mode_reads_and_writes_a_bucket_and_nothing_lands_in_the_cwd(
  gcs_bucket, tmp_path, monkeypatch, test_config
):
  """A pod run's storage: the TFDS data and the workdir both in gs://, train then evaluate,
  sample, clean and export; checkpoints, metrics, TensorBoard events, grids, configs, reports
  and the cleaned dataset all land in the bucket, and nothing under the current directory."""
  import json

  from idm_jax.data import prepare
  from idm_jax.extrinsic import cleaned_dataset
  from idm_jax.inference import engine
  from idm_jax.inference import export
  from idm_jax.storage import files

  _write_builtin_faces(tmp_path / 'faces', 32)
  summary = prepare.prepare(
    str(tmp_path / 'faces'), 'tiny', 32, f'{gcs_bucket}/tfds', val_fraction=0.3, workers=0
  )
  assert summary['path'] == f'{gcs_bucket}/tfds/idm_faces/tiny'
  assert summary['examples']['validation'] >= 4  # the grids and the evaluation need 4
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  workdir = f'{gcs_bucket}/run'
  c = test_config
  c.data.update(source='tfds', tfds_name='tiny', tfds_data_dir=f'{gcs_bucket}/tfds')
  c.eval.update(identity=False)
  main.run(c, workdir)
  listing = files.walk_files(workdir)
  for name in (
    'config_train.json',
    'metrics.jsonl',
    'samples_0000002.png',
    'samples_0000004.png',
    'checkpoints/4/train/_METADATA',
  ):
    assert name in listing, name
  assert any(n.startswith('tensorboard/events.out.tfevents.') for n in listing)
  steps = [
    json.loads(line)['step']
    for line in files.iter_lines(f'{workdir}/metrics.jsonl')
    if 'loss' in line
  ]
  assert steps == [1, 2, 3, 4]
  for mode in ('evaluate', 'sample', 'clean'):
    c.mode = mode
    main.run(c, workdir)
  listing = files.walk_files(workdir)
  for name in (
    'config_evaluate.json',
    'eval/step_4/metrics.json',
    'eval/step_4/grid.png',
    'samples/step_4/grid.png',
    'cleaned/manifest.json',
  ):
    assert name in listing, name
  counts = cleaned_dataset.verify_manifest(f'{workdir}/cleaned')
  assert counts['cleaned'] > 0 and counts['failed'] == 0
  assert counts['cleaned'] + counts['copied'] == summary['examples']['train']
  model = f'{gcs_bucket}/model.msgpack'
  assert export.export(workdir, model) > 0
  restorer, step = engine.load(model)
  assert step is None and restorer.config.data.resolution == 32
  assert os.listdir(cwd) == []


def test_a_missing_bucket_stops_the_driver_at_once_in_one_line(gcs_server, tmp_path):
  import subprocess
  import sys
  import time

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  t0 = time.monotonic()
  out = subprocess.run(
    [
      sys.executable,
      '-m',
      'idm_jax.main',
      f'--config={repo}/configs/test.py',
      '--workdir=gs://no-such-bucket-4c1e/run',
    ],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=tmp_path,
    env=dict(os.environ, PYTHONPATH=repo),
  )
  seconds = time.monotonic() - t0
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1] == (
    'error: gs://no-such-bucket-4c1e/run: the bucket gs://no-such-bucket-4c1e does not exist '
    '(or is not visible with these credentials)'
  )
  assert 'Traceback' not in out.stderr
  # At once: well within the storage client's 120 s retry budget, with room for a loaded
  # machine's interpreter start and imports.
  assert seconds < 45, seconds
  assert os.listdir(tmp_path) == []


_COMPILE_ONE_LOOP = """
from idm_jax import main
main._enable_compilation_cache()
import jax
import jax.numpy as jnp
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)  # cache even this tiny program
program = jax.jit(lambda x: jnp.tanh(x * 2 + 1) * x).lower(jnp.ones((1024, 1024))).compile()
import re
tasks = re.findall(r'outer_dimension_partitions":\\["(\\d+)"', program.as_text())
print('split' if max(map(int, tasks), default=1) > 1 else 'one task')
"""


@pytest.mark.skipif(
  not shutil.which('taskset') or main._usable_cpus() < 2, reason='needs taskset, 2 CPUs'
)
def test_a_program_compiled_on_one_cpu_is_not_reused_on_two(tmp_path):
  """XLA's CPU compiler splits an elementwise loop over the CPUs the process may use, and JAX's
  cache key does not hold that number: a run under `taskset -c 0` must not leave its one-thread
  program in the cache a later run on the whole machine loads."""
  env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  env['HOME'] = str(tmp_path)
  run = lambda *prefix: subprocess.run(
    [*prefix, sys.executable, '-c', _COMPILE_ONE_LOOP],
    env=env,
    capture_output=True,
    text=True,
    check=True,
  ).stdout.strip()
  cpu0 = str(min(os.sched_getaffinity(0)))
  assert run('taskset', '-c', cpu0) == 'one task'
  assert run() == 'split', 'the run on two CPUs loaded the one-CPU program'
  cached = list((tmp_path / '.cache' / 'idm_jax' / 'xla').glob('cpus-*/*'))
  assert len({p.parent.name for p in cached}) == 2, cached
