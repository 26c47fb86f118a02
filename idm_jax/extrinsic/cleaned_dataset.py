"""The cleaned-dataset format: what cleaning writes, how a killed run resumes, how it is checked.

  OUT/images/<name>    one file per source record (cleaned ones as PNG, copies byte for byte)
  OUT/scores.json      the selection score per record, so the selection can be inspected;
                       written last of the scoring, so its presence means scoring is done
  OUT/source_sha256.json  the checksum of every source file the scoring read (folder sources):
                       the copies of unchanged records, made by the bucket itself, take theirs
                       from it (the source must not change while it is being cleaned)
  OUT/journal-<p>.jsonl  one line per finished record (process p): a killed run resumes from it
                       (in a bucket, where nothing appends: journal-<p>-<k>.jsonl, one object per
                       flush of a few dozen lines)
  OUT/manifest.json    written last, after verification: its presence marks a complete dataset
OUT may be a local folder or a gs:// prefix (files.py). The cleaning itself (which records, with
which model) is extrinsic.py's; this module knows only the files. Files move many at a time
(files.map_many): in a bucket each request costs a round trip whatever its size.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time

from idm_jax.data import sources
from idm_jax.storage import files
from idm_jax.storage import images

FORMAT = 'idm_jax/cleaned-dataset/1'
MANIFEST = 'manifest.json'
SCORES = 'scores.json'
SOURCE_SHA256 = 'source_sha256.json'
IMAGES = 'images'


def sha256_file(path: str) -> str:
  return hashlib.sha256(files.read_bytes(path)).hexdigest()


def out_name(name: str, cleaned: bool) -> str:
  return os.path.splitext(name)[0] + '.png' if cleaned else name


def read_journals(out_dir: str, concurrency: int = files.IO_CONCURRENCY) -> dict[str, dict]:
  """Every journalled record by name (the later entry wins). In a bucket a journal is many
  objects, read concurrently."""
  paths = [
    files.join(out_dir, n)
    for n in files.listdir(out_dir)
    if n.startswith('journal-') and n.endswith('.jsonl')
  ]
  done = {}
  for path, data in zip(paths, files.read_many(paths, concurrency=concurrency)):
    if isinstance(data, Exception):
      raise data
    for line in data.decode('utf-8', errors='replace').splitlines():  # a cut character too
      line = line.strip()
      if not line:
        continue
      try:
        entry = json.loads(line)
      except json.JSONDecodeError:  # a line cut by a kill: that record is redone
        continue
      done[entry['name']] = entry
  return done


class Journal:
  """Process p's record of finished records. Locally one file, appended and fsynced per entry
  (a kill loses at most the line being written, which the reader skips and the next line
  starts afresh after). In a bucket a new object per flush, every REMOTE_BATCH entries or
  REMOTE_SECONDS, and at the end: a kill loses at most that many, redone. Safe to add to from
  several threads (cleaning journals its writes from the thread that waits for them)."""

  REMOTE_BATCH = 64
  REMOTE_SECONDS = 30.0

  def __init__(self, out_dir: str, process_index: int):
    self.out_dir = out_dir
    self.pi = process_index
    self.remote = files.is_remote(out_dir)
    self.pending: list[str] = []
    self.last = time.monotonic()
    self.lock = threading.RLock()
    if self.remote:
      prefix = f'journal-{process_index}-'
      self.seq = 1 + max(
        [
          int(n[len(prefix) : -len('.jsonl')])
          for n in files.listdir(out_dir)
          if n.startswith(prefix) and n.endswith('.jsonl')
        ],
        default=-1,
      )
    else:
      self.path = files.join(out_dir, f'journal-{process_index}.jsonl')
      self.appender = files.AppendedText(self.path)
      if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
        with open(self.path, 'rb') as f:
          f.seek(-1, os.SEEK_END)
          if f.read(1) != b'\n':  # a line cut by a kill: end it so the next entry stands alone
            self.pending.append('')

  def add(self, entry: dict) -> None:
    self.add_all([entry])

  def add_all(self, entries: list[dict]) -> None:
    """Several entries in one local append (one fsync: a batch's, not each file's)."""
    with self.lock:
      self.pending += [json.dumps(e) for e in entries]
      if (
        not self.remote
        or len(self.pending) >= self.REMOTE_BATCH
        or time.monotonic() - self.last >= self.REMOTE_SECONDS
      ):
        self.flush()

  def flush(self) -> None:
    with self.lock:
      if not self.pending:
        return
      text = '\n'.join(self.pending) + '\n'
      if self.remote:
        files.call_with_retries(
          files.write_atomic,
          files.join(self.out_dir, f'journal-{self.pi}-{self.seq:06d}.jsonl'),
          text.encode(),
        )
        self.seq += 1
      else:
        self.appender.append(text)
      self.pending = []
      self.last = time.monotonic()


def copy_records(
  source,
  indices,
  names,
  out_dir: str,
  *,
  checksums: dict[str, str],
  concurrency: int = files.IO_CONCURRENCY,
):
  """Copies the records `indices` unchanged, `concurrency` at a time; yields each one's journal
  entry as it is written. A folder's files keep their bytes: within one bucket the bucket copies
  them (the checksum from `checksums`, by name, as the scoring read them), otherwise they are
  read and written. A file that cannot be read (after retries) is a 'failed' entry naming it; a
  write that fails stops the copying (after the entries of those written), to be resumed."""
  load = threading.Lock()  # a non-folder source (TFDS, built-in) is read one record at a time
  indices = list(indices)
  errors = []
  for k, result in files.map_many(
    lambda i: _copy_record(source, i, names[i], out_dir, checksums.get(names[i]), load),
    indices,
    concurrency=concurrency,
  ):
    if isinstance(result, Exception):
      errors.append((names[indices[k]], result))
    else:
      yield result
  if errors:
    name, e = errors[0]
    raise RuntimeError(
      f'{out_dir}: {len(errors)} copies could not be written, the first {name!r}:'
      f' {type(e).__name__}: {e}'
    ) from e


def _copy_record(
  source, i: int, name: str, out_dir: str, checksum: str | None, load: threading.Lock
) -> dict:
  """One record's copy (copy_records)."""
  if isinstance(source, sources.FolderSource):
    src, dst = source.paths[i], files.join(out_dir, IMAGES, name)
    if checksum and files.same_store(src, dst):
      try:
        files.call_with_retries(files.copy_one, src, dst)
        return dict(name=name, file=name, action='copied', sha256=checksum)
      except Exception:  # pylint: disable=broad-except  (read and write apart below say which)
        pass
    try:
      data = files.call_with_retries(files.read_whole, src)
    except Exception as e:  # pylint: disable=broad-except  (journalled, named)
      return dict(name=name, action='failed', reason=read_failure(src, e))
    rel = name
  else:
    with load:
      rec = source[i]
    if rec.get('image') is None:
      return dict(name=name, action='failed', reason=rec.get('error', ''))
    data = images.encode(rec['image'])
    rel = out_name(name, cleaned=True)
  files.call_with_retries(files.write_atomic, files.join(out_dir, IMAGES, rel), data)
  return dict(name=name, file=rel, action='copied', sha256=hashlib.sha256(data).hexdigest())


def read_failure(path: str, e: BaseException) -> str:
  """A journal's reason for a source file that could not be read: the file, then the error."""
  detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else ''
  return f'{path}: cannot read ({type(e).__name__}{": " + detail if detail else ""})'


def verify_records(out_dir: str, records: list[dict], on_disk: set[str]) -> None:
  """Every record's file is there; locally its checksum is read back too. In a bucket an
  upload is whole or absent, so presence (one listing) is the check, not a download of all."""
  outputs = [r['file'] for r in records if r['action'] != 'failed']
  if len(set(outputs)) != len(outputs):
    raise RuntimeError(f'{out_dir}: two records map to the same output file')
  read_back = files.writes_can_be_partial(out_dir)
  for r in records:
    if r['action'] == 'failed':
      continue
    path = files.join(out_dir, IMAGES, r['file'])
    if r['file'] not in on_disk or (read_back and sha256_file(path) != r['sha256']):
      raise RuntimeError(f'{path}: missing or its checksum does not match the journal')


def remove_partial_writes(out_dir: str) -> None:
  """Deletes what a kill left of the images' atomic writes (never a record: sources skip hidden
  files). Call it only when no process is writing."""
  files.remove_partial_writes(files.join(out_dir, IMAGES))


def files_written(out_dir: str) -> set[str]:
  images_dir = files.join(out_dir, IMAGES)
  return set(files.walk_files(images_dir)) if files.isdir(images_dir) else set()


def verify_manifest(out_dir: str) -> dict:
  """Checks a finished dataset: one record per source record, every checksum; returns counts."""
  manifest = json.loads(files.read_text(files.join(out_dir, MANIFEST)))
  records = manifest['records']
  if len(records) != manifest['source_records'] or len({r['name'] for r in records}) != len(
    records
  ):
    raise RuntimeError(f'{out_dir}: the manifest does not hold exactly one entry per record')
  on_disk = files_written(out_dir)
  verify_records(out_dir, records, on_disk)
  listed = {r['file'] for r in records if r['action'] != 'failed'}
  if on_disk != listed:
    raise RuntimeError(
      f'{out_dir}: files on disk differ from the manifest: {sorted(on_disk ^ listed)[:5]}'
    )
  return manifest['counts']


def write_manifest(out_dir: str, manifest: dict) -> None:
  """Verifies every record's file, then writes the manifest that marks the dataset complete."""
  verify_records(out_dir, manifest['records'], files_written(out_dir))
  files.write_atomic(files.join(out_dir, MANIFEST), json.dumps(manifest, indent=1).encode())


def read_manifest(out_dir: str) -> dict | None:
  """The finished dataset's manifest, or None while it is unfinished."""
  path = files.join(out_dir, MANIFEST)
  return json.loads(files.read_text(path)) if files.exists(path) else None
