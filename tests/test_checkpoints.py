"""Checkpoints that survive faults: corrupt latest checkpoints, unreadable progress records."""

import gc
import glob
import logging
import os

import jax
import numpy as np
import pytest

from idm_jax.runtime import parallel
from idm_jax.storage import files
from idm_jax.training import checkpoints
from idm_jax.training import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def trainer():
  from conftest import load_config

  config = load_config('test')
  return train.Trainer(config, parallel.make_mesh(config.mesh))


@pytest.fixture(scope='module')
def state(trainer):
  return trainer.init(jax.random.PRNGKey(0))


def _save_steps(workdir, trainer, state, steps, train_seconds=0.0):
  """Checkpoints at `steps`, each with its step number in every EMA leaf (to tell them apart)."""
  ckpt = checkpoints.Checkpointer(str(workdir), async_save=False)
  for s in steps:
    marked = state.replace(
      step=state.step + s, ema=jax.tree.map(lambda x, s=s: x * 0 + s, state.ema)
    )
    ckpt.save(s, marked, None, trainer.config, force=True, train_seconds=train_seconds)
  ckpt.close()


def _truncate_largest_array_file(step_dir):
  files = [
    p
    for p in glob.glob(os.path.join(step_dir, 'train', '**', 'd', '*'), recursive=True)
    if os.path.isfile(p)
  ]
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
  with pytest.raises(
    RuntimeError,
    match=r'no checkpoint in .*checkpoints restores: step 4: .*; '
    r'step 2: ',
  ):
    ckpt.restore_latest(trainer.abstract_state)
  ckpt.close()
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '4']
  assert not (tmp_path / 'checkpoints_unreadable').exists()


def _truncate_ema_arrays(step_dir):
  for p in glob.glob(os.path.join(step_dir, 'ema', '**', 'd', '*'), recursive=True):
    if os.path.isfile(p):
      with open(p, 'r+b') as f:
        f.truncate(10)


# A failed read closes orbax's event loop while TensorStore's other reads are in flight; each
# one's completion then printed a "RuntimeError: Event loop is closed" traceback, hundreds per
# skipped checkpoint, on a run that was fine.
QUIET = pytest.mark.filterwarnings('error::pytest.PytestUnraisableExceptionWarning')


@QUIET
def test_inference_readers_fall_back_past_an_unreadable_newest_checkpoint(
  tmp_path, trainer, state, caplog
):
  """restore, evaluate and export load through load_for_inference: a newest checkpoint that
  does not restore is skipped as a training resume skips it, and nothing is moved (the run that
  wrote it may still be training). Quietly: a warning per skipped step, no tracebacks."""
  from idm_jax.inference import engine

  _save_steps(tmp_path, trainer, state, (2, 4))
  _truncate_ema_arrays(str(tmp_path / 'checkpoints' / '4'))
  with caplog.at_level(logging.WARNING):
    config, ema, step = checkpoints.load_for_inference(str(tmp_path))
    gc.collect()  # asyncio reports a failed read nobody collected when it is freed
  assert step == 2 and all(np.all(np.asarray(x) == 2) for x in jax.tree.leaves(ema))
  assert not [r.getMessage()[:200] for r in caplog.records if r.name == 'asyncio']
  assert f'{tmp_path / "checkpoints" / "4"} does not restore' in caplog.text
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '4']
  assert engine.load(str(tmp_path))[1] == 2
  _truncate_ema_arrays(str(tmp_path / 'checkpoints' / '2'))
  with pytest.raises(RuntimeError, match=r'no checkpoint in .* restores: step 4: .*; step 2: '):
    checkpoints.load_for_inference(str(tmp_path))
  with pytest.raises(Exception):  # an explicit step is not silently replaced by another
    checkpoints.load_for_inference(str(tmp_path), step=4)


@QUIET
def test_an_unreadable_progress_record_restarts_the_budget_instead_of_failing(
  tmp_path, trainer, state, caplog
):
  ckpt = checkpoints.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(2, state, None, trainer.config, force=True, train_seconds=12.5)
  assert ckpt.train_seconds(2) == 12.5
  for path in glob.glob(str(tmp_path / 'checkpoints' / '2' / 'progress' / '*')):
    if os.path.isfile(path):
      with open(path, 'w') as f:
        f.write('{"train_seconds": 1')  # cut short
  with caplog.at_level(logging.WARNING):
    assert ckpt.train_seconds(2) == 0.0
  assert 'does not read' in caplog.text and 'counting the time budget from 0' in caplog.text
  ckpt.close()


def test_an_unreadable_checkpoint_in_a_bucket_is_moved_aside_in_the_bucket(
  gcs_bucket, trainer, state
):
  from idm_jax.storage import files

  workdir = f'{gcs_bucket}/run'
  _save_steps(workdir, trainer, state, (2, 4))
  files.remove(f'{workdir}/checkpoints/4/train/_METADATA')
  ckpt = checkpoints.Checkpointer(workdir, async_save=False)
  resumed, _ = train._resume_or_init(trainer, ckpt, None)
  ckpt.close()
  assert int(resumed.step) == 2
  assert files.listdir(f'{workdir}/checkpoints') == ['2']
  assert files.listdir(f'{workdir}/checkpoints_unreadable') == ['4']
  assert 'ema/_METADATA' in files.walk_files(f'{workdir}/checkpoints_unreadable/4')


def test_a_storage_error_is_retried_not_taken_for_an_unreadable_checkpoint(monkeypatch, caplog):
  """Which failures skip a checkpoint: its content (tensorstore's DATA_LOSS, a missing file),
  not the storage failing for now (a 503 from gcsfs, tensorstore's UNAVAILABLE), which is tried
  again; one that persists stops with StorageUnavailable instead of skipping anything."""
  from gcsfs.retry import HttpError

  monkeypatch.setattr(checkpoints, 'RESTORE_BACKOFF_S', 0.01)
  calls = []

  def restore(step, failures):
    calls.append(step)
    if failures.get(step):
      raise failures[step].pop(0)
    return f'state {step}'

  unavailable = lambda: HttpError({'code': 503, 'message': 'Service Unavailable'})
  data_loss = lambda: ValueError('DATA_LOSS: Error reading "d/1a2b": unexpected end of data')
  # Step 6 fails twice for the storage, then restores: it is the one resumed.
  failures = {6: [unavailable(), ValueError('UNAVAILABLE: 503 from the server')]}
  found = checkpoints._newest_that_restores('gs://b/c', [4, 6], lambda s: restore(s, failures))
  assert found == (6, 'state 6', []) and calls == [6, 6, 6]
  # Step 6's content is cut short (and a 503 on the way): skipped, step 4 restores.
  calls.clear()
  failures = {6: [unavailable(), data_loss()]}
  with caplog.at_level(logging.WARNING):
    found = checkpoints._newest_that_restores('gs://b/c', [4, 6], lambda s: restore(s, failures))
  assert found == (4, 'state 4', [6]) and calls == [6, 6, 4]
  assert 'gs://b/c/6 does not restore (ValueError: DATA_LOSS' in caplog.text
  # The storage keeps failing: nothing is judged, nothing skipped.
  calls.clear()
  failures = {6: [unavailable() for _ in range(checkpoints.RESTORE_ATTEMPTS)]}
  with pytest.raises(
    checkpoints.StorageUnavailable,
    match=r'gs://b/c/6 could not be read: a '
    r'storage error on this process persisted.*nothing was skipped or moved',
  ):
    checkpoints._newest_that_restores('gs://b/c', [4, 6], lambda s: restore(s, failures))
  assert calls == [6] * checkpoints.RESTORE_ATTEMPTS


# --- Agreement: no process acts alone on what it alone saw (a failure, a listing, a folder).


def _another_process(monkeypatch, values):
  """parallel.max_over_processes as if a second process passed `values`, in order; returns the
  list of what this process passed."""
  passed, values = [], list(values)

  def max_over_processes(n, timeout_s=3600.0):
    del timeout_s
    passed.append(int(n))
    return max(int(n), values.pop(0))

  monkeypatch.setattr(parallel, 'max_over_processes', max_over_processes)
  return passed


def test_the_step_tried_and_its_verdict_are_agreed(monkeypatch, caplog):
  """The other process listed steps up to 4 only (its listing came before a still-training run
  wrote 6) and could not read its part of 4: this process, which read 4 well, tries 4 (not 6)
  and then 2, as the other does, and names the other process as the reason."""
  passed = _another_process(monkeypatch, [-4, 1, -2, 0])
  calls = []
  with caplog.at_level(logging.WARNING):
    found = checkpoints._newest_that_restores(
      'gs://b/c', [2, 4, 6], lambda s: calls.append(s) or f'state {s}'
    )
  assert found == (2, 'state 2', [4]) and calls == [4, 2]
  assert passed == [-6, 0, -2, 0]
  assert (
    'gs://b/c/4 does not restore (another process could not read its part of it)' in caplog.text
  )


def test_a_failure_between_the_two_reads_of_a_try_is_agreed(monkeypatch):
  """_restore_ema reads the config, then the params: when the other process's config read
  failed, this one raises there too (and does not go on into the params' restore, whose barrier
  the other would never reach); the try's verdict is then the other's."""
  _another_process(monkeypatch, [0])
  checkpoints._raise_agreed(None)  # nobody failed: goes on
  _another_process(monkeypatch, [1])
  with pytest.raises(checkpoints._FailedElsewhere):
    checkpoints._raise_agreed(None)
  _another_process(monkeypatch, [0])
  with pytest.raises(ValueError, match='mine'):
    checkpoints._raise_agreed(ValueError('mine'))

  def fails_elsewhere(step):
    raise checkpoints._FailedElsewhere('another process could not read its part of it')

  passed = _another_process(monkeypatch, [2])  # the other's failure was transient
  with pytest.raises(checkpoints.StorageUnavailable, match='a storage error on another process'):
    checkpoints._agreed_try(fails_elsewhere, 4, 'gs://b/c/4')
  assert passed == [0]
  _another_process(monkeypatch, [1])  # a content error
  assert checkpoints._agreed_try(fails_elsewhere, 4, 'gs://b/c/4') == (
    None,
    'another process could not read its part of it',
  )


def test_the_recorded_training_time_is_agreed(tmp_path, trainer, state, monkeypatch, caplog):
  """train_seconds gives every process the same answer: 0 when another process does not see
  the record (and then nobody enters the restore), or could not read it."""
  _save_steps(tmp_path, trainer, state, (2,), train_seconds=12.5)
  ckpt = checkpoints.Checkpointer(str(tmp_path), async_save=False)
  restores = []
  manager_restore = ckpt._manager_restore
  monkeypatch.setattr(
    ckpt, '_manager_restore', lambda *args: restores.append(args[0]) or manager_restore(*args)
  )
  try:
    _another_process(monkeypatch, [0, 0])
    assert ckpt.train_seconds(2) == 12.5 and restores == [2]
    passed = _another_process(monkeypatch, [1])  # the other does not see progress/
    assert ckpt.train_seconds(2) == 0.0 and restores == [2]
    assert passed == [0]
    _another_process(monkeypatch, [0, 1])  # the other could not read it
    with caplog.at_level(logging.WARNING):
      assert ckpt.train_seconds(2) == 0.0
    assert 'does not read (on another process)' in caplog.text
    _another_process(monkeypatch, [2])  # the other could not tell
    with caplog.at_level(logging.WARNING):
      assert ckpt.train_seconds(2) == 0.0
    assert 'another process could not tell whether' in caplog.text
  finally:
    ckpt.close()


AGREEMENT_WORKER = os.path.join(REPO, 'tests', 'checkpoint_agreement_worker.py')


def test_two_processes_agree_when_one_alone_cannot_read(
  gcs_faults, gcs_server, gcs_bucket, trainer, state, tmp_path
):
  """Two real processes read checkpoints in a bucket, process 1 through the fault proxy, which
  answers 404 to some of its reads only: step 4's config, step 4's EMA arrays, step 2's progress
  record, step 2's progress folder. Each time both processes come to the same result (step 2,
  an error, 0 s), where one acting on its own failure would leave the other waiting in orbax's
  restore barrier or fall back to another step alone."""
  import json
  import socket
  import subprocess
  import sys

  from conftest import gcs_env

  proxy = gcs_faults.proxy
  root = gcs_bucket
  for workdir in ('config', 'ema'):
    _save_steps(f'{root}/{workdir}', trainer, state, (2, 4))
  for workdir in ('progress', 'hidden'):
    _save_steps(f'{root}/{workdir}', trainer, state, (2,), train_seconds=12.5)
  proxy.add(r'/o/config/checkpoints/4/config/.*alt=media', 'status', status=404, methods=('GET',))
  proxy.add(r'/o/ema/checkpoints/4/ema/.*alt=media', 'status', status=404, methods=('GET',))
  proxy.add(
    r'/o/progress/checkpoints/2/progress/.*alt=media', 'status', status=404, methods=('GET',)
  )
  proxy.add(r'hidden/checkpoints/2/progress', 'status', status=404, methods=('GET',))
  # Process 1 alone cannot see a workdir, or an export's output that is there.
  _save_steps(f'{root}/unseen', trainer, state, (2,))
  files.write_atomic(f'{root}/taken.msgpack', b'an earlier export')
  proxy.add(r'unseen', 'status', status=404, methods=('GET',))
  proxy.add(r'taken\.msgpack', 'status', status=404, methods=('GET',))
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  direct = gcs_env(int(gcs_server.rsplit(':', 1)[1]))
  procs = []
  try:
    for i, env in enumerate((direct, gcs_faults.env)):
      procs.append(
        subprocess.Popen(
          [
            sys.executable,
            AGREEMENT_WORKER,
            '--root',
            root,
            '--out',
            str(tmp_path),
            '--process-id',
            str(i),
            '--num-processes',
            '2',
            '--port',
            str(port),
          ],
          env=dict(os.environ, **env, PYTHONPATH=REPO),
          stdout=subprocess.DEVNULL,
          stderr=open(tmp_path / f'err{i}', 'w'),
        )
      )
    for p in procs:
      p.wait(timeout=300)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  errs = [(tmp_path / f'err{i}').read_text()[-3000:] for i in range(2)]
  assert [p.returncode for p in procs] == [0, 0], errs
  results = [json.loads((tmp_path / f'{i}.json').read_text()) for i in range(2)]
  assert results[0]['config'] == results[1]['config'] == [2, 2.0], results
  assert results[0]['ema'] == results[1]['ema'] == [2, 2.0], results
  for r in results:
    assert r['ema at 4']['error'].startswith('RuntimeError: checkpoint '), results
    assert r['progress'] == r['hidden'] == 0.0, results
    # Neither goes on alone: both refuse, where process 0 would wait for process 1 in
    # load_for_inference's agreements.
    assert r['unseen']['error'].startswith('FileNotFoundError: '), results
    assert r['export']['error'].startswith('FileExistsError: '), results
  # Process 1 met each fault; process 0 (not behind the proxy) met none and still followed.
  for pattern in (
    'config/checkpoints/4/config/',
    'ema/checkpoints/4/ema/',
    'progress/checkpoints/2/progress/',
    'hidden/checkpoints/2/progress',
    'unseen',
    r'taken\.msgpack',
  ):
    assert proxy.hits(pattern) > 0, pattern
