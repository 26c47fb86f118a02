"""Checkpoints: orbax's CheckpointManager over the train state, the data iterator and the config.

Layout of WORKDIR/checkpoints/<step>/:
  train/   step, params, optimiser state, RNG key (sharded arrays, restorable on any mesh)
  ema/     EMA params (a separate item so inference restores only what it needs)
  data/    the grain iterator state, one JSON file per process
  config/  the run's config as JSON (a checkpoint describes itself)
  progress/  JSON: training wall-clock seconds so far (train.max_seconds counts across resumes)
Saves are asynchronous and atomic: orbax writes into a temporary folder and renames it when the
save completes, so a run killed mid-save leaves the previous checkpoint as the latest one.

The workdir may be a local folder or a gs:// prefix (orbax writes through etils.epath and
tensorstore): every process writes its own array shards, process 0 the rest.

Faults: a checkpoint that does not restore (a truncated array file, missing metadata) is moved to
WORKDIR/checkpoints_unreadable/<step> with a warning and resuming falls back to the newest one
that restores; inference readers (restore, evaluate, export) fall back the same way, without
moving anything (they may read a run that is still training).
"""
from __future__ import annotations

import json
import time

from absl import logging
import grain
import jax
import orbax.checkpoint as ocp

from idm_jax import configlib
from idm_jax import files
from idm_jax.train_state import merge_state
from idm_jax.train_state import split_state

CHECKPOINT_DIR = 'checkpoints'
UNREADABLE_DIR = 'checkpoints_unreadable'


def checkpoint_dir(workdir: str) -> str:
  return files.join(files.absolute(workdir), CHECKPOINT_DIR)


class Checkpointer:
  """A thin wrapper that knows our items; every process must call every method (collectives)."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
    self.directory = checkpoint_dir(workdir)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers=dict(train=ocp.StandardCheckpointHandler(),
                           ema=ocp.StandardCheckpointHandler(),
                           data=grain.checkpoint.CheckpointHandler(),
                           config=ocp.JsonCheckpointHandler(),
                           progress=ocp.JsonCheckpointHandler()))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator, config, *, force: bool = False,
           train_seconds: float = 0.0) -> bool:
    train, ema = split_state(state)
    items = dict(train=ocp.args.StandardSave(train), ema=ocp.args.StandardSave(ema),
                 config=ocp.args.JsonSave(json.loads(configlib.to_json(config))),
                 progress=ocp.args.JsonSave(dict(train_seconds=float(train_seconds))))
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointSave(_IteratorState(data_iterator))
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restores into `abstract_state`'s shapes and shardings (any mesh); sets the iterator."""
    train, ema = split_state(abstract_state)
    items = dict(train=ocp.args.StandardRestore(train), ema=ocp.args.StandardRestore(ema))
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(_IteratorState(data_iterator))
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return merge_state(restored['train'], restored['ema'])

  def restore_latest(self, abstract_state, data_iterator=None):
    """(step, state) of the newest checkpoint that restores; None if there are none.

    Newer ones that fail (a truncated array file, missing metadata: a full disk, a copy cut
    short) are named in a warning and moved to WORKDIR/checkpoints_unreadable/, so the run
    goes on from the newest good one and can save those steps again. If none restores (e.g.
    the model config changed), raises naming each and moves nothing.
    """
    found = _newest_that_restores(
        self.directory, self.manager.all_steps(),
        lambda step: self.restore(step, abstract_state, data_iterator),
        hint=' (a changed model config cannot resume a run)')
    if found is None:
      return None
    step, state, failed = found
    if failed:
      self._move_unreadable(failed)
      logging.warning('resuming from step %d, the newest checkpoint that restores', step)
    return step, state

  def _move_unreadable(self, steps) -> None:
    """Moves step folders out of orbax's sight (kept for inspection, never deleted)."""
    if jax.process_index() == 0:
      dest_root = files.join(files.dirname(self.directory), UNREADABLE_DIR)
      files.makedirs(dest_root)
      for step in steps:
        dest = files.join(dest_root, str(step))
        if files.exists(dest):
          dest += time.strftime('.%Y%m%d-%H%M%S')
        files.move(files.join(self.directory, str(step)), dest)
        logging.warning('moved the unreadable checkpoint to %s', dest)
    from idm_jax import parallel  # pylint: disable=import-outside-toplevel
    parallel.barrier('checkpoints_moved_aside')
    self.manager.reload()

  def train_seconds(self, step: int) -> float:
    """Training wall-clock seconds recorded with a checkpoint: 0 for checkpoints written before
    it was recorded, and 0 with a warning when that record does not read (the time budget then
    starts afresh rather than the run failing over a few bytes of bookkeeping)."""
    if not files.isdir(files.join(self.directory, str(step), 'progress')):
      return 0.0
    try:
      restored = self.manager.restore(
          step, args=ocp.args.Composite(progress=ocp.args.JsonRestore()))
      return float(restored['progress'].get('train_seconds', 0.0))
    except Exception as e:  # pylint: disable=broad-except  (orbax raises many types)
      logging.warning('the training time recorded with checkpoint %s does not read (%s); '
                      'counting the time budget from 0', files.join(self.directory, str(step)),
                      _first_line(e))
      return 0.0

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def _newest_that_restores(directory: str, steps, restore, *, hint: str = ''):
  """(step, restore(step), [newer steps that failed]) for the newest of `steps` that restores;
  None when there are no steps. Each failure is named in a warning; if none restores, raises
  naming each (`hint` ends that message). Training resumes and inference readers share this."""
  failed = []
  for step in sorted(steps, reverse=True):
    try:
      return step, restore(step), [s for s, _ in failed]
    except Exception as e:  # pylint: disable=broad-except  (orbax and tensorstore raise many types)
      failed.append((step, _first_line(e)))
      logging.warning('checkpoint %s does not restore (%s); trying the one before',
                      files.join(directory, str(step)), failed[-1][1])
  if failed:
    raise RuntimeError(f'no checkpoint in {directory} restores: ' + '; '.join(
        f'step {s}: {r}' for s, r in failed) + hint)
  return None


def _first_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return f'{type(e).__name__}: {lines[0][:300] if lines else ""}'


class _IteratorState:
  """Adapts our data iterator (JSON-able dict state) to grain's orbax handler, which writes one
  file per process of whatever bytes get_state() returns."""

  def __init__(self, iterator):
    self.iterator = iterator

  def get_state(self) -> bytes:
    return json.dumps(self.iterator.get_state()).encode()

  def set_state(self, state: bytes) -> None:
    self.iterator.set_state(json.loads(state))

  def start_prefetch(self) -> None:   # grain's handler calls this after restoring
    pass


def load_for_inference(workdir: str, step: int | None = None):
  """(config, EMA params, step) of the latest (or given) complete checkpoint, the params as host
  numpy arrays on every process (`_restore_ema`). Opens the checkpoints read-only: a workdir
  being trained can be read. Over several processes every one of them must call it.

  Without `step`, a newest checkpoint that does not restore is skipped with a warning, as a
  training resume does, and the one before is used; raises naming each if none restores.
  """
  directory = checkpoint_dir(workdir)
  if not files.isdir(directory):
    raise FileNotFoundError(f'{workdir}: no {CHECKPOINT_DIR}/ folder; is this a training workdir?')
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                                  item_handlers=dict(ema=ocp.StandardCheckpointHandler(),
                                                     config=ocp.JsonCheckpointHandler()))
  try:
    if step is not None:
      config, ema = _restore_ema(manager, step)
    else:
      found = _newest_that_restores(directory, manager.all_steps(),
                                   lambda s: _restore_ema(manager, s))
      if found is None:
        raise FileNotFoundError(f'{workdir}: no complete checkpoint found')
      step, (config, ema), _ = found
  finally:
    manager.close()
  logging.info('loaded EMA params of %s at step %d', workdir, step)
  return config, ema, step


def _restore_ema(manager, step: int):
  """(config, EMA params as host numpy arrays) of one checkpoint.

  Each process reads the whole params onto a device of its own and then to host memory: on a
  device of another process it could read nothing (orbax fails there, not even knowing the
  dtype), and every reader (a Restorer replicating them over its mesh, an export, a warm start
  into the training shardings) places them from host values anyway.
  """
  from idm_jax.models import unet  # heavy; only inference needs it here
  saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
  config = configlib.from_json(json.dumps(saved))
  model = unet.build_model(config.model, config.data.resolution)
  mine = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=mine),
                          unet_abstract_params(model))
  ema = manager.restore(step, args=ocp.args.Composite(ema=ocp.args.StandardRestore(abstract)))['ema']
  return config, jax.device_get(ema)


def unet_abstract_params(model):
  """Unboxed abstract params of a model (shapes and dtypes only, nothing allocated)."""
  from flax.linen import meta
  from idm_jax.models import unet
  return meta.unbox(unet.param_shapes(model))
