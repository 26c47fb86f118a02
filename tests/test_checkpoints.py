"""Checkpoints that survive faults: corrupt latest checkpoints, unreadable progress records."""
import glob
import logging
import os

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


def _truncate_ema_arrays(step_dir):
  for p in glob.glob(os.path.join(step_dir, 'ema', '**', 'd', '*'), recursive=True):
    if os.path.isfile(p):
      with open(p, 'r+b') as f:
        f.truncate(10)


def test_inference_readers_fall_back_past_an_unreadable_newest_checkpoint(tmp_path, trainer,
                                                                         state, caplog):
  """restore, evaluate and export load through load_for_inference: a newest checkpoint that
  does not restore is skipped as a training resume skips it, and nothing is moved (the run that
  wrote it may still be training)."""
  from idm_jax import inference
  _save_steps(tmp_path, trainer, state, (2, 4))
  _truncate_ema_arrays(str(tmp_path / 'checkpoints' / '4'))
  with caplog.at_level(logging.WARNING):
    config, ema, step = checkpoints.load_for_inference(str(tmp_path))
  assert step == 2 and all(np.all(np.asarray(x) == 2) for x in jax.tree.leaves(ema))
  assert f'{tmp_path / "checkpoints" / "4"} does not restore' in caplog.text
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '4']
  assert inference.load(str(tmp_path))[1] == 2
  _truncate_ema_arrays(str(tmp_path / 'checkpoints' / '2'))
  with pytest.raises(RuntimeError, match=r'no checkpoint in .* restores: step 4: .*; step 2: '):
    checkpoints.load_for_inference(str(tmp_path))
  with pytest.raises(Exception):   # an explicit step is not silently replaced by another
    checkpoints.load_for_inference(str(tmp_path), step=4)


def test_an_unreadable_progress_record_restarts_the_budget_instead_of_failing(tmp_path, trainer,
                                                                             state, caplog):
  ckpt = checkpoints.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(2, state, None, trainer.config, force=True, train_seconds=12.5)
  assert ckpt.train_seconds(2) == 12.5
  for path in glob.glob(str(tmp_path / 'checkpoints' / '2' / 'progress' / '*')):
    if os.path.isfile(path):
      with open(path, 'w') as f:
        f.write('{"train_seconds": 1')   # cut short
  with caplog.at_level(logging.WARNING):
    assert ckpt.train_seconds(2) == 0.0
  assert 'does not read' in caplog.text and 'counting the time budget from 0' in caplog.text
  ckpt.close()


def test_an_unreadable_checkpoint_in_a_bucket_is_moved_aside_in_the_bucket(gcs_bucket, trainer,
                                                                          state):
  from idm_jax import files
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
  with pytest.raises(checkpoints.StorageUnavailable, match=r'gs://b/c/6 could not be read: a '
                     r'storage error on this process persisted.*nothing was skipped or moved'):
    checkpoints._newest_that_restores('gs://b/c', [4, 6], lambda s: restore(s, failures))
  assert calls == [6] * checkpoints.RESTORE_ATTEMPTS
