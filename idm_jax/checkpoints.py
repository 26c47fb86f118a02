"""Checkpoints: orbax's CheckpointManager over the train state, the data iterator and the config.

Layout of WORKDIR/checkpoints/<step>/:
  train/   step, params, optimiser state, RNG key (sharded arrays, restorable on any mesh)
  ema/     EMA params (a separate item so inference restores only what it needs)
  data/    the grain iterator state, one JSON file per process
  config/  the run's config as JSON (a checkpoint describes itself)
  progress/  JSON: training wall-clock seconds so far (train.max_seconds counts across resumes)
Saves are asynchronous and atomic: orbax writes into a temporary folder and renames it when the
save completes, so a run killed mid-save leaves the previous checkpoint as the latest one.

Faults: a checkpoint that does not restore (a truncated array file, missing metadata) is moved to
WORKDIR/checkpoints_unreadable/<step> with a warning and resuming falls back to the newest one
that restores. WORKDIR/train.lock (pid, host) keeps a second training run out of a workdir in
use; a lock left by a dead process on the same host is taken over.
"""
from __future__ import annotations

import json
import os
import socket
import time

from absl import logging
import grain
import jax
import orbax.checkpoint as ocp

from idm_jax import configlib
from idm_jax.train_state import merge_state
from idm_jax.train_state import split_state

CHECKPOINT_DIR = 'checkpoints'
UNREADABLE_DIR = 'checkpoints_unreadable'
LOCK_FILE = 'train.lock'


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


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
    failed = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state = self.restore(step, abstract_state, data_iterator)
      except Exception as e:  # pylint: disable=broad-except  (orbax and tensorstore raise many types)
        reason = _first_line(e)
        logging.warning('checkpoint %s does not restore (%s); trying the one before',
                        os.path.join(self.directory, str(step)), reason)
        failed.append((step, reason))
        continue
      if failed:
        self._move_unreadable([s for s, _ in failed])
        logging.warning('resuming from step %d, the newest checkpoint that restores', step)
      return step, state
    if failed:
      raise RuntimeError(f'no checkpoint in {self.directory} restores: ' + '; '.join(
          f'step {s}: {r}' for s, r in failed) + ' (a changed model config cannot resume a run)')
    return None

  def _move_unreadable(self, steps) -> None:
    """Moves step folders out of orbax's sight (kept for inspection, never deleted)."""
    if jax.process_index() == 0:
      dest_root = os.path.join(os.path.dirname(self.directory), UNREADABLE_DIR)
      os.makedirs(dest_root, exist_ok=True)
      for step in steps:
        dest = os.path.join(dest_root, str(step))
        if os.path.exists(dest):
          dest += time.strftime('.%Y%m%d-%H%M%S')
        os.rename(os.path.join(self.directory, str(step)), dest)
        logging.warning('moved the unreadable checkpoint to %s', dest)
    from idm_jax import parallel  # pylint: disable=import-outside-toplevel
    parallel.barrier('checkpoints_moved_aside')
    self.manager.reload()

  def train_seconds(self, step: int) -> float:
    """Training wall-clock seconds recorded with a checkpoint (0 for checkpoints written before
    it was recorded)."""
    if not os.path.isdir(os.path.join(self.directory, str(step), 'progress')):
      return 0.0
    restored = self.manager.restore(step, args=ocp.args.Composite(progress=ocp.args.JsonRestore()))
    return float(restored['progress'].get('train_seconds', 0.0))

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def _first_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return f'{type(e).__name__}: {lines[0][:300] if lines else ""}'


class WorkdirInUse(RuntimeError):
  """Another live training process holds the workdir's lock; the message names it."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:   # alive, owned by another user
    return True
  return True


def _process_start(pid: int) -> str | None:
  """The process's start time in clock ticks since boot (Linux), which tells a live process
  from a later one that reuses its pid; None where /proc is missing."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def lock_is_stale(holder: dict, host: str, pid: int, start: str | None) -> bool:
  """Whether a lock written by `holder` can be taken by process `pid` (started at `start`) on
  `host`: only on the same host, when the holder's process is gone (or its pid now belongs to
  a process started later, this one included). Another host's lock is never judged."""
  if holder.get('host') != host:
    return False
  hpid = int(holder.get('pid', -1))
  if hpid == pid:
    return holder.get('start') != start
  if hpid <= 0 or not _pid_alive(hpid):
    return True
  hstart = holder.get('start')
  return hstart is not None and _process_start(hpid) not in (None, hstart)


class WorkdirLock:
  """WORKDIR/train.lock while a training run uses the workdir (a context manager).

  The file holds the holder's pid, host and start time as JSON and is created with O_EXCL, so
  of two runs started together one gets it. Released on exit (exceptions and SIGTERM included);
  a run killed harder leaves it behind, and the next run on that host takes it over with a
  warning once it sees the process is gone.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    self.me = dict(pid=os.getpid(), host=socket.gethostname(), start=_process_start(os.getpid()),
                   since=time.strftime('%Y-%m-%d %H:%M:%S'))
    self.held = False

  def acquire(self) -> WorkdirLock:
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    for _ in range(3):   # a stale lock is removed, then created again; others may race us
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = self._read_holder()
        if holder is None:   # removed under us, or being written this instant
          time.sleep(0.1)
          continue
        if not lock_is_stale(holder, self.me['host'], self.me['pid'], self.me['start']):
          raise WorkdirInUse(
              f'{os.path.dirname(self.path)} is in use by process {holder.get("pid")} on host '
              f'{holder.get("host")} (since {holder.get("since")}; lock {self.path}). Stop that '
              'run or choose another workdir; if that process is gone, delete the lock file.')
        logging.warning('taking over %s: it was left by process %s on %s, which is no longer '
                        'running', self.path, holder.get('pid'), holder.get('host'))
        try:
          os.remove(self.path)
        except FileNotFoundError:
          pass
        continue
      with os.fdopen(fd, 'w') as f:
        json.dump(self.me, f)
        f.flush()
        os.fsync(f.fileno())
      self.held = True
      return self
    raise WorkdirInUse(f'could not take {self.path}: it keeps changing (another run starting?)')

  def _read_holder(self) -> dict | None:
    try:
      with open(self.path) as f:
        holder = json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      # Empty or garbled: a creator may be writing it right now. Say so rather than guess.
      if time.time() - os.path.getmtime(self.path) < 5:
        return None
      raise WorkdirInUse(f'{self.path} exists but is unreadable; if no run uses '
                         f'{os.path.dirname(self.path)}, delete it') from None
    return holder if isinstance(holder, dict) else {}

  def release(self) -> None:
    """Removes the lock if it is still ours (never another run's)."""
    if not self.held:
      return
    self.held = False
    try:
      with open(self.path) as f:
        ours = json.load(f) == self.me
    except (OSError, ValueError):
      return
    if ours:
      os.remove(self.path)

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


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
  """(config, EMA params, step) of the latest (or given) complete checkpoint, as single-device
  arrays. Opens the checkpoints read-only: a workdir being trained can be read."""
  from idm_jax.models import unet  # heavy; only inference needs it here
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'{workdir}: no {CHECKPOINT_DIR}/ folder; is this a training workdir?')
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                                  item_handlers=dict(ema=ocp.StandardCheckpointHandler(),
                                                     config=ocp.JsonCheckpointHandler()))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'{workdir}: no complete checkpoint found')
  saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
  config = configlib.from_json(json.dumps(saved))
  model = unet.build_model(config.model, config.data.resolution)
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
      unet_abstract_params(model))
  ema = manager.restore(step, args=ocp.args.Composite(ema=ocp.args.StandardRestore(abstract)))['ema']
  manager.close()
  logging.info('loaded EMA params of %s at step %d', workdir, step)
  return config, ema, step


def unet_abstract_params(model):
  """Unboxed abstract params of a model (shapes and dtypes only, nothing allocated)."""
  from flax.linen import meta
  from idm_jax.models import unet
  return meta.unbox(unet.param_shapes(model))
