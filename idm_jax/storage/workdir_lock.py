"""WORKDIR/train.lock: one training run per workdir, on local disk or in a gs:// bucket.

The lock holds its holder's pid, host and start time as JSON. Process 0 of a run takes it (the
other hosts of a pod share the workdir); a second run is refused with a message naming the
holder. Released on exit, exceptions and SIGTERM included.

Local folder: created with O_EXCL, so of two runs started together one gets it. A run killed
harder leaves it behind; the next run on that host takes it over once /proc shows the holder's
process is gone. Another host's lock is never judged (no /proc across hosts).

Bucket: created with the generation precondition `ifGenerationMatch=0` (create-if-absent, which
GCS decides atomically), so of two runs one gets it. The holder rewrites it every
HEARTBEAT_SECONDS, each rewrite conditional on the generation it wrote last and carrying a fresh
nonce: a rewrite that landed but whose reply was lost is retried, refused (the generation moved
on, to its own), read back and recognised by its nonce, so one dropped reply does not cost the
lock. No clock is compared with another: a holder whose rewrites have not landed for half of
STALE_SECONDS (its own monotonic clock, from the moment it sent the last one that landed) stops
using the workdir (`lost`), and a taker takes a lock over only after it has watched the object
keep one generation for STALE_SECONDS by its own monotonic clock (the server's timestamp only
lets it refuse at once when the last heartbeat is recent). So a partitioned holder has stopped
before anyone can take over. A lock left on this very host by a process that is gone is taken at
once. Taking over is conditional on the generation watched, so of two takers one wins. A holder
whose rewrite finds another run's generation has lost the lock. Either way it logs an error,
and the training loop, which reads `lost` at each log step, stops without saving.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time
import uuid

from absl import logging

from idm_jax.storage import files

LOCK_FILE = 'train.lock'
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 600.0


class WorkdirInUse(RuntimeError):
  """Another live training run holds the workdir's lock; the message names it."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, owned by another user
    return True
  return True


def process_start(pid: int) -> str | None:
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
  a process started later, this one included). Another host's lock is never judged here."""
  if holder.get('host') != host:
    return False
  hpid = int(holder.get('pid', -1))
  if hpid == pid:
    return holder.get('start') != start
  if hpid <= 0 or not _pid_alive(hpid):
    return True
  hstart = holder.get('start')
  return hstart is not None and process_start(hpid) not in (None, hstart)


def _in_use(where: str, holder: dict, lock: str, extra: str = '') -> WorkdirInUse:
  return WorkdirInUse(
    f'{where} is in use by process {holder.get("pid")} on host {holder.get("host")} (since '
    f'{holder.get("since")}{extra}; lock {lock}). Stop that run or choose another workdir; if '
    'that process is gone, delete the lock file.'
  )


class WorkdirLock:
  """WORKDIR/train.lock while a training run uses the workdir (a context manager)."""

  def __init__(
    self,
    workdir: str,
    *,
    heartbeat_seconds: float = HEARTBEAT_SECONDS,
    stale_seconds: float = STALE_SECONDS,
  ):
    self.workdir = files.absolute(workdir)
    self.path = files.join(self.workdir, LOCK_FILE)
    self.me = dict(
      pid=os.getpid(),
      host=socket.gethostname(),
      start=process_start(os.getpid()),
      since=time.strftime('%Y-%m-%d %H:%M:%S'),
    )
    self.held = False
    self._impl = (
      _BucketLock(self, heartbeat_seconds, stale_seconds)
      if files.is_remote(self.path)
      else _LocalLock(self)
    )

  def acquire(self) -> WorkdirLock:
    self._impl.acquire()
    self.held = True
    return self

  def release(self) -> None:
    """Removes the lock if it is still ours (never another run's)."""
    if self.held:
      self.held = False
      self._impl.release()

  @property
  def lost(self) -> bool:
    """Whether this run must stop using the workdir (buckets only): another run took the lock
    over, or this one could not renew it for half the stale time."""
    return getattr(self._impl, 'lost', False)

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def can_be_lost(workdir: str) -> bool:
  """Whether a run's lock on `workdir` can be lost while it runs: in a bucket, yes (taken over
  after its heartbeat stalled); a local lock, held by a live process, cannot."""
  return files.is_remote(workdir)


class _LocalLock:
  """O_EXCL file; a dead holder on this host is seen through /proc."""

  def __init__(self, lock: WorkdirLock):
    self.lock = lock
    self.path = lock.path

  def acquire(self) -> None:
    me = self.lock.me
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    for _ in range(3):  # a stale lock is removed, then created again; others may race us
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = self._read_holder()
        if holder is None:  # removed under us, or being written this instant
          time.sleep(0.1)
          continue
        if not lock_is_stale(holder, me['host'], me['pid'], me['start']):
          raise _in_use(self.lock.workdir, holder, self.path) from None
        logging.warning(
          'taking over %s: it was left by process %s on %s, which is no longer running',
          self.path,
          holder.get('pid'),
          holder.get('host'),
        )
        try:
          os.remove(self.path)
        except FileNotFoundError:
          pass
        continue
      with os.fdopen(fd, 'w') as f:
        json.dump(me, f)
        f.flush()
        os.fsync(f.fileno())
      return
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
      raise WorkdirInUse(
        f'{self.path} exists but is unreadable; if no run uses {self.lock.workdir}, delete it'
      ) from None
    return holder if isinstance(holder, dict) else {}

  def release(self) -> None:
    try:
      with open(self.path) as f:
        ours = json.load(f) == self.lock.me
    except (OSError, ValueError):
      return
    if ours:
      os.remove(self.path)


class _BucketLock:
  """A gs:// object created if absent, kept fresh by a heartbeat thread; every write conditional
  on the generation last seen (google-cloud-storage, which speaks GCS's preconditions and
  retries a conditional request after a transient error on its own)."""

  def __init__(self, lock: WorkdirLock, heartbeat_seconds: float, stale_seconds: float):
    if not lock.path.startswith('gs://'):
      raise ValueError(f'{lock.path}: a training workdir must be local or on gs://')
    from google.cloud import storage  # noqa: PLC0415 (optional: the [gcs] extra)

    bucket, name = lock.path[len('gs://') :].split('/', 1)
    self.lock = lock
    self.blob = storage.Client().bucket(bucket).blob(name)
    self.heartbeat_seconds = heartbeat_seconds
    self.stale_seconds = stale_seconds
    # One request's own retries end well within half the stale time, so a heartbeat that cannot
    # get through is seen (and the holder stops) before a taker may take over.
    self._retry = storage.retry.DEFAULT_RETRY.with_timeout(max(1.0, stale_seconds / 8))
    self._timeout = max(1.0, min(60.0, stale_seconds / 8))
    self.generation = None
    self.taken_over = False  # another run's write replaced ours: it holds the lock now
    self._renewed = None  # monotonic time a write that landed was sent
    self._said_expired = False
    self._stop = threading.Event()
    self._thread = None

  @property
  def expired(self) -> bool:
    """Whether this holder has gone half the stale time without a renewal that landed: it must
    stop, since a taker may be watching the lock and take it at the stale time. Read by the
    training loop, so it holds even while a heartbeat request hangs."""
    expired = (
      self._renewed is not None and time.monotonic() - self._renewed > self.stale_seconds / 2
    )
    if expired and not self._said_expired:
      self._said_expired = True
      logging.error(
        '%s: no heartbeat landed for %.0f s; this run stops using the workdir %s '
        '(another run may take it over)',
        self.lock.path,
        self.stale_seconds / 2,
        self.lock.workdir,
      )
    return expired

  @property
  def lost(self) -> bool:
    return self.taken_over or self.expired

  def _payload(self, nonce: str) -> str:
    return json.dumps(dict(self.lock.me, heartbeat=time.strftime('%Y-%m-%d %H:%M:%S'), nonce=nonce))

  def _write(self, if_generation_match: int) -> None:
    """Writes the lock if its generation is still `if_generation_match`; raises
    PreconditionFailed if it is not. A write that landed but whose reply was lost is retried
    by the client and then refused (the generation moved on, to ours): the object is read back,
    and if it carries this write's nonce the write is taken as done."""
    from google.api_core import exceptions  # noqa: PLC0415 (optional: the [gcs] extra)

    nonce = uuid.uuid4().hex
    sent = time.monotonic()
    try:
      self.blob.upload_from_string(
        self._payload(nonce),
        content_type='application/json',
        if_generation_match=if_generation_match,
        retry=self._retry,
        timeout=self._timeout,
      )
    except exceptions.PreconditionFailed:
      if self._read_nonce() != nonce:
        raise
      logging.info('%s: a write whose reply was lost had landed', self.lock.path)
    self.generation = self.blob.generation
    self._renewed = sent

  def _read_nonce(self) -> str | None:
    """The nonce of the lock as it is now (its generation in self.blob), None if unreadable."""
    from google.api_core import exceptions  # noqa: PLC0415 (optional: the [gcs] extra)

    try:
      self.blob.reload(retry=self._retry, timeout=self._timeout)
      generation = self.blob.generation
      holder = json.loads(
        self.blob.download_as_bytes(
          if_generation_match=generation, retry=self._retry, timeout=self._timeout
        )
      )
    except (exceptions.NotFound, exceptions.PreconditionFailed, ValueError):
      return None
    return holder.get('nonce') if isinstance(holder, dict) else None

  def _read(self) -> tuple[int, dict] | None:
    """(generation, holder) of the lock as it is now; None if there is none (or it changed
    between the two reads: the caller looks again)."""
    from google.api_core import exceptions  # noqa: PLC0415 (optional: the [gcs] extra)

    try:
      self.blob.reload(retry=self._retry, timeout=self._timeout)
      generation = self.blob.generation
      data = self.blob.download_as_bytes(
        if_generation_match=generation, retry=self._retry, timeout=self._timeout
      )
    except (exceptions.NotFound, exceptions.PreconditionFailed):
      return None
    try:
      holder = json.loads(data)
    except ValueError:
      holder = {}
    return generation, (holder if isinstance(holder, dict) else {})

  def acquire(self) -> None:
    from google.api_core import exceptions  # noqa: PLC0415 (optional: the [gcs] extra)

    me = self.lock.me
    for _ in range(5):  # each pass reads the lock, then creates or takes it over conditionally
      found = self._read()
      if found is None:
        try:
          self._write(if_generation_match=0)
        except exceptions.PreconditionFailed:  # another run created it first: judge that one
          continue
        break
      generation, holder = found
      gone_here = lock_is_stale(holder, me['host'], me['pid'], me['start'])
      if not gone_here:
        # The server's timestamp against our clock only decides whether to refuse at once (a
        # fresh heartbeat). Taking over needs our own observation: the object unchanged for the
        # stale time by this host's monotonic clock, whatever the clocks say.
        age = (datetime.datetime.now(datetime.timezone.utc) - self.blob.updated).total_seconds()
        if age < self.stale_seconds:
          raise _in_use(
            self.lock.workdir, holder, self.lock.path, f', last heartbeat {max(age, 0):.0f} s ago'
          )
        logging.warning(
          '%s, left by process %s on %s, has not changed for %.0f s: watching it '
          'for %.0f s before taking it over',
          self.lock.path,
          holder.get('pid'),
          holder.get('host'),
          age,
          self.stale_seconds,
        )
        if not self._unchanged_for(generation, self.stale_seconds):
          raise _in_use(
            self.lock.workdir,
            holder,
            self.lock.path,
            '; its heartbeat resumed while this run watched it',
          )
      logging.warning(
        'taking over %s: it was left by process %s on %s, %s',
        self.lock.path,
        holder.get('pid'),
        holder.get('host'),
        'which is no longer running'
        if gone_here
        else f'whose last heartbeat was over {self.stale_seconds:.0f} s ago',
      )
      try:
        self._write(if_generation_match=generation)
      except exceptions.PreconditionFailed:  # refreshed or taken by another run meanwhile
        continue
      break
    else:
      raise WorkdirInUse(
        f'could not take {self.lock.path}: it keeps changing (another run starting?)'
      )
    self._thread = threading.Thread(target=self._beat, name='workdir-lock-heartbeat', daemon=True)
    self._thread.start()

  def _unchanged_for(self, generation: int, seconds: float) -> bool:
    """Watches the lock: True once reads at least `seconds` apart (this host's monotonic
    clock) both found `generation`; False as soon as it changes or disappears. A read that
    fails is no observation, so an outage only makes the watch longer."""
    from google.api_core import exceptions  # noqa: PLC0415 (optional: the [gcs] extra)

    first = time.monotonic()
    while True:
      time.sleep(min(self.heartbeat_seconds, seconds / 4))
      try:
        self.blob.reload(retry=self._retry, timeout=self._timeout)
      except exceptions.NotFound:
        return False
      except Exception as e:  # pylint: disable=broad-except  (network: look again)
        logging.warning('could not read %s (%s); still watching', self.lock.path, e)
        continue
      if self.blob.generation != generation:
        return False
      if time.monotonic() - first >= seconds:
        return True

  def _beat(self) -> None:
    from google.api_core import exceptions  # noqa: PLC0415 (optional: the [gcs] extra)

    while not self._stop.wait(self.heartbeat_seconds):
      if self.expired:  # never write again: a taker may be about to take it over
        return
      try:
        self._write(if_generation_match=self.generation)
      except exceptions.PreconditionFailed:
        self.taken_over = True
        logging.error(
          '%s was taken over by another run: this run no longer holds the workdir %s; stop it',
          self.lock.path,
          self.lock.workdir,
        )
        return
      except Exception as e:  # pylint: disable=broad-except  (network: try again next beat)
        logging.warning('could not refresh %s (%s); retrying', self.lock.path, e)

  def release(self) -> None:
    from google.api_core import exceptions  # noqa: PLC0415 (optional: the [gcs] extra)

    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    if self.lost:  # another run may hold it now: its lock is not ours to delete
      return
    try:
      self.blob.delete(
        if_generation_match=self.generation, retry=self._retry, timeout=self._timeout
      )
    except (exceptions.NotFound, exceptions.PreconditionFailed):
      pass  # a retried delete whose first try landed, or a lock no longer ours
    except Exception as e:  # pylint: disable=broad-except  (network: it goes stale instead)
      logging.warning(
        'could not remove %s (%s); the next run takes it over once it is stale', self.lock.path, e
      )
