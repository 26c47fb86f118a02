"""The cleaned-dataset format: what cleaning writes, how a killed run resumes, how it is checked.

  OUT/images/<name>    one file per source record (cleaned ones as PNG, copies byte for byte)
  OUT/scores.json      the selection score per record, so the selection can be inspected
  OUT/journal-<p>.jsonl  one line per finished record (process p): a killed run resumes from it
                       (in a bucket, where nothing appends: journal-<p>-<k>.jsonl, one object per
                       flush of a few dozen lines)
  OUT/manifest.json    written last, after verification: its presence marks a complete dataset
OUT may be a local folder or a gs:// prefix (files.py). The cleaning itself (which records, with
which model) is extrinsic.py's; this module knows only the files.
"""
from __future__ import annotations

import hashlib
import json
import os
import time

from idm_jax import files
from idm_jax.data import sources

FORMAT = 'idm_jax/cleaned-dataset/1'
MANIFEST = 'manifest.json'
SCORES = 'scores.json'
IMAGES = 'images'


def sha256_file(path: str) -> str:
  return hashlib.sha256(files.read_bytes(path)).hexdigest()


def out_name(name: str, cleaned: bool) -> str:
  return os.path.splitext(name)[0] + '.png' if cleaned else name


def read_journals(out_dir: str) -> dict[str, dict]:
  done = {}
  for fname in files.listdir(out_dir):
    if fname.startswith('journal-') and fname.endswith('.jsonl'):
      for line in files.iter_lines(files.join(out_dir, fname)):
        line = line.strip()
        if not line:
          continue
        try:
          entry = json.loads(line)
        except json.JSONDecodeError:   # a line cut by a kill: that record is redone
          continue
        done[entry['name']] = entry
  return done


class Journal:
  """Process p's record of finished records. Locally one file, appended and fsynced per entry
  (a kill loses at most the line being written, which the reader skips and the next line
  starts afresh after). In a bucket a new object per flush, every REMOTE_BATCH entries or
  REMOTE_SECONDS, and at each cleaned batch's end: a kill loses at most that many, redone."""

  REMOTE_BATCH = 64
  REMOTE_SECONDS = 30.0

  def __init__(self, out_dir: str, process_index: int):
    self.out_dir = out_dir
    self.pi = process_index
    self.remote = files.is_remote(out_dir)
    self.pending: list[str] = []
    self.last = time.monotonic()
    if self.remote:
      prefix = f'journal-{process_index}-'
      self.seq = 1 + max([int(n[len(prefix):-len('.jsonl')]) for n in files.listdir(out_dir)
                          if n.startswith(prefix) and n.endswith('.jsonl')], default=-1)
    else:
      self.path = files.join(out_dir, f'journal-{process_index}.jsonl')
      if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
        with open(self.path, 'rb') as f:
          f.seek(-1, os.SEEK_END)
          if f.read(1) != b'\n':   # a line cut by a kill: end it so the next entry stands alone
            self.pending.append('')

  def add(self, entry: dict) -> None:
    self.pending.append(json.dumps(entry))
    if not self.remote or len(self.pending) >= self.REMOTE_BATCH or \
        time.monotonic() - self.last >= self.REMOTE_SECONDS:
      self.flush()

  def flush(self) -> None:
    if not self.pending:
      return
    text = '\n'.join(self.pending) + '\n'
    if self.remote:
      files.write_atomic(files.join(self.out_dir, f'journal-{self.pi}-{self.seq:06d}.jsonl'),
                         text.encode())
      self.seq += 1
    else:
      files.append_text(self.path, text)
    self.pending = []
    self.last = time.monotonic()


def copy_record(source, i: int, name: str, out_dir: str) -> dict:
  """Copies a record unchanged: the original file bytes when the source is a folder."""
  if isinstance(source, sources.FolderSource):
    data = files.read_bytes(source.paths[i])
    rel = name
  else:
    rec = source[i]
    if rec.get('image') is None:
      return dict(name=name, action='failed', reason=rec.get('error', ''))
    data = files.encode_image(rec['image'])
    rel = out_name(name, cleaned=True)
  files.write_atomic(files.join(out_dir, IMAGES, rel), data)
  return dict(name=name, file=rel, action='copied', sha256=hashlib.sha256(data).hexdigest())


def verify_records(out_dir: str, records: list[dict], on_disk: set[str]) -> None:
  """Every record's file is there; locally its checksum is read back too. In a bucket an
  upload is whole or absent, so presence (one listing) is the check, not a download of all."""
  outputs = [r['file'] for r in records if r['action'] != 'failed']
  if len(set(outputs)) != len(outputs):
    raise RuntimeError(f'{out_dir}: two records map to the same output file')
  local = not files.is_remote(out_dir)
  for r in records:
    if r['action'] == 'failed':
      continue
    path = files.join(out_dir, IMAGES, r['file'])
    if r['file'] not in on_disk or (local and sha256_file(path) != r['sha256']):
      raise RuntimeError(f'{path}: missing or its checksum does not match the journal')


def files_written(out_dir: str) -> set[str]:
  images_dir = files.join(out_dir, IMAGES)
  return set(files.walk_files(images_dir)) if files.isdir(images_dir) else set()


def verify_manifest(out_dir: str) -> dict:
  """Checks a finished dataset: one record per source record, every checksum; returns counts."""
  manifest = json.loads(files.read_text(files.join(out_dir, MANIFEST)))
  records = manifest['records']
  if len(records) != manifest['source_records'] or \
     len({r['name'] for r in records}) != len(records):
    raise RuntimeError(f'{out_dir}: the manifest does not hold exactly one entry per record')
  on_disk = files_written(out_dir)
  verify_records(out_dir, records, on_disk)
  listed = {r['file'] for r in records if r['action'] != 'failed'}
  if on_disk != listed:
    raise RuntimeError(f'{out_dir}: files on disk differ from the manifest: '
                       f'{sorted(on_disk ^ listed)[:5]}')
  return manifest['counts']


def write_manifest(out_dir: str, manifest: dict) -> None:
  """Verifies every record's file, then writes the manifest that marks the dataset complete."""
  verify_records(out_dir, manifest['records'], files_written(out_dir))
  files.write_atomic(files.join(out_dir, MANIFEST), json.dumps(manifest, indent=1).encode())


def read_manifest(out_dir: str) -> dict | None:
  """The finished dataset's manifest, or None while it is unfinished."""
  path = files.join(out_dir, MANIFEST)
  return json.loads(files.read_text(path)) if files.exists(path) else None
