"""The workdir lock: one training run per workdir, on local disk and in a gs:// bucket."""

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from idm_jax.storage import workdir_lock
from idm_jax.training import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


HOLDER = """
import sys
from idm_jax.storage import workdir_lock
lock = workdir_lock.WorkdirLock(sys.argv[1]).acquire()
print('held', flush=True)
sys.stdin.read()        # hold until the test closes our stdin (or kills us)
lock.release()
"""


def _start_holder(workdir):
  proc = subprocess.Popen(
    [sys.executable, '-c', HOLDER, str(workdir)],
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    text=True,
    cwd=REPO,
    env=dict(os.environ, PYTHONPATH=REPO),
  )
  assert proc.stdout.readline().strip() == 'held'
  return proc


def test_a_second_training_run_on_a_workdir_in_use_is_refused(tmp_path, test_config):
  holder = _start_holder(tmp_path)
  try:
    with pytest.raises(workdir_lock.WorkdirInUse) as e:
      train.train_and_evaluate(test_config, str(tmp_path))
    msg = str(e.value)
    assert f'in use by process {holder.pid} on host {socket.gethostname()}' in msg
    assert str(tmp_path / 'train.lock') in msg
    assert not (tmp_path / 'checkpoints').exists()  # refused before anything was written
  finally:
    holder.stdin.close()
    holder.wait(timeout=60)
  assert not (tmp_path / 'train.lock').exists()  # the holder released it on exit


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path, caplog):
  holder = _start_holder(tmp_path)
  holder.kill()
  holder.wait(timeout=60)
  stale = json.loads((tmp_path / 'train.lock').read_text())
  assert stale['pid'] == holder.pid
  with caplog.at_level(logging.WARNING):
    with workdir_lock.WorkdirLock(str(tmp_path)):
      mine = json.loads((tmp_path / 'train.lock').read_text())
      assert mine['pid'] == os.getpid() and mine['host'] == socket.gethostname()
  assert f'left by process {holder.pid}' in caplog.text and 'no longer running' in caplog.text
  assert not (tmp_path / 'train.lock').exists()


def test_lock_staleness_rules():
  me, host, start = os.getpid(), socket.gethostname(), workdir_lock.process_start(os.getpid())
  parent = os.getppid()
  parent_start = workdir_lock.process_start(parent)
  live = dict(pid=parent, host=host, start=parent_start)
  assert not workdir_lock.lock_is_stale(live, host, me, start)
  assert not workdir_lock.lock_is_stale(dict(live, host='elsewhere'), host, me, start)
  assert not workdir_lock.lock_is_stale(dict(pid=me, host=host, start=start), host, me, start)
  # Our pid but another start time: a previous process whose pid we inherited (containers).
  assert workdir_lock.lock_is_stale(dict(pid=me, host=host, start='1'), host, me, start)
  if parent_start is not None:  # the parent's pid, reused by a process started at another time
    assert workdir_lock.lock_is_stale(dict(live, start='1'), host, me, start)
  assert workdir_lock.lock_is_stale(dict(pid=2**22 + 1, host=host), host, me, start)  # no such pid


# --- In a gs:// bucket (the local GCS server): create-if-absent, heartbeat, conditional takeover.


def _bucket_holder(workdir, heartbeat=0.2, stale=600.0):
  code = (
    'import sys\nfrom idm_jax.storage import workdir_lock\n'
    f'lock = workdir_lock.WorkdirLock(sys.argv[1], heartbeat_seconds={heartbeat}, '
    f'stale_seconds={stale}).acquire()\n'
    "print('held', flush=True)\nsys.stdin.read()\nlock.release()\n"
  )
  proc = subprocess.Popen(
    [sys.executable, '-c', code, workdir],
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    text=True,
    cwd=REPO,
    env=dict(os.environ, PYTHONPATH=REPO),
  )
  assert proc.stdout.readline().strip() == 'held'
  return proc


def test_a_second_run_on_a_bucket_workdir_in_use_is_refused_naming_the_holder(
  gcs_bucket, test_config
):
  from idm_jax.storage import files

  workdir = f'{gcs_bucket}/run'
  holder = _bucket_holder(workdir)
  try:
    time.sleep(1.0)  # several heartbeats: each rewrite keeps the lock the holder's
    with pytest.raises(workdir_lock.WorkdirInUse) as e:
      train.train_and_evaluate(test_config, workdir)
    msg = str(e.value)
    assert f'in use by process {holder.pid} on host {socket.gethostname()}' in msg
    assert f'{workdir}/train.lock' in msg and 'last heartbeat' in msg
    assert not files.exists(f'{workdir}/checkpoints')  # refused before anything was written
  finally:
    holder.stdin.close()
    holder.wait(timeout=60)
  assert holder.returncode == 0
  assert not files.exists(f'{workdir}/train.lock')  # released on exit


def test_a_bucket_lock_without_heartbeat_is_taken_over_and_its_holder_learns_it(gcs_bucket, caplog):
  from idm_jax.storage import files

  workdir = f'{gcs_bucket}/run'
  # A holder on "another host" whose heartbeat stopped (its host died): fresh, it is respected;
  # once older than stale_seconds it is watched for stale_seconds more, then taken over.
  files.write_text(
    f'{workdir}/train.lock',
    json.dumps(dict(pid=1, host='another-host', start='1', since='2026-01-01 00:00:00')),
  )
  with pytest.raises(workdir_lock.WorkdirInUse, match='process 1 on host another-host'):
    workdir_lock.WorkdirLock(workdir, stale_seconds=30).acquire()
  time.sleep(1.5)
  t0 = time.monotonic()
  with caplog.at_level(logging.WARNING):
    taker = workdir_lock.WorkdirLock(workdir, heartbeat_seconds=0.2, stale_seconds=1).acquire()
  assert time.monotonic() - t0 >= 1.0  # watched by its own clock, not judged by the server's
  assert 'watching it for 1 s before taking it over' in caplog.text
  assert 'left by process 1 on another-host, whose last heartbeat was over 1 s ago' in caplog.text
  mine = json.loads(files.read_text(f'{workdir}/train.lock'))
  assert mine['pid'] == os.getpid() and mine['host'] == socket.gethostname()
  # The holder stalls (a partition, a frozen host): after half the stale time without a
  # heartbeat it says it lost the lock, before any taker may take it; a second taker then does.
  taker._impl._stop.set()
  taker._impl._thread.join()
  time.sleep(0.6)
  with caplog.at_level(logging.ERROR):
    assert taker.lost
  assert 'no heartbeat landed for' in caplog.text
  time.sleep(1.0)
  second = workdir_lock.WorkdirLock(workdir, heartbeat_seconds=0.2, stale_seconds=1)
  second.me = dict(second.me, pid=os.getpid() + 1)  # another process, same host
  second.acquire()
  taker._impl._stop.clear()  # the stalled holder's heartbeat resumes: it writes nothing more
  generation = second._impl.generation
  taker._impl.heartbeat_seconds = 0.01
  taker._impl._beat()  # returns at once: a lost lock is never written again
  taker.release()
  # Still beating: the next generation is awaited with a deadline, not a fixed sleep (on loaded
  # cores one write can take longer than several beats).
  deadline = time.monotonic() + 30
  while second._impl.generation == generation and time.monotonic() < deadline:
    time.sleep(0.05)
  assert json.loads(files.read_text(f'{workdir}/train.lock'))['pid'] == os.getpid() + 1
  assert not second.lost and second._impl.generation != generation
  second.release()
  assert not files.exists(f'{workdir}/train.lock')


def test_a_holder_whose_lock_another_run_rewrote_learns_it_at_its_next_heartbeat(
  gcs_bucket, caplog
):
  from idm_jax.storage import files

  workdir = f'{gcs_bucket}/run'
  lock = workdir_lock.WorkdirLock(workdir, heartbeat_seconds=0.2, stale_seconds=60).acquire()
  with caplog.at_level(logging.ERROR):
    files.write_text(f'{workdir}/train.lock', json.dumps(dict(pid=1, host='another-host')))
    deadline = time.monotonic() + 30
    while not lock.lost and time.monotonic() < deadline:
      time.sleep(0.1)
  assert lock.lost and 'was taken over by another run' in caplog.text
  lock.release()  # not ours any more: left alone
  assert json.loads(files.read_text(f'{workdir}/train.lock'))['host'] == 'another-host'


def test_a_bucket_lock_left_by_a_dead_process_on_this_host_is_taken_over_at_once(gcs_bucket):
  from idm_jax.storage import files

  workdir = f'{gcs_bucket}/run'
  holder = _bucket_holder(workdir)
  holder.kill()
  holder.wait(timeout=60)
  assert json.loads(files.read_text(f'{workdir}/train.lock'))['pid'] == holder.pid
  with workdir_lock.WorkdirLock(workdir):  # no waiting for the heartbeat to go stale
    assert json.loads(files.read_text(f'{workdir}/train.lock'))['pid'] == os.getpid()


def test_a_run_whose_bucket_lock_was_taken_over_stops_without_saving(
  gcs_bucket, test_config, monkeypatch
):
  from idm_jax.storage import files

  workdir = f'{gcs_bucket}/run'
  monkeypatch.setattr(workdir_lock.WorkdirLock, 'lost', property(lambda self: True))
  with pytest.raises(
    workdir_lock.WorkdirInUse, match='this run lost its lock .*another run took it over'
  ):
    train.train_and_evaluate(test_config, workdir)
  assert not files.exists(f'{workdir}/checkpoints/2')  # ckpt_every=2: nothing was saved
