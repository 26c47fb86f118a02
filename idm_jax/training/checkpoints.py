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

Faults: a checkpoint whose own bytes do not restore (a truncated array file, missing metadata) is
moved to WORKDIR/checkpoints_unreadable/<step> with a warning and resuming falls back to the
newest one that restores; inference readers (restore, evaluate, export) fall back the same way,
without moving anything (they may read a run that is still training). A storage error that
passes (a 503, a timeout, a dropped connection) says nothing about a checkpoint: it is retried,
and if it persists the run stops with nothing moved. The processes of a pod agree through the
coordination service on every decision one of them could otherwise make alone (which step to
try, whether it restored, whether a folder is there), and an item's failure is held until after
orbax's restore barrier: no process raises, falls back or goes on while another waits in a
collective, and all of them resume (or load) the same step.
"""

from __future__ import annotations

import json
import logging as std_logging
import re
import sys
import time

from absl import logging
from flax.linen import meta
import grain
import jax
import orbax.checkpoint as ocp

from idm_jax.models import unet
from idm_jax.runtime import configlib
from idm_jax.runtime import parallel
from idm_jax.storage import files
from idm_jax.training.train_state import merge_state
from idm_jax.training.train_state import split_state

CHECKPOINT_DIR = 'checkpoints'
UNREADABLE_DIR = 'checkpoints_unreadable'


def checkpoint_dir(workdir: str) -> str:
  return files.join(files.absolute(workdir), CHECKPOINT_DIR)


class Checkpointer:
  """A thin wrapper that knows our items; every process must call every method (collectives)."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
    self.directory = checkpoint_dir(workdir)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      create=True,
      cleanup_tmp_directories=True,
      enable_async_checkpointing=async_save,
    )
    handlers = dict(
      train=ocp.StandardCheckpointHandler(),
      ema=ocp.StandardCheckpointHandler(),
      data=grain.checkpoint.CheckpointHandler(),
      config=ocp.JsonCheckpointHandler(),
      progress=ocp.JsonCheckpointHandler(),
    )
    self._held = _HeldFailures(handlers)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(
    self,
    step: int,
    state,
    data_iterator,
    config,
    *,
    force: bool = False,
    train_seconds: float = 0.0,
  ) -> bool:
    train, ema = split_state(state)
    items = dict(
      train=ocp.args.StandardSave(train),
      ema=ocp.args.StandardSave(ema),
      config=ocp.args.JsonSave(json.loads(configlib.to_json(config))),
      progress=ocp.args.JsonSave(dict(train_seconds=float(train_seconds))),
    )
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointSave(_IteratorState(data_iterator))
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restores into `abstract_state`'s shapes and shardings (any mesh); sets the iterator."""
    train, ema = split_state(abstract_state)
    restored = self.manager.restore(step, args=self._restore_args(train, ema, data_iterator))
    return merge_state(restored['train'], restored['ema'])

  @staticmethod
  def _restore_args(train, ema, data_iterator):
    items = dict(train=ocp.args.StandardRestore(train), ema=ocp.args.StandardRestore(ema))
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(_IteratorState(data_iterator))
    return ocp.args.Composite(**items)

  def restore_latest(self, abstract_state, data_iterator=None):
    """(step, state) of the newest checkpoint that restores on every process; None if there
    are none.

    Newer ones whose content fails (a truncated array file, missing metadata: a full disk, a
    copy cut short) on any process are named in a warning and moved to
    WORKDIR/checkpoints_unreadable/ once all processes agree, so the run goes on from the
    newest good one and can save those steps again. A transient storage error is retried and,
    if it persists, raises StorageUnavailable on every process, moving nothing. If none
    restores (e.g. the model config changed), raises naming each and moves nothing.
    """
    found = _newest_that_restores(
      self.directory,
      self.manager.all_steps(),
      lambda step: self._restore_holding_failures(step, abstract_state, data_iterator),
      hint=' (a changed model config cannot resume a run)',
    )
    if found is None:
      return None
    step, state, failed = found
    if failed:
      self._move_unreadable(failed)
      logging.warning('resuming from step %d, the newest checkpoint that restores', step)
    return step, state

  def _restore_holding_failures(self, step: int, abstract_state, data_iterator):
    """self.restore(step), except that an item whose read fails does not raise inside orbax:
    orbax's restore ends with a barrier that every process must reach, and a process raising
    before it would leave the others waiting there. The first failure is raised after it."""
    train, ema = split_state(abstract_state)
    restored = self._manager_restore(step, self._restore_args(train, ema, data_iterator))
    return merge_state(restored['train'], restored['ema'])

  def _manager_restore(self, step: int, args):
    """self.manager.restore(step, args), raising an item's failure only after orbax's barrier."""
    return self._held.restore(self.manager, step, args)

  def _move_unreadable(self, steps) -> None:
    """Moves step folders out of orbax's sight (kept for inspection, never deleted). Process 0
    moves them; the others learn how that went through an agreement it always reaches (not a
    barrier it might never reach), and all raise if the move failed."""
    error = None
    if jax.process_index() == 0:
      dest_root = files.join(files.dirname(self.directory), UNREADABLE_DIR)
      try:
        files.makedirs(dest_root)
        for step in steps:
          dest = files.join(dest_root, str(step))
          if files.exists(dest):
            dest += time.strftime('.%Y%m%d-%H%M%S')
          files.call_with_retries(files.move, files.join(self.directory, str(step)), dest)
          logging.warning('moved the unreadable checkpoint to %s', dest)
      except Exception as e:  # pylint: disable=broad-except  (said below, on every process)
        error = e
    if parallel.max_over_processes(int(error is not None)):
      raise RuntimeError(
        f'could not move the unreadable checkpoints {list(steps)} out of {self.directory} '
        f'({_first_line(error) if error is not None else "see process 0"}); move them to '
        f'{files.join(files.dirname(self.directory), UNREADABLE_DIR)} and rerun'
      ) from error
    self.manager.reload()

  def train_seconds(self, step: int) -> float:
    """Training wall-clock seconds recorded with a checkpoint: 0 for checkpoints written before
    it was recorded, and 0 with a warning when that record does not read (the time budget then
    starts afresh rather than the run failing over a few bytes of bookkeeping).

    The same answer on every process (every one must call it): whether the record is there and
    whether it read are agreed, so no process enters orbax's restore barrier while another
    skipped it, and none counts another budget (a host whose budget looks spent would stop
    while the others train on)."""
    where = files.join(self.directory, str(step), 'progress')
    try:
      present = agreed_isdir(where)
    except Exception as e:  # pylint: disable=broad-except  (raised on every process alike)
      logging.warning(
        'could not tell whether checkpoint %s records its training time (%s); '
        'counting the time budget from 0',
        files.join(self.directory, str(step)),
        _first_line(e),
      )
      return 0.0
    if not present:
      return 0.0
    seconds, error = 0.0, None
    try:  # every process reaches orbax's barrier, whatever it reads
      restored = self._manager_restore(step, ocp.args.Composite(progress=ocp.args.JsonRestore()))
      seconds = float(restored['progress'].get('train_seconds', 0.0))
    except Exception as e:  # pylint: disable=broad-except  (orbax raises many types)
      error = e
    if parallel.max_over_processes(int(error is not None)):
      logging.warning(
        'the training time recorded with checkpoint %s does not read (%s); '
        'counting the time budget from 0',
        files.join(self.directory, str(step)),
        _first_line(error) if error is not None else 'on another process',
      )
      return 0.0
    return seconds

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


class StorageUnavailable(ConnectionError):
  """Reading a checkpoint kept failing for a transient storage error (throttling, a server
  error, a timeout, a dropped connection) on some process, through every retry: nothing is
  known about the checkpoint, so nothing was skipped or moved. (A ConnectionError, so that
  files.call_with_retries retries it: every process raises it at the same agreed moment.)"""


RESTORE_ATTEMPTS = 3  # tries of one step, all processes together, on a transient error
RESTORE_BACKOFF_S = 5.0  # the wait before the second; doubled before each one after it

_RESTORED, _UNREADABLE, _TRANSIENT = 0, 1, 2  # verdicts of one try; the worst one wins


def _newest_that_restores(directory: str, steps, restore, *, hint: str = ''):
  """(step, restore(step), [newer steps that failed]) for the newest of `steps` that restores;
  None when there are no steps. Training resumes and inference readers share this.

  A step fails only for a content error. A transient storage error (a 503, a timeout, a token
  refresh: `_is_transient`, after the storage clients' own retries) is not a verdict on the
  checkpoint: the step is tried again, and if that keeps failing StorageUnavailable is raised.
  With several processes (every one must call this) each try's verdict is agreed through the
  coordination service, so all of them return the same step: a step fails if any process hit
  a content error (each reads its own shards), and is tried again if any hit a transient one.
  Each failure is named in a warning; if none restores, raises naming each (`hint` ends it)."""
  failed = []
  left = sorted(set(steps), reverse=True)
  while True:
    # The step tried is agreed too: the oldest of the processes' newest ones left. Listings
    # made at different moments may differ (a run still training adds steps, and deletes the
    # oldest); a process that does not list the agreed step tries it anyway (if it is not
    # there, that is a content error, and the step is skipped on every process).
    step = -parallel.max_over_processes(-(left[0] if left else -1))
    if step < 0:
      break
    left = [s for s in left if s < step]
    where = files.join(directory, str(step))
    value, reason = files.call_with_retries(
      _agreed_try, restore, step, where, attempts=RESTORE_ATTEMPTS, backoff_s=RESTORE_BACKOFF_S
    )
    if reason is None:
      return step, value, [s for s, _ in failed]
    failed.append((step, reason))
    logging.warning('checkpoint %s does not restore (%s); trying the one before', where, reason)
  if failed:
    raise RuntimeError(
      f'no checkpoint in {directory} restores: '
      + '; '.join(f'step {s}: {r}' for s, r in failed)
      + hint
    )
  return None


def _agreed_try(restore, step: int, where: str):
  """(restore(step), None), or (None, why it does not restore) when some process hit a content
  error; raises StorageUnavailable on every process when some process hit a transient one."""
  value, error, verdict = None, None, _RESTORED
  try:
    value = restore(step)
  except Exception as e:  # pylint: disable=broad-except  (orbax and tensorstore raise many types)
    error, verdict = e, (_TRANSIENT if _is_transient(e) else _UNREADABLE)
    if isinstance(e, _FailedElsewhere):  # another process's verdict, agreed again below
      error, verdict = None, _RESTORED
  agreed = parallel.max_over_processes(verdict)
  if agreed == _RESTORED:
    return value, None
  if agreed == _TRANSIENT:
    logging.warning(
      'checkpoint %s: a storage error on %s, not a verdict on the checkpoint%s',
      where,
      'this process' if verdict == _TRANSIENT else 'another process',
      f' ({_first_line(error)})' if verdict == _TRANSIENT else '',
    )
    raise StorageUnavailable(
      f'checkpoint {where} could not be read: a storage error on '
      f'{"this process" if verdict == _TRANSIENT else "another process"} persisted through '
      f'the retries ({_first_line(error) if verdict == _TRANSIENT else "see its log"}); '
      'nothing was skipped or moved aside, rerun when the storage answers'
    ) from error
  return None, (
    _first_line(error) if error is not None else 'another process could not read its part of it'
  )


# Status codes tensorstore (under orbax) puts at the start of its errors' messages, for a read
# that may succeed if made again; a content error is DATA_LOSS, NOT_FOUND, INVALID_ARGUMENT, ...
_TRANSIENT_STATUS = ('UNAVAILABLE', 'DEADLINE_EXCEEDED', 'RESOURCE_EXHAUSTED', 'ABORTED')


def _is_transient(e: BaseException) -> bool:
  """files.is_transient for what a restore raises: anywhere along the exception's causes, and
  tensorstore's errors (ValueErrors whose message starts with an absl status code)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if files.is_transient(e) or str(e).lstrip().startswith(
      tuple(f'{code}:' for code in _TRANSIENT_STATUS)
    ):
      return True
    e = e.__cause__ or e.__context__
  return False


class _FailedElsewhere(Exception):
  """Raised on a process whose part of a restore went well when another process's failed (see
  _raise_agreed); _agreed_try then takes the verdict the failing process reports."""


def _raise_agreed(error: BaseException | None) -> None:
  """Raises `error` on the process that had it, and _FailedElsewhere on the others, if any
  process had one; returns on every process if none did. Every process must call it: it stands
  between two restores of one try, so that no process goes on into the second (and orbax's
  barrier) while another has left for the agreement at the end of the try."""
  verdict = _RESTORED if error is None else (_TRANSIENT if _is_transient(error) else _UNREADABLE)
  if parallel.max_over_processes(verdict) == _RESTORED:
    return
  if error is not None:
    raise error
  raise _FailedElsewhere('another process could not read its part of it')


def agreed_isdir(path: str) -> bool:
  """files.isdir(path), the same answer on every process (every one must call it): there only
  if every process sees it. An error that outlives files.call_with_retries on any process
  raises on all of them (its own error on that process)."""
  return _agreed_answer(files.isdir, path, present_if_any=False)


def agreed_exists(path: str) -> bool:
  """files.exists(path), the same answer on every process (every one must call it): there if
  any process sees it. Errors as agreed_isdir."""
  return _agreed_answer(files.exists, path, present_if_any=True)


def _agreed_answer(check, path: str, *, present_if_any: bool) -> bool:
  present, error = False, None
  try:
    present = bool(files.call_with_retries(check, path))
  except Exception as e:  # pylint: disable=broad-except  (raised below, on every process)
    error = e
  # The largest code wins: an error, then the answer that needs only one process.
  code = 2 if error is not None else int(present == present_if_any)
  agreed = parallel.max_over_processes(code)
  if agreed == 2:
    if error is not None:
      raise error
    raise StorageUnavailable(
      f'another process could not tell whether {path} exists (see its log); nothing was read'
    )
  return (agreed == 1) == present_if_any


class _HeldFailures:
  """Makes item handlers' restores record what they raise (and return None) while a restore
  through `restore` runs, instead of raising inside orbax's restore: it ends with a barrier that
  every process must reach, and a process raising before it would leave the others waiting
  there. The first failure is raised after the barrier. Each handler instance's method is
  replaced, not its class, so the handler keeps the type name orbax records in a checkpoint."""

  def __init__(self, handlers: dict):
    self.failures = None  # while restore() runs: item -> what its restore raised
    for item, handler in handlers.items():
      self._hold(handler, item)

  def _hold(self, handler, item: str) -> None:
    restore = handler.restore

    def holding(*args, **kwargs):
      if self.failures is None:
        return restore(*args, **kwargs)
      try:
        return restore(*args, **kwargs)
      except Exception as e:  # pylint: disable=broad-except  (raised after orbax's barrier)
        self.failures[item] = e
        return None

    handler.restore = holding

  def restore(self, manager, step: int, args):
    """manager.restore(step, args), raising an item's failure only after orbax's barrier."""
    _drop_callbacks_into_closed_loops()
    self.failures = {}
    try:
      restored = manager.restore(step, args=args)
      failures = self.failures
    finally:
      self.failures = None
    if failures:
      raise next(iter(failures.values()))
    return restored


def _drop_callbacks_into_closed_loops() -> None:
  """Silences the echoes of a failed read; a no-op while the current unraisable hook is already
  this one. Orbax restores inside asyncio.run: when one TensorStore read fails, the loop closes
  while the item's other reads are in flight. Each completion, scheduled onto the closed loop
  from a TensorStore thread, raises "Event loop is closed" where nothing can catch it, and each
  read task that failed too is logged as "Task exception was never retrieved" when collected.
  Python printed them as tracebacks, hundreds for one skipped checkpoint, on a run that goes on;
  the failure itself is raised, agreed and logged by the callers. Any other unraisable exception
  goes to the hook this one wraps, and any other asyncio record is logged."""
  previous = sys.unraisablehook
  if getattr(previous, 'drops_callbacks_into_closed_loops', False):
    return

  def hook(unraisable):
    e = unraisable.exc_value
    if isinstance(e, RuntimeError) and str(e) == 'Event loop is closed':
      return
    previous(unraisable)

  hook.drops_callbacks_into_closed_loops = True
  sys.unraisablehook = hook
  std_logging.getLogger('asyncio').addFilter(_not_an_orphaned_read)


def _not_an_orphaned_read(record: std_logging.LogRecord) -> bool:
  """False for asyncio's report of a TensorStore read whose failure orbax never collected."""
  message = record.getMessage()
  return not (
    re.match(r'(Task|Future) exception was never retrieved', message)
    and ('tensorstore' in message or 'orbax' in message)
  )


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

  def start_prefetch(self) -> None:  # grain's handler calls this after restoring
    pass


def load_for_inference(workdir: str, step: int | None = None):
  """(config, EMA params, step) of the latest (or given) complete checkpoint, the params as host
  numpy arrays on every process (`_restore_ema`). Opens the checkpoints read-only: a workdir
  being trained can be read. Over several processes every one of them must call it.

  Without `step`, a newest checkpoint that does not restore is skipped with a warning, as a
  training resume does, and the one before is used; raises naming each if none restores. A
  given `step` that does not restore raises. As in a training resume, the processes agree on
  every step tried and on each verdict (a transient storage error is tried again by all of
  them together, then StorageUnavailable on all), so all load the same step or all raise.
  """
  directory = checkpoint_dir(workdir)
  if not agreed_isdir(directory):
    raise FileNotFoundError(f'{workdir}: no {CHECKPOINT_DIR}/ folder; is this a training workdir?')
  handlers = dict(ema=ocp.StandardCheckpointHandler(), config=ocp.JsonCheckpointHandler())
  held = _HeldFailures(handlers)
  manager = ocp.CheckpointManager(
    directory, options=ocp.CheckpointManagerOptions(read_only=True), item_handlers=handlers
  )
  restore = lambda s: _restore_ema(manager, held, s)
  try:
    if step is not None:
      where = files.join(directory, str(step))
      value, reason = files.call_with_retries(
        _agreed_try, restore, step, where, attempts=RESTORE_ATTEMPTS, backoff_s=RESTORE_BACKOFF_S
      )
      if reason is not None:
        raise RuntimeError(f'checkpoint {where} does not restore ({reason})')
      config, ema = value
    else:
      found = _newest_that_restores(directory, manager.all_steps(), restore)
      if found is None:
        raise FileNotFoundError(f'{workdir}: no complete checkpoint found')
      step, (config, ema), _ = found
  finally:
    manager.close()
  logging.info('loaded EMA params of %s at step %d', workdir, step)
  return config, ema, step


def _restore_ema(manager, held: _HeldFailures, step: int):
  """(config, EMA params as host numpy arrays) of one checkpoint, through `held` (an item's
  failure raised after orbax's barrier). Two restores: the config, which gives the params'
  shapes, then the params; the processes agree between them (_raise_agreed), so all go on to
  the second or none does.

  Each process reads the whole params onto a device of its own and then to host memory: on a
  device of another process it could read nothing (orbax fails there, not even knowing the
  dtype), and every reader (a Restorer replicating them over its mesh, an export, a warm start
  into the training shardings) places them from host values anyway.
  """
  abstract, error = None, None
  try:
    saved = held.restore(manager, step, ocp.args.Composite(config=ocp.args.JsonRestore()))
    config = configlib.from_json(json.dumps(saved['config']))
    model = configlib.build_model(config.model, config.data.resolution)
    mine = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=mine), unet_abstract_params(model)
    )
  except Exception as e:  # pylint: disable=broad-except  (raised by _raise_agreed)
    error = e
  _raise_agreed(error)
  ema = held.restore(manager, step, ocp.args.Composite(ema=ocp.args.StandardRestore(abstract)))[
    'ema'
  ]
  return config, jax.device_get(ema)


def unet_abstract_params(model):
  """Unboxed abstract params of a model (shapes and dtypes only, nothing allocated)."""
  return meta.unbox(unet.param_shapes(model))
