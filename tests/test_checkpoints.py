"""Checkpoints that survive faults: corrupt latest checkpoints, a second run on a workdir."""
import glob
import json
import logging
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from idm_jax import checkpoints
from idm_jax import parallel
from idm_jax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def trainer():
  from conftest import load_config
  config = load_config('test')
  return train.Trainer(config, parallel.make_mesh(config.mesh))


@pytest.fixture(scope='module')
def state(trainer):
  return trainer.init(jax.random.PRNGKey(0))


def _save_steps(workdir, trainer, state, steps):
  """Checkpoints at `steps`, each with its step number in every EMA leaf (to tell them apart)."""
  ckpt = checkpoints.Checkpointer(str(workdir), async_save=False)
  for s in steps:
    marked = state.replace(step=state.step + s,
                           ema=jax.tree.map(lambda x, s=s: x * 0 + s, state.ema))
    ckpt.save(s, marked, None, trainer.config, force=True)
  ckpt.close()


def _truncate_largest_array_file(step_dir):
  files = [p for p in glob.glob(os.path.join(step_dir, 'train', '**', 'd', '*'), recursive=True)
           if os.path.isfile(p)]
  with open(max(files, key=os.path.getsize), 'r+b') as f:
    f.truncate(100)


def _remove_array_metadata(step_dir):
  os.remove(os.path.join(step_dir, 'train', '_METADATA'))


@pytest.mark.parametrize('corrupt', [_truncate_largest_array_file, _remove_array_metadata])
def test_resume_skips_a_corrupt_latest_checkpoint(tmp_path, trainer, state, corrupt, caplog):
  _save_steps(tmp_path, trainer, state, (2, 4, 6))
  ckdir = tmp_path / 'checkpoints'
  corrupt(str(ckdir / '6'))
  corrupt(str(ckdir / '4'))
  ckpt = checkpoints.Checkpointer(str(tmp_path), async_save=False)
  with caplog.at_level(logging.WARNING):
    resumed, seconds = train._resume_or_init(trainer, ckpt, None)
  assert int(resumed.step) == 2 and seconds == 0.0
  assert all(np.all(np.asarray(x) == 2) for x in jax.tree.leaves(resumed.ema))
  warned = ' '.join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
  assert f'{ckdir / "6"} does not restore' in warned and f'{ckdir / "4"} does not restore' in warned
  assert 'resuming from step 2' in warned
  # Moved aside (kept, not deleted), so the resumed run can write steps 4 and 6 again.
  assert sorted(os.listdir(tmp_path / 'checkpoints_unreadable')) == ['4', '6']
  assert ckpt.manager.all_steps() == [2]
  ckpt.save(4, resumed.replace(step=resumed.step + 2), None, trainer.config, force=True)
  ckpt.wait()
  assert ckpt.latest_step() == 4
  ckpt.close()


def test_no_restorable_checkpoint_is_an_error_that_moves_nothing(tmp_path, trainer, state):
  _save_steps(tmp_path, trainer, state, (2, 4))
  for s in ('2', '4'):
    _remove_array_metadata(str(tmp_path / 'checkpoints' / s))
  ckpt = checkpoints.Checkpointer(str(tmp_path), async_save=False)
  with pytest.raises(RuntimeError, match=r'no checkpoint in .*checkpoints restores: step 4: .*; '
                                         r'step 2: '):
    ckpt.restore_latest(trainer.abstract_state)
  ckpt.close()
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '4']
  assert not (tmp_path / 'checkpoints_unreadable').exists()


HOLDER = '''
import sys
from idm_jax import checkpoints
lock = checkpoints.WorkdirLock(sys.argv[1]).acquire()
print('held', flush=True)
sys.stdin.read()        # hold until the test closes our stdin (or kills us)
lock.release()
'''


def _start_holder(workdir):
  proc = subprocess.Popen([sys.executable, '-c', HOLDER, str(workdir)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO))
  assert proc.stdout.readline().strip() == 'held'
  return proc


def test_a_second_training_run_on_a_workdir_in_use_is_refused(tmp_path, test_config):
  holder = _start_holder(tmp_path)
  try:
    with pytest.raises(checkpoints.WorkdirInUse) as e:
      train.train_and_evaluate(test_config, str(tmp_path))
    msg = str(e.value)
    assert f'in use by process {holder.pid} on host {socket.gethostname()}' in msg
    assert str(tmp_path / 'train.lock') in msg
    assert not (tmp_path / 'checkpoints').exists()     # refused before anything was written
  finally:
    holder.stdin.close()
    holder.wait(timeout=60)
  assert not (tmp_path / 'train.lock').exists()        # the holder released it on exit


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path, caplog):
  holder = _start_holder(tmp_path)
  holder.kill()
  holder.wait(timeout=60)
  stale = json.loads((tmp_path / 'train.lock').read_text())
  assert stale['pid'] == holder.pid
  with caplog.at_level(logging.WARNING):
    with checkpoints.WorkdirLock(str(tmp_path)):
      mine = json.loads((tmp_path / 'train.lock').read_text())
      assert mine['pid'] == os.getpid() and mine['host'] == socket.gethostname()
  assert f'left by process {holder.pid}' in caplog.text and 'no longer running' in caplog.text
  assert not (tmp_path / 'train.lock').exists()


def test_lock_staleness_rules():
  me, host, start = os.getpid(), socket.gethostname(), checkpoints._process_start(os.getpid())
  parent = os.getppid()
  parent_start = checkpoints._process_start(parent)
  live = dict(pid=parent, host=host, start=parent_start)
  assert not checkpoints.lock_is_stale(live, host, me, start)
  assert not checkpoints.lock_is_stale(dict(live, host='elsewhere'), host, me, start)
  assert not checkpoints.lock_is_stale(dict(pid=me, host=host, start=start), host, me, start)
  # Our pid but another start time: a previous process whose pid we inherited (containers).
  assert checkpoints.lock_is_stale(dict(pid=me, host=host, start='1'), host, me, start)
  if parent_start is not None:   # the parent's pid, reused by a process started at another time
    assert checkpoints.lock_is_stale(dict(live, start='1'), host, me, start)
  assert checkpoints.lock_is_stale(dict(pid=2 ** 22 + 1, host=host), host, me, start)  # no such pid
