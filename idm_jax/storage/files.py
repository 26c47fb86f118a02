"""The one path layer: every file the project reads or writes for a user, on local disk or in a
bucket (`gs://...`), through etils.epath, the layer orbax and TFDS use too.

Local paths behave as plain files always did. On object storage there are no folders, no renames
and no appends, so each operation here is written for both:
  * write_atomic: locally a temp file beside the target, fsync, rename; in a bucket one upload,
    which readers see whole or not at all. Either way no reader sees half a file.
  * AppendedText: locally an append (a reader can `tail -f`); in a bucket the object is
    rewritten with the new lines, so callers append in batches (run_log.Writer flushes every few
    seconds). Either way an append that failed is made again from where the last one ended.
  * makedirs: a no-op in a bucket, where a "folder" is only a name prefix.
  * move: a rename locally; in a bucket a copy of every object, then a delete.
Remote listings are never cached: other hosts (and orbax's tensorstore) write the same bucket.
"""

from __future__ import annotations

import concurrent.futures
import errno
import os
import posixpath
import random
import socket
import tempfile
import time
from typing import Iterator

from etils import epath

PathLike = str | os.PathLike


def is_remote(p: PathLike) -> bool:
  """Whether `p` names object storage (gs://, s3://, ...) rather than a local file."""
  s = os.fspath(p)
  return '://' in s and not s.startswith('file://')


def path(p: PathLike) -> epath.Path:
  """An epath.Path for a local (~ expanded) or remote path."""
  s = os.fspath(p)
  if is_remote(s):
    return epath.Path(s)
  return epath.Path(os.path.expanduser(s))


def join(base: PathLike, *parts: str) -> str:
  """Joins path parts with '/' in a bucket and os.path.join locally; returns a str."""
  base = os.fspath(base)
  if is_remote(base):
    return posixpath.join(base, *parts)
  return os.path.join(base, *parts)


def dirname(p: PathLike) -> str:
  s = os.fspath(p)
  return posixpath.dirname(s.rstrip('/')) if is_remote(s) else os.path.dirname(s)


def absolute(p: PathLike) -> str:
  """A local path made absolute (~ expanded); a remote one unchanged."""
  s = os.fspath(p)
  return s.rstrip('/') if is_remote(s) else os.path.abspath(os.path.expanduser(s))


def relpath(p: PathLike, root: PathLike) -> str:
  """`p` relative to the folder `root` ('/'-separated in a bucket)."""
  p, root = os.fspath(p), os.fspath(root)
  if is_remote(p):
    return posixpath.relpath(p.split('://', 1)[1], root.split('://', 1)[1])
  return os.path.relpath(p, root)


def exists(p: PathLike) -> bool:
  return path(p).exists()


def isdir(p: PathLike) -> bool:
  return path(p).is_dir()


def isfile(p: PathLike) -> bool:
  if not is_remote(p):
    return os.path.isfile(os.path.expanduser(os.fspath(p)))
  fs, key = _fs(p)
  return fs.isfile(key)


def makedirs(p: PathLike) -> None:
  """Creates a local folder (and its parents); nothing to do in a bucket."""
  if not is_remote(p):
    os.makedirs(os.path.expanduser(os.fspath(p)), exist_ok=True)


def read_bytes(p: PathLike) -> bytes:
  return path(p).read_bytes()


def read_text(p: PathLike) -> str:
  return read_bytes(p).decode('utf-8')


def listdir(p: PathLike) -> list[str]:
  """The names directly inside a folder (or under a bucket prefix), sorted. In a bucket an empty
  "folder" does not exist, so a prefix with nothing below it lists as empty."""
  if is_remote(p) and not isdir(p):
    return []
  return sorted(child.name for child in path(p).iterdir())


def walk_files(p: PathLike) -> list[str]:
  """Every file below a folder, as sorted '/'-separated paths relative to it."""
  s = os.fspath(p)
  if not is_remote(s):
    root = os.path.expanduser(s)
    return sorted(
      os.path.relpath(os.path.join(d, f), root).replace(os.sep, '/')
      for d, _, fs in os.walk(root)
      for f in fs
    )
  fs, key = _fs(s)
  key = key.rstrip('/')
  return sorted(k[len(key) + 1 :] for k in fs.find(key) if k.startswith(key + '/'))


def write_atomic(p: PathLike, data: bytes) -> None:
  """Writes `data` so that readers (and a crash mid-write) see the old file or the whole new one."""
  if is_remote(p):
    fs, key = _fs(p)
    fs.pipe_file(key, bytes(data))  # one upload: the object appears whole when it completes
    return
  p = os.path.expanduser(os.fspath(p))
  directory = os.path.dirname(os.path.abspath(p))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.' + os.path.basename(p) + '.', suffix='.tmp')
  try:
    # mkstemp makes the file private (0600); give it the permissions a plain open() would.
    os.fchmod(fd, 0o666 & ~_umask())
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, p)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def is_partial_write(name: str) -> bool:
  """Whether a file name is one of write_atomic's temporaries ('.NAME.*.tmp' beside NAME),
  which a process killed mid-write leaves behind on local disk."""
  base = name.rsplit('/', 1)[-1]
  return base.startswith('.') and base.endswith('.tmp')


def remove_partial_writes(folder: PathLike) -> None:
  """Deletes what killed write_atomic calls left below `folder`. Call it only when no process is
  writing there. In a bucket there is nothing to do: an upload is whole or absent."""
  if is_remote(folder) or not isdir(folder):
    return
  for rel in walk_files(folder):
    if is_partial_write(rel):
      remove(join(folder, rel))


def writes_can_be_partial(p: PathLike) -> bool:
  """Whether a file at `p` that exists may still be damaged by a crash or a disk fault, so that
  reading it back (a checksum) is the only proof it is whole: on local disk, yes; in a bucket an
  upload is whole or absent, so an object's presence is the proof."""
  return not is_remote(p)


def write_text(p: PathLike, text: str) -> None:
  write_atomic(p, text.encode('utf-8'))


class AppendedText:
  """A text file that grows by appends, on either kind of path; one writer per file.

  Locally an append + fsync (a reader can `tail -f` it); in a bucket, which has no append, a
  rewrite of the whole object, so append in batches. The writer remembers where its last
  successful append ended (the file's size locally, the object's bytes in a bucket) and every
  append starts from there: an append that raised, having landed in part (locally) or whole with
  its reply lost (in a bucket), can simply be made again, and no text is lost or doubled. What
  the file held before this writer's first append (an earlier run's lines) is kept.
  """

  def __init__(self, p: PathLike):
    self.path = os.fspath(p)
    self._remote = is_remote(self.path)
    self._written: bytes | None = None  # bucket: the object as last written (None: unread)
    self._end: int | None = None  # local: the size after the last append (None: not opened)

  def append(self, text: str) -> None:
    data = text.encode('utf-8')
    if self._remote:
      if self._written is None:
        try:
          self._written = read_bytes(self.path)
        except FileNotFoundError:
          self._written = b''
      write_atomic(self.path, self._written + data)
      self._written += data
      return
    p = os.path.expanduser(self.path)
    os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
    with open(p, 'ab') as f:
      if self._end is None:
        self._end = f.seek(0, os.SEEK_END)
      f.truncate(self._end)  # what a failed append of this writer left
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    self._end += len(data)


def copy_file(src: PathLike, dst: PathLike) -> None:
  """Copies one file's bytes to `dst` atomically (either side local or remote)."""
  write_atomic(dst, read_bytes(src))


def move(src: PathLike, dst: PathLike) -> None:
  """Moves a file or folder (in a bucket: copies every object, then deletes the originals)."""
  if is_remote(src) or is_remote(dst):
    if not (is_remote(src) and is_remote(dst)):
      raise ValueError(f'move {os.fspath(src)} -> {os.fspath(dst)}: both must be in a bucket')
    fs, src_key = _fs(src)
    _, dst_key = _fs(dst)
    # Server-side copies (rewrite), then deletes: every object bucket API has these. Made
    # again after a failure, it completes what the first try left: the copies are
    # whole-object rewrites, and a delete finding nothing is a delete that landed.
    if not fs.exists(src_key) and fs.exists(dst_key):
      return  # an earlier try moved it all and lost only the reply
    try:
      if fs.isdir(src_key):
        fs.copy(src_key.rstrip('/') + '/', dst_key.rstrip('/') + '/', recursive=True)
        fs.rm(src_key, recursive=True)
      else:
        fs.copy(src_key, dst_key)
        fs.rm_file(src_key)
    except FileNotFoundError:
      if fs.exists(src_key) or not fs.exists(dst_key):
        raise
  else:
    os.rename(os.path.expanduser(os.fspath(src)), os.path.expanduser(os.fspath(dst)))


def remove(p: PathLike) -> None:
  """Deletes one file; a missing one is not an error."""
  try:
    path(p).unlink()
  except FileNotFoundError:
    pass


def iter_lines(p: PathLike) -> Iterator[str]:
  """The lines of a text file (without their newlines)."""
  yield from read_text(p).splitlines()


class StorageError(RuntimeError):
  """A path cannot be used (missing bucket, no credentials, no permission); the message says
  which path and why, in one line."""


def check_writable(p: PathLike) -> None:
  """Fails fast, before any compile or long read, when a folder cannot be written: a missing
  bucket, missing credentials, no permission, or a local path that cannot be a folder, in one
  line naming the path. Creates a local folder; a probe file (object) is written and deleted."""
  if not is_remote(p):
    try:
      makedirs(p)
      with tempfile.TemporaryFile(dir=os.path.expanduser(os.fspath(p))):
        pass
    except OSError as e:
      raise StorageError(f'{os.fspath(p)}: cannot write there ({e.strerror or e})') from e
    return
  fs, key = _fs(p)
  bucket = key.split('/', 1)[0]
  # Every host of a pod probes the same folder, and pids repeat across hosts: name both.
  probe = f'{key.rstrip("/")}/.idm_jax_write_check_{socket.gethostname()}_{os.getpid()}'
  try:
    fs.pipe_file(probe, b'')
    try:
      fs.rm_file(probe)
    except FileNotFoundError:  # a retried delete whose first try landed (the reply was lost)
      pass
  except FileNotFoundError as e:
    raise StorageError(
      f'{os.fspath(p)}: the bucket gs://{bucket} does not exist (or is not '
      f'visible with these credentials)'
    ) from e
  except Exception as e:  # pylint: disable=broad-except  (auth, HTTP and network errors vary)
    reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    raise StorageError(
      f'{os.fspath(p)}: cannot write there ({type(e).__name__}: {reason}); '
      'check the bucket name, the credentials (gcloud auth '
      'application-default login) and the permissions'
    ) from e


def _fs(p: PathLike):
  """(fsspec filesystem, path within it) of a remote path."""
  import fsspec  # noqa: PLC0415 (remote paths only)

  return fsspec.core.url_to_fs(os.fspath(p))


def _configure_remote() -> None:
  """Turns off gcsfs's listing cache before its first filesystem is made: hosts and orbax's
  tensorstore write the bucket behind its back, and a cached listing would miss checkpoints (or
  list a moved one). Runs when this module is imported, because etils.epath keeps the first
  filesystem it makes for the life of the process, and orbax may make it before we touch gs://."""
  try:
    import fsspec  # noqa: PLC0415 (remote paths only)
  except ImportError:  # no remote paths without it anyway
    return
  for protocol in ('gs', 'gcs'):
    fsspec.config.conf.setdefault(protocol, {}).setdefault('use_listings_cache', False)


_configure_remote()


def _umask() -> int:
  """The process umask, read without changing it where possible (os.umask is process-wide, and
  setting it even briefly races with files other threads create)."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('Umask:'):
          return int(line.split()[1], 8)
  except OSError:
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def is_within(p: PathLike, folder: PathLike) -> bool:
  """Whether `p` is `folder` or lies below it, so a CLI can refuse to write into its input.

  Locally through symlinks (both resolved); in a bucket by name, where a "folder" is only a
  prefix. A local path is never within a remote one, nor the reverse.
  """
  p, folder = os.fspath(p), os.fspath(folder)
  if is_remote(p) or is_remote(folder):
    if not (is_remote(p) and is_remote(folder)):
      return False
    p, folder = absolute(p), absolute(folder)
    return p == folder or p.startswith(folder + '/')
  p = os.path.realpath(os.path.expanduser(p))
  folder = os.path.realpath(os.path.expanduser(folder))
  return p == folder or p.startswith(folder.rstrip(os.sep) + os.sep)


# ---------------------------------------------------------------------------------------------
# Many files at once. A bucket answers each request in tens of milliseconds however small the
# object, so a dataset read or written one file after another is bound by round trips, not
# bytes. These keep `concurrency` requests in flight (threads: gcsfs's calls wait on its one
# event loop, and local reads release the GIL) and try each file again after a transient failure.
# Results come back in the order asked; a file that still fails is an exception in its place, so
# one unreadable image is the caller's to report, not the end of a 70,000-image job.

IO_CONCURRENCY = 16
IO_ATTEMPTS = 3
IO_BACKOFF_S = 0.5  # the first retry's wait; doubled for each one after it

# Local errors a retry can outlive: a network file system (a gcsfuse mount, NFS) reports a
# dropped request as one of these. errno.ENOENT, EACCES, EISDIR, ... are the file's own.
_TRANSIENT_ERRNOS = frozenset(
  getattr(errno, n)
  for n in ('EIO', 'EAGAIN', 'EBUSY', 'ETIMEDOUT', 'ECONNRESET', 'ECONNABORTED', 'ESTALE', 'EINTR')
  if hasattr(errno, n)
)


def is_transient(e: BaseException) -> bool:
  """Whether a failed storage call may succeed if made again: throttling, a server error, a
  dropped connection, a timeout; not a missing file, a refused permission or a bad request."""
  if isinstance(
    e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
  ):
    return False
  if isinstance(e, (TimeoutError, ConnectionError)):
    return True
  if type(e).__module__.split('.')[0] in ('gcsfs', 'aiohttp', 'requests', 'google'):
    from gcsfs import retry  # noqa: PLC0415 (optional: the [gcs] extra; only gcsfs raises these)

    return retry.is_retriable(e)
  return isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS


def call_with_retries(fn, *args, attempts: int | None = None, backoff_s: float | None = None):
  """fn(*args), made again (after backoff_s, 2 * backoff_s, ...) while it fails transiently, at
  most `attempts` times in all (default IO_ATTEMPTS, IO_BACKOFF_S); the last error is raised.
  (gcsfs also retries each HTTP request itself; this covers what outlives that, and local
  network file systems.)"""
  attempts = IO_ATTEMPTS if attempts is None else int(attempts)
  backoff_s = IO_BACKOFF_S if backoff_s is None else float(backoff_s)
  for attempt in range(attempts):
    try:
      return fn(*args)
    except Exception as e:  # pylint: disable=broad-except  (is_transient sorts them)
      if attempt == attempts - 1 or not is_transient(e):
        raise
    time.sleep(backoff_s * 2**attempt * (1 + 0.25 * random.random()))  # jitter: no stampede


def map_many(fn, items, *, concurrency: int = IO_CONCURRENCY) -> Iterator[tuple[int, object]]:
  """(k, fn(items[k]) or the Exception it raised) for every item, as each finishes, with at most
  `concurrency` calls running. Leaving the loop early (or an interrupt) cancels the calls not
  yet started and waits for the running ones."""
  items = list(items)
  if not items:
    return
  pool = concurrent.futures.ThreadPoolExecutor(
    max(1, min(int(concurrency), len(items))), thread_name_prefix='files'
  )
  try:
    futures = {pool.submit(fn, x): k for k, x in enumerate(items)}
    for future in concurrent.futures.as_completed(futures):
      try:
        result = future.result()
      except Exception as e:  # pylint: disable=broad-except  (returned in its item's place)
        result = e
      yield futures[future], result
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


def _in_order(fn, items, concurrency: int) -> list:
  items = list(items)
  out = [None] * len(items)
  for k, result in map_many(fn, items, concurrency=concurrency):
    out[k] = result
  return out


def read_whole(p: PathLike) -> bytes:
  """A file's bytes in one request where it is an object (read_bytes, through epath, makes three:
  the object's metadata, a listing, then the bytes)."""
  if is_remote(p):
    fs, key = _fs(p)
    return fs.cat_file(key)
  return read_bytes(p)


def read_many(
  paths, *, concurrency: int = IO_CONCURRENCY, attempts: int | None = None
) -> list[bytes | Exception]:
  """Every file's bytes (local or remote), in order; a file that cannot be read, after the
  retries, is the exception in its place."""
  return _in_order(
    lambda p: call_with_retries(read_whole, p, attempts=attempts), paths, concurrency
  )


def write_many(
  items, *, concurrency: int = IO_CONCURRENCY, attempts: int | None = None
) -> list[Exception | None]:
  """Writes each (path, bytes) with write_atomic; None in the order given where it worked, the
  exception where it failed after the retries (a retried upload replaces the whole object)."""
  return _in_order(
    lambda pd: call_with_retries(write_atomic, pd[0], pd[1], attempts=attempts), items, concurrency
  )


def copy_many(
  pairs, *, concurrency: int = IO_CONCURRENCY, attempts: int | None = None
) -> list[Exception | None]:
  """Copies each (src, dst); None in the order given where it worked, else the exception. Within
  one object store the copy happens on the server (no bytes pass through this host); otherwise
  the bytes are read and written atomically."""
  return _in_order(
    lambda sd: call_with_retries(copy_one, sd[0], sd[1], attempts=attempts), pairs, concurrency
  )


def same_store(src: PathLike, dst: PathLike) -> bool:
  """Whether both paths lie in one object store (gs:// and gs://), where a copy is the
  server's work."""
  return (
    is_remote(src)
    and is_remote(dst)
    and os.fspath(src).split('://', 1)[0] == os.fspath(dst).split('://', 1)[0]
  )


def copy_one(src: PathLike, dst: PathLike) -> None:
  """One file's copy (see copy_many): server-side within a store, else read + atomic write."""
  if same_store(src, dst):
    fs, src_key = _fs(src)
    _, dst_key = _fs(dst)
    fs.cp_file(src_key, dst_key)  # GCS: objects.rewrite; the new object appears whole
    return
  write_atomic(dst, read_whole(src))
