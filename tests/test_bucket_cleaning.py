"""Cleaning a dataset at bucket speed: many files at a time (files.read_many, write_many,
copy_many, map_many), retried when a failure is transient; and cleaning built on them, which must
write what the one-file-after-another cleaning wrote, resume after a kill, ride out a transient
503, journal a file that stays unreadable, and take time by round trips in flight rather than
by requests made (the latency tests, through tests/gcs_faults.py's proxy)."""

import errno
import hashlib
import json
import threading
import time

import ml_collections
import numpy as np
import pytest

from idm_jax.data import sources
from idm_jax.extrinsic import cleaned_dataset
from idm_jax.extrinsic import cleaning
from idm_jax.runtime import host_shares
from idm_jax.storage import files
from idm_jax.storage import images


@pytest.fixture
def no_backoff(monkeypatch):
  monkeypatch.setattr(files, 'IO_BACKOFF_S', 0.0)


def flaky(monkeypatch, fails: dict[str, int], error=None):
  """files.read_bytes raising `error` (EIO) for the first fails[name] reads of files whose path
  ends with name (-1: every read); returns the count of reads of each such file."""
  real = files.read_bytes
  calls = {name: 0 for name in fails}

  def read(p):
    for name, n in fails.items():
      if str(p).endswith(name):
        calls[name] += 1
        if n < 0 or calls[name] <= n:
          raise error or OSError(errno.EIO, 'Input/output error', str(p))
    return real(p)

  monkeypatch.setattr(files, 'read_bytes', read)
  return calls


# --- Batch I/O.


def test_many_files_written_read_and_copied_in_order(local_or_bucket):
  root = files.join(local_or_bucket, 'many')
  # (Not bytes([k]): the emulator drops an upload's last byte when it is b'\r'; a PNG ends in
  # its IEND chunk's fixed CRC, ...6082, and a journal in b'\n'.)
  items = [(files.join(root, 'a', f'{k:03d}.bin'), b'%d;' % k * (k + 1)) for k in range(40)]
  assert files.write_many(items, concurrency=8) == [None] * 40
  got = files.read_many([p for p, _ in items] + [files.join(root, 'missing.bin')], concurrency=8)
  assert got[:40] == [d for _, d in items]  # in the order asked, whatever order they finished
  assert isinstance(got[40], FileNotFoundError)  # in its place, the others unharmed
  pairs = [(p, files.join(root, 'b', f'{k:03d}.bin')) for k, (p, _) in enumerate(items)]
  missing = (files.join(root, 'missing.bin'), files.join(root, 'b', 'never.bin'))
  out = files.copy_many(pairs + [missing], concurrency=8)
  assert out[:40] == [None] * 40 and isinstance(out[40], FileNotFoundError)
  assert files.read_many([d for _, d in pairs]) == [d for _, d in items]
  assert files.walk_files(files.join(root, 'b')) == [f'{k:03d}.bin' for k in range(40)]


def test_a_copy_within_a_bucket_is_the_servers(gcs_faults, gcs_bucket):
  """No byte of the object passes through this host: one rewrite request, no download or
  upload of it."""
  src, dst = f'{gcs_bucket}/src/face.png', f'{gcs_bucket}/dst/face.png'
  files.write_atomic(src, b'x' * 10000)
  before = len(gcs_faults.proxy.log)
  assert files.copy_many([(src, dst)]) == [None]
  requests = gcs_faults.proxy.log[before:]
  assert [m for m, target, _ in requests if 'rewriteTo' in target] == ['POST']
  assert not [t for _, t, _ in requests if 'alt=media' in t or 'uploadType' in t], requests
  assert files.read_bytes(dst) == b'x' * 10000


def test_map_many_keeps_at_most_concurrency_calls_running():
  running, peak, lock = [0], [0], threading.Lock()

  def work(k):
    with lock:
      running[0] += 1
      peak[0] = max(peak[0], running[0])
    time.sleep(0.02)
    with lock:
      running[0] -= 1
    if k == 7:
      raise ValueError('seven')
    return k * k

  results = dict(files.map_many(work, range(30), concurrency=5))
  assert peak[0] == 5
  assert isinstance(results.pop(7), ValueError)
  assert results == {k: k * k for k in range(30) if k != 7}


def test_transient_errors_are_retried_and_permanent_ones_are_not(tmp_path, monkeypatch, no_backoff):
  for k in range(3):
    (tmp_path / f'{k}.bin').write_bytes(b'%d' % k)
  calls = flaky(monkeypatch, {'0.bin': 2, '1.bin': -1})
  got = files.read_many([str(tmp_path / f'{k}.bin') for k in range(3)])
  assert got[0] == b'0' and got[2] == b'2'
  assert isinstance(got[1], OSError) and got[1].errno == errno.EIO
  assert calls == {'0.bin': 3, '1.bin': files.IO_ATTEMPTS}
  calls = flaky(monkeypatch, {'2.bin': -1}, PermissionError(errno.EACCES, 'denied'))
  assert isinstance(files.read_many([str(tmp_path / '2.bin')])[0], PermissionError)
  assert calls == {'2.bin': 1}  # a refusal is the file's, not the network's: asked once


def test_which_errors_are_transient():
  from gcsfs.retry import HttpError
  import requests

  assert files.is_transient(HttpError({'code': 503, 'message': 'busy'}))
  assert files.is_transient(HttpError({'code': 429, 'message': 'slow down'}))
  assert files.is_transient(requests.exceptions.ProxyError())  # gcsfs's 502
  assert files.is_transient(ConnectionResetError()) and files.is_transient(TimeoutError())
  assert files.is_transient(OSError(errno.EIO, 'Input/output error'))
  assert not files.is_transient(HttpError({'code': 400, 'message': 'bad'}))
  assert not files.is_transient(FileNotFoundError('gs://b/x'))
  assert not files.is_transient(OSError('Forbidden: gs://b/x'))  # gcsfs's 403
  assert not files.is_transient(ValueError('not storage'))


# --- Cleaning.


class ShiftRestorer:
  """A restorer whose output depends on each image, its noise index and the seed, so a mix-up
  of records, indices or batches shows in the bytes; counts its calls."""

  lockstep = False
  resolution = 32

  def __init__(self, fail_after=None, sleep_s=0.0):
    self.calls = 0
    self.fail_after = fail_after
    self.sleep_s = sleep_s

  def restore(self, lq, *, indices, seed, **settings):
    if self.fail_after is not None and self.calls >= self.fail_after:
      raise KeyboardInterrupt('killed')
    self.calls += 1
    time.sleep(self.sleep_s)
    shift = (3 * np.asarray(indices) + seed) % 50
    return ((lq.astype(np.int64) + shift[:, None, None, None]) % 256).astype(np.uint8)


def config(fraction=0.5, batch_size=3, score='niqe'):
  return ml_collections.ConfigDict(
    dict(
      sampler='ddim',
      steps=2,
      t_start=0.5,
      samples=1,
      fraction=fraction,
      score=score,
      batch_size=batch_size,
      out_dir='',
    )
  )


def make_faces(folder, count=14, size=32, corrupt=(5,)):
  """`count` faces (built-in crops, a few with noise so NIQE ranks them apart), PNG, in
  `folder` (local or gs://), and a corrupt file at each index in `corrupt`."""
  rng = np.random.default_rng(0)
  crops = sources.BuiltinSource('train', size)
  items = []
  for k in range(count):
    img = crops[k]['image'].astype(np.int64)
    if k % 3 == 0:
      img = img + rng.normal(0, 25, img.shape)
    data = b'not a png' if k in corrupt else images.encode(np.clip(img, 0, 255))
    items.append((files.join(folder, f'{k:02d}.png'), data))
  assert files.write_many(items) == [None] * count
  return sources.FolderSource(tuple(images.list_images(folder)), size, root=files.absolute(folder))


def sequential_clean(source, restorer, cfg, resolution, params):
  """The cleaning as it was written before it went many files at a time (commit 3d3e006), minus
  the journal: every record scored, read, restored or copied and written one after another.
  Returns (manifest records by name, {file: bytes})."""
  names = [source.name(i) for i in range(len(source))]
  scores = cleaning.niqe_scores(source, params, resolution) if cfg.fraction < 1 else {}
  selected = cleaning.select_worst(scores, cfg.fraction) if cfg.fraction < 1 else set(names)
  records, out = {}, {}
  for i, name in enumerate(names):
    if name not in selected:
      data = files.read_bytes(source.paths[i])
      out[name] = data
      records[name] = dict(
        name=name, file=name, action='copied', sha256=hashlib.sha256(data).hexdigest()
      )
  to_clean = np.array([i for i in range(len(names)) if names[i] in selected], np.int64)
  for (idx,) in host_shares.lockstep_chunks(cfg.batch_size, False, to_clean):
    recs = [source[i] for i in idx]
    good = [(i, r) for i, r in zip(idx, recs) if r.get('image') is not None]
    for i, r in zip(idx, recs):
      if r.get('image') is None:
        records[names[i]] = dict(name=names[i], action='failed', reason=r['error'])
    lq = np.stack([r['image'] for _, r in good])
    restored = restorer.restore(lq, indices=np.array([i for i, _ in good]), seed=0)
    for (i, _), img in zip(good, restored):
      rel = cleaned_dataset.out_name(names[i], cleaned=True)
      data = images.encode(img)
      out[rel] = data
      records[names[i]] = dict(
        name=names[i], file=rel, action='cleaned', sha256=hashlib.sha256(data).hexdigest()
      )
      if cfg.fraction < 1:  # NIQE chose it: did cleaning lower its score?
        records[names[i]]['score_after'] = cleaning.niqe_of(img, params, resolution)
  for name, r in records.items():
    r['score'] = scores.get(name)
  return records, out


def written(out_dir):
  root = files.join(out_dir, cleaned_dataset.IMAGES)
  rels = files.walk_files(root)
  return dict(zip(rels, files.read_many([files.join(root, r) for r in rels])))


def assert_same_as_sequential(out_dir, manifest, reference):
  records, out = reference
  assert {r['name']: r for r in manifest['records']} == records
  assert written(out_dir) == out
  assert cleaned_dataset.verify_manifest(out_dir) == manifest['counts']


@pytest.fixture(scope='module')
def niqe_params():
  from idm_jax.metrics import niqe

  return niqe.load_niqe_params(niqe.default_params_path())


def test_cleaning_writes_what_the_sequential_cleaning_wrote(local_or_bucket, niqe_params):
  """Scores, selection, cleaned bytes, copies and checksums: the same, locally and in a bucket
  (where the copies are the bucket's own)."""
  source = make_faces(files.join(local_or_bucket, 'faces'))
  cfg = config()
  reference = sequential_clean(source, ShiftRestorer(), cfg, 32, niqe_params)
  out = files.join(local_or_bucket, 'clean')
  manifest = cleaning.clean_dataset(
    source,
    ShiftRestorer(),
    out,
    clean_cfg=cfg,
    seed=0,
    niqe_params=None,
    resolution=32,
    provenance={},
  )
  # 13 faces scored (the corrupt file is not, so it is copied as it is): the worst 6 cleaned.
  assert manifest['counts'] == {'cleaned': 6, 'copied': 8, 'failed': 0}
  assert_same_as_sequential(out, manifest, reference)
  sums = json.loads(files.read_text(files.join(out, cleaned_dataset.SOURCE_SHA256)))
  assert len(sums) == 14 and sums['05.png'] == hashlib.sha256(b'not a png').hexdigest()


def test_a_non_folder_source_is_scored_and_copied_as_lossless_pngs(tmp_path):
  """A built-in (or TFDS) source has no files to copy: its unchanged records are its decoded
  images written as PNG, read one record at a time however many copies are in flight."""
  source = sources.BuiltinSource('validation', 32)
  out = str(tmp_path / 'clean')
  manifest = cleaning.clean_dataset(
    source,
    ShiftRestorer(),
    out,
    clean_cfg=config(fraction=0.5, score='artifacts'),
    seed=0,
    niqe_params=None,
    resolution=32,
    provenance={},
  )
  assert manifest['counts'] == {'cleaned': 4, 'copied': 4, 'failed': 0}
  assert not files.exists(files.join(out, cleaned_dataset.SOURCE_SHA256))  # no source files
  on_disk = written(out)
  for i in range(len(source)):
    rec = source[i]
    entry = next(r for r in manifest['records'] if r['name'] == rec['name'])
    img = rec['image']
    if entry['action'] == 'cleaned':
      img = ShiftRestorer().restore(img[None], indices=np.array([i]), seed=0)[0]
    assert on_disk[entry['file']] == images.encode(img), rec['name']


def test_a_killed_cleaning_resumes_without_redoing_work(local_or_bucket, niqe_params, monkeypatch):
  """Killed among the copies, then among the restorations: each resume redoes nothing that was
  journalled, and the end is the same dataset as an uninterrupted cleaning's."""
  source = make_faces(files.join(local_or_bucket, 'faces'))
  cfg = config()
  reference = sequential_clean(source, ShiftRestorer(), cfg, 32, niqe_params)
  out = files.join(local_or_bucket, 'clean')
  kw = dict(clean_cfg=cfg, seed=0, niqe_params=None, resolution=32, provenance={})

  real_copy = cleaned_dataset._copy_record
  copies = []

  def copy_then_die(*args):
    if len(copies) == 3:
      raise KeyboardInterrupt('killed')
    copies.append(args[2])
    return real_copy(*args)

  monkeypatch.setattr(cleaned_dataset, '_copy_record', copy_then_die)
  with pytest.raises(KeyboardInterrupt):
    cleaning.clean_dataset(source, ShiftRestorer(), out, **kw, concurrency=1)
  monkeypatch.setattr(cleaned_dataset, '_copy_record', real_copy)
  journalled = cleaned_dataset.read_journals(out)
  assert sorted(journalled) == sorted(copies)  # what was copied, and only that
  restorer = ShiftRestorer(fail_after=1)
  with pytest.raises(KeyboardInterrupt):
    cleaning.clean_dataset(source, restorer, out, **kw)
  assert not files.exists(files.join(out, cleaned_dataset.MANIFEST))
  # Copies all done, one batch of three restored and written before the kill.
  counts = {}
  for r in cleaned_dataset.read_journals(out).values():
    counts[r['action']] = counts.get(r['action'], 0) + 1
  assert counts == {'copied': 8, 'cleaned': 3}
  restorer = ShiftRestorer()
  manifest = cleaning.clean_dataset(source, restorer, out, **kw)
  assert restorer.calls == 1  # 6 to clean, in batches of 3, one batch done before the kill
  assert_same_as_sequential(out, manifest, reference)
  assert manifest == cleaning.clean_dataset(source, ShiftRestorer(fail_after=0), out, **kw)


def test_a_file_that_stays_unreadable_is_journalled_by_name(tmp_path, monkeypatch, no_backoff):
  """An EIO on every read of one file: tried IO_ATTEMPTS times, then that record is 'failed'
  with its path and the error; an EIO on the first two reads of another is ridden out."""
  source = make_faces(str(tmp_path / 'faces'), corrupt=())
  calls = flaky(monkeypatch, {'faces/04.png': -1, 'faces/07.png': 2})  # not clean/images/
  manifest = cleaning.clean_dataset(
    source,
    ShiftRestorer(),
    str(tmp_path / 'clean'),
    clean_cfg=config(fraction=1.0),
    seed=0,
    niqe_params=None,
    resolution=32,
    provenance={},
  )
  assert manifest['counts'] == {'cleaned': 13, 'copied': 0, 'failed': 1}
  failed = [r for r in manifest['records'] if r['action'] == 'failed']
  assert failed[0]['name'] == '04.png'
  assert failed[0]['reason'].startswith(str(tmp_path / 'faces' / '04.png') + ': cannot read')
  assert 'Input/output error' in failed[0]['reason']
  assert calls == {'faces/04.png': files.IO_ATTEMPTS, 'faces/07.png': 3}


def test_cleaning_in_a_bucket_rides_out_503s_and_names_a_forbidden_file(
  gcs_faults, gcs_bucket, niqe_params
):
  """Two 503s on one face's reads are retried and the cleaning completes as it would have; a
  face whose every read is refused (403, not transient) is journalled 'failed', named."""
  source = make_faces(f'{gcs_bucket}/faces', corrupt=())
  cfg = config(fraction=1.0)
  reference = sequential_clean(source, ShiftRestorer(), cfg, 32, niqe_params)
  proxy = gcs_faults.proxy
  proxy.add(r'/o/faces/03\.png', 'status', count=2, status=503, methods=('GET',))
  proxy.add(r'/o/faces/08\.png', 'status', status=403, methods=('GET',))
  out = f'{gcs_bucket}/clean'
  manifest = cleaning.clean_dataset(
    source,
    ShiftRestorer(),
    out,
    clean_cfg=cfg,
    seed=0,
    niqe_params=None,
    resolution=32,
    provenance={},
  )
  assert proxy.hits(r'/o/faces/03\.png', 'status') == 2
  records = {r['name']: r for r in manifest['records']}
  assert records['08.png']['action'] == 'failed'
  assert records['08.png']['reason'].startswith(f'{gcs_bucket}/faces/08.png: cannot read')
  assert 'Forbidden' in records['08.png']['reason']
  expected, out_bytes = reference  # everything else as without faults, 03.png included
  del expected['08.png'], out_bytes['08.png']
  del records['08.png']
  assert records == expected and written(out) == out_bytes
  assert cleaned_dataset.verify_manifest(out) == {'cleaned': 13, 'copied': 0, 'failed': 1}


def test_a_503_storm_longer_than_gcsfs_retries_is_outlasted(
  gcs_faults, gcs_bucket, monkeypatch, no_backoff
):
  """gcsfs tries each request 6 times, then raises; files.call_with_retries tries the file again,
  so seven 503s in a row on one face still end in its bytes. (gcsfs's waits, 1 to 32 s, are
  made instant here; the count of tries is what is tested.)"""
  import asyncio
  import types

  from gcsfs import retry

  async def no_wait(_):
    await asyncio.sleep(0)

  monkeypatch.setattr(retry, 'asyncio', types.SimpleNamespace(sleep=no_wait))
  files.write_atomic(f'{gcs_bucket}/faces/00.png', b'face')
  gcs_faults.proxy.add(r'/o/faces/00\.png', 'status', count=7, status=503, methods=('GET',))
  assert files.read_many([f'{gcs_bucket}/faces/00.png']) == [b'face']
  assert gcs_faults.proxy.hits(r'/o/faces/00\.png', 'status') == 7


# --- Latency: time goes by round trips in flight, not by requests.


def latency_dataset(folder, count, size=16):
  rng = np.random.default_rng(1)
  items = [
    (
      files.join(folder, f'{k:05d}.png'),
      images.encode(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)),
    )
    for k in range(count)
  ]
  assert files.write_many(items, concurrency=32) == [None] * count
  return sources.FolderSource(tuple(p for p, _ in items), size, root=folder)


def timed_clean(source, out, concurrency, proxy, batch_size=16):
  before = len(proxy.log)
  start = time.perf_counter()
  manifest = cleaning.clean_dataset(
    source,
    ShiftRestorer(),
    out,
    clean_cfg=config(fraction=1.0, batch_size=batch_size),
    seed=0,
    niqe_params=None,
    resolution=source.resolution,
    provenance={},
    concurrency=concurrency,
  )
  seconds = time.perf_counter() - start
  assert manifest['counts']['cleaned'] == len(source)
  return seconds, len(proxy.log) - before


def test_cleaning_time_scales_with_concurrency_not_requests(gcs_faults, gcs_bucket):
  """50 ms added to every request: cleaning 192 faces one request at a time (the reads of the
  next batch overlapping the writes of the last, and a journal's flush) holds at most three
  requests at once and takes at least a third of the sum of their latencies; 16 at a time, the
  proxy holds 16 or more at once. The concurrency is
  read at the proxy, not from a ratio of wall times: that ratio (3.0-3.5 on idle cores) fell to
  2.35-2.46 when two training runs shared the cores, though the requests overlapped as before."""
  proxy = gcs_faults.proxy
  source = latency_dataset(f'{gcs_bucket}/faces', 192)
  proxy.add(r'', 'latency', latency_s=0.05)
  proxy.reset_peak()
  one, requests = timed_clean(source, f'{gcs_bucket}/one', 1, proxy)
  peak_one = proxy.peak_in_flight
  proxy.reset_peak()
  sixteen, _ = timed_clean(source, f'{gcs_bucket}/sixteen', 16, proxy)
  print(
    f'\n192 faces, 50 ms per request ({requests} requests): {one:.2f} s one at a time '
    f'(at most {peak_one} in flight), {sixteen:.2f} s 16 at a time (at most '
    f'{proxy.peak_in_flight})'
  )
  assert requests >= 2 * 192  # a read and a write per face
  # One at a time: the reads of the next batch, the writes of the last, and a journal's flush.
  assert peak_one <= 3
  assert one >= 0.05 * requests / 3 * 0.9
  assert proxy.peak_in_flight >= 16


class Latency:
  """Every read and write of files.py made `seconds` slower, counted: a bucket's round trip
  without the local GCS server, which answers one request at a time and rewrites its whole
  metadata file on each upload (thousands of objects make that, not the latency, the limit)."""

  def __init__(self, monkeypatch, seconds):
    self.requests = 0
    self.lock = threading.Lock()
    for name in ('read_whole', 'write_atomic'):
      monkeypatch.setattr(files, name, self.slowed(getattr(files, name), seconds))

  def slowed(self, fn, seconds):
    def call(*args):
      with self.lock:
        self.requests += 1
      time.sleep(seconds)
      return fn(*args)

    return call


def test_cleaning_2000_faces_through_50ms_of_latency(tmp_path, monkeypatch):
  """The figure docs/PERFORMANCE.md quotes: 2,000 16 px faces, a restorer that costs nothing,
  50 ms added to every read and write, at the default 16 in flight (batches of 16) and at 64
  (batches of 64): a small part of the time the same requests take one after another."""
  source = latency_dataset(str(tmp_path / 'faces'), 2000)
  latency = Latency(monkeypatch, 0.05)
  for concurrency in (16, 64):
    before = latency.requests
    start = time.perf_counter()
    manifest = cleaning.clean_dataset(
      source,
      ShiftRestorer(),
      str(tmp_path / f'clean{concurrency}'),
      clean_cfg=config(fraction=1.0, batch_size=concurrency),
      seed=0,
      niqe_params=None,
      resolution=16,
      provenance={},
      concurrency=concurrency,
    )
    seconds = time.perf_counter() - start
    requests = latency.requests - before
    assert manifest['counts']['cleaned'] == 2000
    print(
      f'\n2000 faces, 50 ms per read or write, {concurrency} in flight: {seconds:.1f} s, '
      f'{requests} requests ({0.05 * requests:.0f} s one after another)'
    )
    assert requests >= 4000
    assert seconds < 0.05 * requests / 8


# --- Two hosts: each scores and cleans its share; the selection is agreed through the gather.

WORKER = r"""
import json, os, sys, types
tests, faces, out, pi, port = sys.argv[1:6]
sys.path.insert(0, tests)
from conftest import start_cpu_processes
jax = start_cpu_processes(types.SimpleNamespace(devices=1, process_id=int(pi), num_processes=2,
                                                port=int(port)))
from test_bucket_cleaning import ShiftRestorer, config
from idm_jax.extrinsic import cleaning
from idm_jax.storage import images
from idm_jax.runtime import host_shares
from idm_jax.data import sources
source = sources.FolderSource(tuple(images.list_images(faces)), 32, root=faces)
restorer = ShiftRestorer()
restorer.lockstep = True   # as a Restorer over both hosts' devices: batches agreed, not run apart
manifest = cleaning.clean_dataset(source, restorer, out, clean_cfg=config(), seed=0,
                                   niqe_params=None, resolution=32, provenance={})
print(json.dumps(dict(share=host_shares.host_share(len(source)).tolist(), calls=restorer.calls,
                      counts=manifest.get('counts'))))
"""


def test_two_hosts_score_and_clean_their_shares_into_the_same_dataset(tmp_path, niqe_params):
  import os
  import socket
  import subprocess
  import sys

  source = make_faces(str(tmp_path / 'faces'))
  reference = sequential_clean(source, ShiftRestorer(), config(), 32, niqe_params)
  out = str(tmp_path / 'clean')
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  tests = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, PYTHONPATH=os.path.dirname(tests))
  procs = [
    subprocess.Popen(
      [sys.executable, '-c', WORKER, tests, str(tmp_path / 'faces'), out, str(p), str(port)],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=env,
    )
    for p in range(2)
  ]
  results = []
  for p in procs:
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-4000:]
    results.append(json.loads(stdout.strip().splitlines()[-1]))
  assert [r['share'] for r in results] == [list(range(0, 14, 2)), list(range(1, 14, 2))]
  # Each host journalled its own share only, and restored only its selected faces.
  for p, r in enumerate(results):
    lines = files.read_text(os.path.join(out, f'journal-{p}.jsonl')).splitlines()
    assert sorted(json.loads(line)['name'] for line in lines) == [
      f'{k:02d}.png' for k in r['share']
    ]
  manifest = json.loads(files.read_text(os.path.join(out, cleaned_dataset.MANIFEST)))
  assert results[0]['counts'] == manifest['counts'] == {'cleaned': 6, 'copied': 8, 'failed': 0}
  assert_same_as_sequential(out, manifest, reference)


KILLED_WORKER = r"""
import sys
tests, faces, out = sys.argv[1:4]
sys.path.insert(0, tests)
from test_bucket_cleaning import ShiftRestorer, config
from idm_jax.extrinsic import cleaning
from idm_jax.storage import images
from idm_jax.data import sources
source = sources.FolderSource(tuple(images.list_images(faces)), 32, root=faces)
cleaning.clean_dataset(source, ShiftRestorer(sleep_s=0.5), out,
                        clean_cfg=config(fraction=1.0, batch_size=2), seed=0, niqe_params=None,
                        resolution=32, provenance={})
"""


def test_a_cleaning_killed_outright_resumes_to_the_same_dataset(tmp_path, niqe_params):
  """SIGKILL in the middle (no cleanup runs: writes and reads in flight are cut): the resumed
  cleaning redoes only what the journal lacks and ends with the uninterrupted one's dataset."""
  import os
  import signal
  import subprocess
  import sys

  source = make_faces(str(tmp_path / 'faces'))
  cfg = config(fraction=1.0, batch_size=2)
  reference = sequential_clean(source, ShiftRestorer(), cfg, 32, niqe_params)
  out = str(tmp_path / 'clean')
  tests = os.path.dirname(os.path.abspath(__file__))
  proc = subprocess.Popen(
    [sys.executable, '-c', KILLED_WORKER, tests, str(tmp_path / 'faces'), out],
    env=dict(os.environ, PYTHONPATH=os.path.dirname(tests)),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  journal = os.path.join(out, 'journal-0.jsonl')
  deadline = time.time() + 300
  try:
    while time.time() < deadline and proc.poll() is None:
      if os.path.exists(journal) and files.read_text(journal).count('"cleaned"') >= 4:
        break
      time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()[-3000:]
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
  done = cleaned_dataset.read_journals(out)
  assert 4 <= len(done) < 14 and not os.path.exists(os.path.join(out, 'manifest.json'))
  # What a kill inside files.write_atomic leaves (it may or may not have happened here).
  with open(os.path.join(out, 'images', '.12.png.x1y2z3.tmp'), 'wb') as f:
    f.write(b'\x89PNG half')
  restorer = ShiftRestorer()
  manifest = cleaning.clean_dataset(
    source, restorer, out, clean_cfg=cfg, seed=0, niqe_params=None, resolution=32, provenance={}
  )
  # 13 good faces (and a corrupt one) in batches of 2: only the batches the journal lacks.
  assert restorer.calls == -(-(14 - len(done)) // 2)
  assert_same_as_sequential(out, manifest, reference)
  assert not [f for f in os.listdir(os.path.join(out, 'images')) if f.endswith('.tmp')]
  assert cleaned_dataset.verify_manifest(out) == manifest['counts']  # no stray file on disk
