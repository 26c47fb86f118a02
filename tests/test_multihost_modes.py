"""Every mode that loads a trained checkpoint, on two hosts, gives what it gives on one.

A restoration model and an unconditional one are trained once (`python -m idm_jax.main`, 2
steps); then tests/multihost_modes_worker.py runs evaluate, sample, clean (2 draws), export,
generate and two extrinsic rounds (round 1 fine-tuned from round 0 through train.init_from)
through idm_jax.main, once in one process with one CPU device and once in two processes with one
each. The two processes join as the workers of a Cloud TPU VM slice do: jax's own GceTpuCluster
reads the slice from a metadata server (tests/gce_metadata.py on 127.0.0.1), through
parallel.maybe_initialize_distributed.

Each device computes batches of the same shape in both runs (the lone device a whole batch of
the set, each of the two a whole batch of its host's share), so what the sampling modes write is
compared bit for bit. The rounds also train, where one device and two sum gradients in different
orders: their models and what they write are compared to float32 rounding
(check_two_extrinsic_rounds_and_the_warm_start).

About 3 minutes on two shared cores: process 1 of a jax job gets no hits from the persistent
compilation cache (jax writes it from process 0, and process 1 looks for other keys; measured),
so it compiles every program afresh, the training step of each round included.
"""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

from gce_metadata import MetadataServer
from gce_metadata import tpu_vm_attributes
from multihost_modes_worker import SETTINGS
from multihost_modes_worker import UNCONDITIONAL
import numpy as np
import pytest

WORKER = pathlib.Path(__file__).with_name('multihost_modes_worker.py')
REPO = WORKER.parents[1]
TIMEOUT = 1200  # seconds per run; a busy 2-core machine runs these several times slower
ONE_PROCESS_DEVICES = 1


def _popen(cmd):
  return subprocess.Popen(
    cmd,
    cwd=REPO,
    env=dict(os.environ, PYTHONPATH=str(REPO)),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def _finish(procs):
  """Waits for every process; fails naming each that did not exit 0, with its log's end."""
  outs = [p.communicate(timeout=TIMEOUT) for p in procs]
  failed = [
    f'process {i} (exit {p.returncode}):\n{err[-3000:]}'
    for i, (p, (_, err)) in enumerate(zip(procs, outs))
    if p.returncode != 0
  ]
  assert not failed, '\n\n'.join(failed)


@pytest.fixture(scope='session')
def trained(tmp_path_factory):
  """train/: configs/test.py's restoration model, gen/: its unconditional version, each trained
  2 steps with the worker's SETTINGS as a user's command line would."""
  root = tmp_path_factory.mktemp('trained')
  runs = []
  for name, overrides in (('train', {}), ('gen', UNCONDITIONAL)):
    flags = [f'--config.{k}={v}' for k, v in {**SETTINGS, **overrides}.items()]
    runs.append(
      _popen(
        [
          sys.executable,
          '-m',
          'idm_jax.main',
          '--config=configs/test.py',
          f'--workdir={root / name}',
          *flags,
        ]
      )
    )
  _finish(runs)
  return root


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _copy(trained, root):
  root.mkdir()
  for name in ('train', 'gen'):
    shutil.copytree(trained / name, root / name)
  (root / 'ext').mkdir()
  return root


@pytest.fixture
def runs(trained, tmp_path_factory):
  """(one, two): the roots of the one-process run and of the two-process run, run together."""
  base = tmp_path_factory.mktemp('modes')
  one, two = _copy(trained, base / 'one'), _copy(trained, base / 'two')
  port = _free_port()
  endpoints = ['127.0.0.1', '127.0.0.1']  # worker 0 (the coordinator) first, as GCE lists them
  servers = [MetadataServer(tpu_vm_attributes(i, endpoints)) for i in range(2)]
  try:
    procs = [
      _popen(
        [sys.executable, str(WORKER), '--root', str(one), '--devices', str(ONE_PROCESS_DEVICES)]
      )
    ]
    procs += [
      _popen(
        [
          sys.executable,
          str(WORKER),
          '--root',
          str(two),
          '--devices',
          '1',
          '--metadata',
          servers[i].address,
          '--port',
          str(port),
        ]
      )
      for i in range(2)
    ]
    _finish(procs)
  finally:
    for s in servers:
      s.close()
  return one, two


def _files(root):
  """{path relative to root: bytes} of every file under root."""
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}


def assert_same_files(one, two, expected_count):
  """The same files with the same bytes, all different from each other (a mix-up of which
  host's result goes where would show)."""
  a, b = _files(one), _files(two)
  assert sorted(a) == sorted(b)
  assert len(a) == expected_count, sorted(a)
  assert len(set(a.values())) == len(a), (
    'some outputs are identical: the test would not see a mix-up'
  )
  differ = [name for name in a if a[name] != b[name]]
  assert not differ, f'differ between one and two processes: {differ}'


def assert_close_images(one, two, expected_count):
  """The same PNGs under both, all different from each other, within one level of each other."""
  from PIL import Image

  names = sorted(str(p.relative_to(one)) for p in one.rglob('*.png'))
  assert names == sorted(str(p.relative_to(two)) for p in two.rglob('*.png'))
  assert len(names) == expected_count, names
  a = {n: np.asarray(Image.open(one / n), np.int16) for n in names}
  assert len({x.tobytes() for x in a.values()}) == len(a), 'some outputs are identical'
  for n in names:
    diff = np.abs(a[n] - np.asarray(Image.open(two / n), np.int16)).max()
    assert diff <= 1, f'{n}: differs by {diff} levels between one and two processes'


def check_join(one, two):
  """The two processes joined as the workers of a Cloud TPU VM slice; the one found none."""
  infos = [json.loads((two / f'info-{i}.json').read_text()) for i in range(2)]
  assert infos == [
    dict(cluster='gcetpu', num_processes=2, process_index=i, devices=2) for i in range(2)
  ]
  assert json.loads((one / 'info-0.json').read_text()) == dict(
    cluster='none', num_processes=1, process_index=0, devices=ONE_PROCESS_DEVICES
  )


def check_evaluate(one, two):
  # lq/, hq/, restored_2steps/ (5 PNGs each), grid.png, metrics.json and metrics.md
  assert_same_files(one / 'train/eval/step_2', two / 'train/eval/step_2', 3 * 5 + 3)
  metrics = json.loads((two / 'train/eval/step_2/metrics.json').read_text())
  assert 'restored, 2 steps' in json.dumps(metrics)


def check_sample(one, two):
  assert_same_files(one / 'train/samples/step_2', two / 'train/samples/step_2', 3 * 5 + 1)


def check_clean_with_two_draws(one, two):
  assert_same_files(one / 'train/cleaned/images', two / 'train/cleaned/images', 5)
  manifests = [json.loads((r / 'train/cleaned/manifest.json').read_text()) for r in (one, two)]
  assert manifests[0]['counts'] == dict(cleaned=5, copied=0, failed=0)
  assert manifests[0]['settings']['samples'] == 2
  for m in manifests:  # the model's path is each run's own
    m.pop('model')
  assert manifests[0] == manifests[1]
  # Each host cleaned its own share (records 0, 2, 4 and 1, 3), not all of them.
  journals = [(two / f'train/cleaned/journal-{i}.jsonl').read_text().splitlines() for i in range(2)]
  assert [len(j) for j in journals] == [3, 2]


def check_export(one, two):
  assert (one / 'model.msgpack').read_bytes() == (two / 'model.msgpack').read_bytes()


def check_generate(one, two):
  assert_same_files(one / 'gen/generated', two / 'gen/generated', 5)
  assert (one / 'gen/generated_grid.png').read_bytes() == (
    two / 'gen/generated_grid.png'
  ).read_bytes()


def check_two_extrinsic_rounds_and_the_warm_start(one, two):
  """Here both runs also train, and training is where one device and two differ: one sums the
  batch's gradients in one pass, two sum two halves and add them, so the rounds' params agree
  to float32 rounding (1e-6 relative, measured), not bit for bit. Tolerances: params as in
  test_train.py (rtol 1e-4: Adam's division by sqrt(nu) amplifies rounding on near-zero
  gradients); images within one level (such a difference can move a pixel across a rounding
  boundary, no further; they were equal bit for bit when measured); the round table's metrics,
  which come from those images, to 1e-2."""
  import jax

  from idm_jax.training import checkpoints

  results = [json.loads((r / 'ext/rounds.json').read_text()) for r in (one, two)]
  assert set(results[0]) == set(results[1]) == {'0', '1'}
  for r in ('0', '1'):
    a, b = (results[i][r]['metrics'] for i in (0, 1))
    assert sorted(a) == sorted(b) and results[0][r]['data'] == results[1][r]['data']
    for key in a:
      if a[key] is None or b[key] is None:
        assert a[key] == b[key], key
      else:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-2, err_msg=f'round {r}: {key}')
  assert_close_images(one / 'ext/round_1/dataset/images', two / 'ext/round_1/dataset/images', 5)
  for r in (0, 1):
    assert_close_images(one / f'ext/round_{r}/eval', two / f'ext/round_{r}/eval', 3 * 5 + 1)
    # Round 1 was fine-tuned from round 0 (train.init_from) on both hosts: the models agree.
    params = [checkpoints.load_for_inference(str(d / f'ext/round_{r}'))[1] for d in (one, two)]
    for a, b in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1])):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=f'round {r} params')


def test_every_mode_on_two_hosts_gives_what_it_gives_on_one(runs):
  """One test over one pair of runs (a test each would run them once per xdist worker)."""
  one, two = runs
  failed = []
  for check in (
    check_join,
    check_evaluate,
    check_sample,
    check_clean_with_two_draws,
    check_export,
    check_generate,
    check_two_extrinsic_rounds_and_the_warm_start,
  ):
    try:
      check(one, two)
    except AssertionError as e:  # every mode's verdict, not only the first failure's
      failed.append(f'{check.__name__}: {e}')
  assert not failed, '\n\n'.join(failed)
