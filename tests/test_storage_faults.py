"""Storage faults are expected, not fatal: every client behind a fault-injecting proxy
(tests/gcs_faults.py) in front of the local GCS server, answering 503/429, dropping a reply after
the write landed, resetting connections, adding latency."""

import io
import json
import logging
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
from PIL import Image

from idm_jax.storage import files
from idm_jax.storage import workdir_lock
from idm_jax.training import run_log

# --- The proxy itself: each kind of fault, seen by a real client (gcsfs through files.py).


def test_the_proxy_injects_each_kind_of_fault(gcs_faults, gcs_bucket):
  proxy = gcs_faults.proxy
  path = f'{gcs_bucket}/dir/a.bin'
  files.write_atomic(path, b'one')
  proxy.add(r'dir/a\.bin', 'status', count=2, status=503, methods=('GET',))
  assert files.read_bytes(path) == b'one'  # gcsfs retried past two 503s
  assert proxy.hits(r'dir/a\.bin', kind='status') == 2
  proxy.add(r'dir/a\.bin', 'status', count=1, status=429)
  assert files.read_bytes(path) == b'one'
  # The upload lands; its reply is lost; the client retries; the object is whole and new.
  proxy.add(r'dir/a\.bin', 'drop_reply', count=1, methods=('POST',))
  files.write_atomic(path, b'two')
  assert proxy.hits(r'name=dir/a\.bin', kind='drop_reply') == 1
  assert [m for m, t, f in proxy.log if f == 'drop_reply'] == ['POST']
  assert files.read_bytes(path) == b'two'
  proxy.add(r'dir/a\.bin', 'reset', count=1, methods=('GET',))
  assert files.read_bytes(path) == b'two'
  assert proxy.hits(r'dir/a\.bin', kind='reset') == 1
  proxy.add(r'dir/a\.bin', 'latency', latency_s=0.5)
  t0 = time.monotonic()
  assert files.read_bytes(path) == b'two'
  assert time.monotonic() - t0 >= 0.5
  proxy.clear()
  t0 = time.monotonic()
  files.read_bytes(path)
  assert time.monotonic() - t0 < 0.5
  # Nothing else was faulted: each rule hit only what it named, as often as it said.
  assert sum(1 for _, _, f in proxy.log if f in ('status', 'drop_reply', 'reset')) == 5


def test_a_move_and_the_write_probe_survive_a_lost_delete_reply(gcs_faults, gcs_bucket):
  """A delete that landed but whose reply was lost is retried and finds nothing: that is the
  delete done, not a missing file (nor, for the write probe, a missing bucket)."""
  proxy = gcs_faults.proxy
  root = f'{gcs_bucket}/root'
  files.write_atomic(f'{root}/a.bin', b'x')
  proxy.add(r'/o/root/a\.bin(\?|$)', 'drop_reply', count=1, methods=('DELETE',))
  files.move(f'{root}/a.bin', f'{root}/b.bin')
  assert proxy.hits(kind='drop_reply') == 1
  assert files.walk_files(root) == ['b.bin'] and files.read_bytes(f'{root}/b.bin') == b'x'
  proxy.add(r'idm_jax_write_check', 'drop_reply', count=1, methods=('DELETE',))
  files.check_writable(f'{root}/c')
  assert proxy.hits(kind='drop_reply') == 2
  assert files.walk_files(root) == ['b.bin']


# --- The workdir lock in a bucket.


def test_a_heartbeat_whose_reply_is_lost_keeps_the_lock(gcs_faults, gcs_bucket):
  """The rewrite lands, its reply is lost, the client retries with the old generation and is
  refused (412): the holder reads the lock back, finds its own nonce and holds on."""
  proxy = gcs_faults.proxy
  workdir = f'{gcs_bucket}/run'
  lock = workdir_lock.WorkdirLock(workdir, heartbeat_seconds=0.2, stale_seconds=30).acquire()
  try:
    proxy.add(r'name=run/train\.lock', 'drop_reply', count=1, methods=('POST',))
    deadline = time.monotonic() + 30
    while proxy.hits(kind='drop_reply') == 0 and time.monotonic() < deadline:
      time.sleep(0.1)
    assert proxy.hits(kind='drop_reply') == 1
    # The heartbeats still land: two more generations, so at least one write after the one
    # whose reply was lost (that one may still be in its retry when the hit is seen). A deadline,
    # not a fixed sleep: on loaded cores one write can take longer than several beats.
    seen = [lock._impl.generation]
    deadline = time.monotonic() + 30
    while len(seen) < 3 and time.monotonic() < deadline:
      time.sleep(0.05)
      if lock._impl.generation != seen[-1]:
        seen.append(lock._impl.generation)
    assert not lock.lost
    assert len(seen) == 3, seen
    mine = json.loads(files.read_text(f'{workdir}/train.lock'))
    assert mine['pid'] == os.getpid()
  finally:
    lock.release()
  assert not files.exists(f'{workdir}/train.lock')


def test_a_partitioned_holder_stops_before_another_run_can_take_over(
  gcs_faults, gcs_bucket, gcs_server, monkeypatch, caplog
):
  """The holder's requests all fail (503) from some moment: it says the lock is lost after
  half the stale time by its own clock, while a taker that reaches the server must watch the
  lock unchanged for the whole stale time first, so the two never both hold it."""
  proxy = gcs_faults.proxy
  workdir = f'{gcs_bucket}/run'
  stale = 4.0
  holder = workdir_lock.WorkdirLock(workdir, heartbeat_seconds=0.2, stale_seconds=stale).acquire()
  monkeypatch.setenv('STORAGE_EMULATOR_HOST', gcs_server)  # the taker is not partitioned
  taker = workdir_lock.WorkdirLock(workdir, heartbeat_seconds=0.2, stale_seconds=stale)
  taker.me = dict(taker.me, pid=os.getpid() + 1, host='another-host')
  proxy.add(r'train\.lock', 'status', status=503)  # the partition
  partitioned = time.monotonic()
  lost_at = None
  with caplog.at_level(logging.WARNING):
    while True:
      try:
        taker.acquire()
        taken_at = time.monotonic()
        break
      except workdir_lock.WorkdirInUse:  # refused while the heartbeat is recent
        pass
      if lost_at is None and holder.lost:
        lost_at = time.monotonic()
      assert time.monotonic() - partitioned < 60
      time.sleep(0.2)
  assert holder.lost and lost_at is not None and lost_at < taken_at
  assert lost_at - partitioned >= stale / 2 - 0.5  # not before its renewals ran out
  assert taken_at - partitioned >= stale  # the taker watched for the stale time
  assert 'no heartbeat landed for 2 s' in caplog.text
  assert 'watching it for 4 s before taking it over' in caplog.text
  proxy.clear()
  holder.release()  # lost: leaves the taker's lock alone
  assert json.loads(files.read_text(f'{workdir}/train.lock'))['host'] == 'another-host'
  taker.release()
  assert not files.exists(f'{workdir}/train.lock')


# --- Reports: a write that fails warns, and is made again later; the run goes on.


def _steps(workdir):
  return [json.loads(line)['step'] for line in files.iter_lines(f'{workdir}/metrics.jsonl')]


def test_a_metrics_write_that_fails_after_landing_is_rewritten_once(gcs_faults, gcs_bucket, caplog):
  """The rewrite of metrics.jsonl lands but the client sees a failure (reply lost, then a
  refusal): the Writer warns, keeps the lines and rewrites the whole file at the next flush,
  so no line is missing or doubled."""
  proxy = gcs_faults.proxy
  workdir = f'{gcs_bucket}/run'
  files.write_text(f'{workdir}/metrics.jsonl', json.dumps({'step': 0}) + '\n')  # an earlier run
  writer = run_log.Writer(workdir)
  writer.REMOTE_FLUSH_SECONDS = 0.0
  proxy.add(r'metrics\.jsonl', 'drop_reply', count=1, methods=('POST',))
  proxy.add(r'metrics\.jsonl', 'status', count=1, status=403, methods=('POST',))
  with caplog.at_level(logging.WARNING):
    writer.scalars(1, {'loss': 1.0})  # raises nothing
  assert proxy.hits(r'metrics\.jsonl') == 2
  assert 'could not write' in caplog.text and 'metrics.jsonl' in caplog.text
  assert _steps(workdir) == [0, 1]  # it had landed
  writer.scalars(2, {'loss': 0.5})
  writer.close()
  assert _steps(workdir) == [0, 1, 2]


def test_a_grid_that_cannot_be_written_is_tried_at_the_next_log_step_then_dropped(
  gcs_faults, gcs_bucket, caplog
):
  proxy = gcs_faults.proxy
  workdir = f'{gcs_bucket}/run'
  writer = run_log.Writer(workdir)
  batch = {'lq': np.zeros((2, 16, 16, 3), np.uint8), 'hq': np.full((2, 16, 16, 3), 255, np.uint8)}
  proxy.add(r'samples_0000002', 'status', count=1, status=403)
  with caplog.at_level(logging.WARNING):
    writer.sample_grid(2, batch, batch['hq'], conditional=True)
  assert 'samples_0000002.png' not in files.listdir(workdir)
  assert 'could not write' in caplog.text and 'samples_0000002.png' in caplog.text
  writer.scalars(3, {'loss': 0.5})  # the next log step writes it
  assert 'samples_0000002.png' in files.listdir(workdir)
  proxy.add(r'samples_0000004', 'status', status=403)
  with caplog.at_level(logging.WARNING):
    writer.sample_grid(4, batch, batch['hq'], conditional=True)
    writer.scalars(5, {'loss': 0.25})
  assert 'dropped the sample grid' in caplog.text and 'samples_0000004.png' in caplog.text
  assert proxy.hits(r'samples_0000004') == 2
  writer.close()
  assert 'samples_0000004.png' not in files.listdir(workdir)
  assert _steps(workdir) == [2, 3, 4, 5]


def test_a_503_burst_longer_than_gcsfs_retries_is_retried_and_the_objects_are_whole(
  gcs_faults, gcs_bucket, monkeypatch, caplog
):
  """503 bursts on metrics.jsonl and on a grid that outlast gcsfs's own 6 tries of the upload:
  the Writer makes the write again (files.call_with_retries, files.is_transient) and both
  objects are written whole at once, with no warning. Then an outage: the first failure of the
  streak gets the retries, later occasions one try each, and the lines land once it ends.
  (gcsfs's waits between its tries are shortened here, its number of tries is not.)"""
  from gcs_faults import _ShorterWaits
  from gcsfs import retry

  monkeypatch.setattr(retry, 'asyncio', _ShorterWaits(20))
  proxy = gcs_faults.proxy
  workdir = f'{gcs_bucket}/run'
  writer = run_log.Writer(workdir)
  writer.REMOTE_FLUSH_SECONDS = 0.0
  writer.WRITE_BACKOFF_S = 0.2
  tries = 6  # gcsfs's tries of one request
  proxy.add(r'metrics\.jsonl', 'status', count=tries + 1, status=503, methods=('POST',))
  proxy.add(r'samples_0000002', 'status', count=tries + 1, status=503, methods=('POST',))
  batch = {'lq': np.zeros((2, 16, 16, 3), np.uint8), 'hq': np.full((2, 16, 16, 3), 255, np.uint8)}
  with caplog.at_level(logging.WARNING):
    writer.scalars(1, {'loss': 1.0})
    assert proxy.hits(r'metrics\.jsonl') == tries + 1
    assert _steps(workdir) == [1]
    writer.sample_grid(2, batch, batch['hq'], conditional=True)
    assert proxy.hits(r'samples_0000002') == tries + 1
  assert 'could not write' not in caplog.text
  grid = np.asarray(Image.open(io.BytesIO(files.read_bytes(f'{workdir}/samples_0000002.png'))))
  zoom = 128 // 16
  assert grid.shape == (3 * (16 * zoom + 2) + 2, 2 * (16 * zoom + 2) + 2, 3)
  assert _steps(workdir) == [1, 2]

  proxy.add(r'metrics\.jsonl', 'status', status=503, methods=('POST',))  # an outage
  before = proxy.hits(r'metrics\.jsonl')
  with caplog.at_level(logging.WARNING):
    writer.scalars(3, {'loss': 0.5})
  assert proxy.hits(r'metrics\.jsonl') - before == writer.WRITE_ATTEMPTS * tries
  assert 'could not write' in caplog.text and 'metrics.jsonl' in caplog.text
  before = proxy.hits(r'metrics\.jsonl')
  writer.scalars(4, {'loss': 0.25})
  assert proxy.hits(r'metrics\.jsonl') - before == tries  # one try while the streak lasts
  proxy.clear()
  writer.close()
  assert _steps(workdir) == [1, 2, 3, 4]


# --- Two processes (jax.distributed) training on one bucket workdir through the faults.

WORKER = pathlib.Path(__file__).with_name('train_worker.py')
QUICK = pathlib.Path(__file__).with_name('quick_worker.py')
REPO = WORKER.parents[1]
# gcsfs's waits between its tries of a request, divided (tests/quick_worker.py): its 6 tries
# take about 3 s instead of 31 s. The in-process tests above run its shipped waits.
GCSFS_WAIT_DIVISOR = 10


def _two_processes(workdir, steps, env, params_out=''):
  """Runs tests/train_worker.py (through tests/quick_worker.py) as processes 0 and 1 of one job;
  (process 0's JSON, stderrs)."""
  return _finish(_start(workdir, steps, env, params_out))


def _start(workdir, steps, env, params_out=''):
  """Starts the two processes of one job. Their output goes to files: a pipe read only after
  process 0 ends could fill up with process 1's log and block it, and process 0 with it, in
  their next collective."""
  import tempfile  # pylint: disable=import-outside-toplevel

  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  procs, logs = [], []
  for i in range(2):
    cmd = [
      sys.executable,
      str(QUICK),
      str(WORKER),
      '--workdir',
      workdir,
      '--steps',
      str(steps),
      '--overrides',
      json.dumps({'train.num_steps': 100}),
      '--process-id',
      str(i),
      '--num-processes',
      '2',
      '--port',
      str(port),
    ]
    if params_out and i == 0:
      cmd += ['--params-out', str(params_out)]
    out, err = tempfile.TemporaryFile('w+'), tempfile.TemporaryFile('w+')
    logs.append((out, err))
    procs.append(
      subprocess.Popen(
        cmd,
        stdout=out,
        stderr=err,
        text=True,
        env=dict(
          env, PYTHONPATH=str(REPO), IDM_JAX_TEST_GCSFS_WAIT_DIVISOR=str(GCSFS_WAIT_DIVISOR)
        ),
      )
    )
  return procs, logs


def _finish(started):
  """Waits for a job _start started; (process 0's JSON, stderrs)."""
  procs, logs = started
  texts = []
  try:
    for p, (out, err) in zip(procs, logs):
      p.wait(timeout=600)
      out.seek(0)
      err.seek(0)
      texts.append((out.read(), err.read()))
  finally:
    for p, (out, err) in zip(procs, logs):
      if p.poll() is None:  # a test that failed leaves no worker behind
        p.kill()
        p.wait()
      out.close()
      err.close()
  for p, (_, err) in zip(procs, texts):
    assert p.returncode == 0, err[-4000:]
  return json.loads(texts[0][0].strip().splitlines()[-1]), [err for _, err in texts]


def _params(path):
  with np.load(path) as f:
    return [f[k] for k in sorted(f.files, key=lambda k: int(k.split('_')[1]))]


def _assert_same_run(a, b):
  """Two runs' (step, loss) lists: the same steps, the same losses up to the order in which
  gloo sums the two processes' gradients (it varies between runs: relative 1e-5, as in
  test_train's two-process test). Resuming from another step changes them far more."""
  assert [s for s, _ in a] == [s for s, _ in b]
  np.testing.assert_allclose([l for _, l in a], [l for _, l in b], rtol=1e-5)


def test_two_hosts_train_through_storage_faults_and_resume_the_same_step(
  gcs_faults, gcs_server, gcs_bucket, tmp_path
):
  """Two processes, 4 steps of configs/test.py (checkpoints and grids at 2 and 4, a metrics
  line each step), three runs. 503 bursts on checkpoint, metrics and grid writes: the run
  equals a fault-free one. Then checkpoint 4 truly cut short, and a resume during which
  process 1 alone cannot read its part of checkpoint 2 until the storage client gives up: step
  4 is moved aside once (a content error, agreed), and step 2's failure is not a verdict on it:
  both processes try it again together and resume it (a process falling back alone would
  compute other losses), then train on to the fault-free run's losses and params."""
  from conftest import gcs_env  # pylint: disable=import-outside-toplevel

  proxy = gcs_faults.proxy
  direct = dict(os.environ, **gcs_env(int(gcs_server.rsplit(':', 1)[1])))
  workdir = f'{gcs_bucket}/faulty'
  for pattern in (r'faulty/checkpoints/2[./]', r'faulty/checkpoints/4[./]'):
    proxy.add(pattern, 'status', count=3, status=503, methods=('POST', 'PUT'))
  proxy.add(r'faulty/checkpoints/4[./]', 'status', count=2, status=429, methods=('GET',))
  proxy.add(r'faulty/metrics\.jsonl', 'status', count=2, status=503)
  proxy.add(r'faulty/samples_0000002', 'status', count=2, status=503)
  # The fault-free run (straight to the server) and the faulty one side by side: the storage
  # clients' waits in one leave the CPU to the other.
  faulty = _start(workdir, 4, os.environ)
  clean, _ = _two_processes(f'{gcs_bucket}/clean', 4, direct, tmp_path / 'clean.npz')
  first, _ = _finish(faulty)
  assert clean['step'] == 4 and [s for s, _ in clean['losses']] == [1, 2, 3, 4]
  _assert_same_run(first['losses'], clean['losses'])
  assert proxy.hits(r'checkpoints/2[./]') == 3 and proxy.hits(r'checkpoints/4[./]') == 5
  assert proxy.hits(r'metrics\.jsonl') == 2 and proxy.hits(r'samples_0000002') == 2
  assert {'samples_0000002.png', 'samples_0000004.png'} <= set(files.listdir(workdir))
  assert files.listdir(f'{workdir}/checkpoints') == ['2', '4']

  # Checkpoint 4's bytes cut short: a content error for both processes, agreed; moved aside
  # once (by process 0). gcsfs makes 6 tries of a request: all 6 fail for process 1's
  # data-iterator state in checkpoint 2.
  train_dir = f'{workdir}/checkpoints/4/train'
  arrays = [
    f'{train_dir}/{f}' for f in files.walk_files(train_dir) if f.split('/')[-2:-1] == ['d']
  ]  # ocdbt's data files
  largest = max(arrays, key=lambda f: len(files.read_bytes(f)))
  files.write_atomic(largest, files.read_bytes(largest)[:100])
  proxy.reset()
  proxy.add(
    r'/o/faulty/checkpoints/2/data/process_1-of-2\.json(\?|$)',
    'status',
    count=6,
    status=503,
    methods=('GET',),
  )
  second, _ = _two_processes(workdir, 2, os.environ, tmp_path / 'faulty.npz')
  assert proxy.hits(r'process_1-of-2') == 6
  # All six were tries of one request (gcsfs then gave up), made again afterwards: the restore
  # was tried again, by both processes together, and step 2 was not judged unreadable.
  faulted = {t for _, t, f in proxy.log if f is not None}
  assert len(faulted) == 1
  assert any(f is None and t in faulted for _, t, f in proxy.log)
  assert second['step'] == 4
  _assert_same_run(second['losses'][-2:], clean['losses'][-2:])
  for a, b in zip(_params(tmp_path / 'clean.npz'), _params(tmp_path / 'faulty.npz')):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # as test_train's
  assert files.listdir(f'{workdir}/checkpoints_unreadable') == ['4']
  assert files.listdir(f'{workdir}/checkpoints') == ['2', '4']
