"""Atomic writes: whole files or nothing, ordinary permissions, nothing left behind."""

import os
import stat

import numpy as np
from PIL import Image
import pytest

from idm_jax.storage import files
from idm_jax.storage import images


def test_write_atomic_replaces_whole_and_leaves_no_temp(tmp_path):
  path = tmp_path / 'sub' / 'a.bin'
  files.write_atomic(path, b'old')
  files.write_atomic(path, b'new contents')
  assert path.read_bytes() == b'new contents'
  assert os.listdir(path.parent) == ['a.bin']


def test_permissions_follow_the_umask_not_mkstemp(tmp_path):
  old = os.umask(0o022)
  try:
    files.write_atomic(tmp_path / 'a.bin', b'x')
  finally:
    os.umask(old)
  assert stat.S_IMODE(os.stat(tmp_path / 'a.bin').st_mode) == 0o644


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
  path = tmp_path / 'a.bin'
  files.write_atomic(path, b'old')
  monkeypatch.setattr(os, 'replace', lambda *a: (_ for _ in ()).throw(OSError('disk full')))
  with pytest.raises(OSError):
    files.write_atomic(path, b'new')
  assert path.read_bytes() == b'old'
  assert os.listdir(tmp_path) == ['a.bin']


def test_a_killed_write_leaves_a_temporary_that_remove_partial_writes_deletes(
  tmp_path, monkeypatch
):
  """A write killed between mkstemp and the rename leaves '.NAME.*.tmp'; remove_partial_writes
  deletes such files below a folder and nothing else."""
  (tmp_path / 'sub').mkdir()
  files.write_atomic(tmp_path / 'sub' / 'kept.png', b'whole')
  monkeypatch.setattr(os, 'replace', lambda *a: (_ for _ in ()).throw(OSError('killed')))
  monkeypatch.setattr(os, 'unlink', lambda p: None)  # as a kill: no clean-up runs
  with pytest.raises(OSError):
    files.write_atomic(tmp_path / 'sub' / 'cut.png', b'half')
  monkeypatch.undo()
  left = files.walk_files(tmp_path)
  assert 'sub/kept.png' in left and any(files.is_partial_write(p) for p in left)
  files.remove_partial_writes(tmp_path)
  assert files.walk_files(tmp_path) == ['sub/kept.png']
  files.remove_partial_writes(tmp_path / 'absent')  # no folder: nothing to do


def test_save_image_format_follows_extension(tmp_path):
  img = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
  images.save(tmp_path / 'a.png', img)
  images.save(tmp_path / 'a.jpg', img)
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'a.png')), img)
  assert Image.open(tmp_path / 'a.jpg').format == 'JPEG'


# --- The same operations on local disk and in a gs:// bucket (the local GCS server).


def test_the_path_layer_reads_and_writes_both_kinds_of_path(local_or_bucket):
  root = files.join(local_or_bucket, 'root')
  files.write_atomic(files.join(root, 'a', 'x.bin'), b'old')
  files.write_atomic(files.join(root, 'a', 'x.bin'), b'new')
  images.save(files.join(root, 'a', 'b', 'y.png'), np.zeros((2, 2, 3), np.uint8))
  files.AppendedText(files.join(root, 'log.jsonl')).append('one\n')
  files.AppendedText(files.join(root, 'log.jsonl')).append('two\nthree\n')  # a later writer
  assert files.read_bytes(files.join(root, 'a', 'x.bin')) == b'new'
  assert list(files.iter_lines(files.join(root, 'log.jsonl'))) == ['one', 'two', 'three']
  assert files.listdir(root) == ['a', 'log.jsonl']
  assert files.walk_files(root) == ['a/b/y.png', 'a/x.bin', 'log.jsonl']
  assert files.isdir(files.join(root, 'a')) and not files.isdir(files.join(root, 'nope'))
  assert files.isfile(files.join(root, 'a', 'x.bin')) and not files.isfile(files.join(root, 'a'))
  assert files.relpath(files.join(root, 'a', 'b', 'y.png'), root) == 'a/b/y.png'
  files.copy_file(files.join(root, 'a', 'x.bin'), files.join(root, 'c', 'x.bin'))
  files.move(files.join(root, 'a'), files.join(root, 'moved'))
  assert files.walk_files(root) == ['c/x.bin', 'log.jsonl', 'moved/b/y.png', 'moved/x.bin']
  files.remove(files.join(root, 'c', 'x.bin'))
  files.remove(files.join(root, 'c', 'x.bin'))  # already gone: not an error
  assert not files.exists(files.join(root, 'c', 'x.bin'))
  files.check_writable(files.join(root, 'new'))
  assert files.walk_files(root) == ['log.jsonl', 'moved/b/y.png', 'moved/x.bin']  # probe gone


def test_an_append_made_again_after_it_failed_writes_its_text_once(local_or_bucket):
  """An append that raised may have landed in part (locally) or whole with its reply lost (in a
  bucket): made again, it starts from where the writer's last append ended. The lines an
  earlier writer left stay."""
  path = files.join(local_or_bucket, 'metrics.jsonl')
  files.write_text(path, 'earlier run\n')
  log = files.AppendedText(path)
  log.append('one\n')
  # What a failed append of 'two' may leave: part of it, or all of it.
  landed = 'earlier run\none\n' + ('tw' if not files.is_remote(path) else 'two\n')
  files.write_text(path, landed)
  log.append('two\n')
  log.append('three\n')
  assert list(files.iter_lines(path)) == ['earlier run', 'one', 'two', 'three']


def test_a_missing_bucket_fails_at_once_naming_it(gcs_server):
  import time

  t0 = time.monotonic()
  with pytest.raises(files.StorageError, match=r'gs://no-such-bucket-7f3a does not exist'):
    files.check_writable('gs://no-such-bucket-7f3a/runs/x')
  assert time.monotonic() - t0 < 10


def test_remote_and_local_names():
  assert files.is_remote('gs://b/x') and not files.is_remote('/tmp/x')
  assert not files.is_remote('runs/gs:/b')  # what os.path made of gs:// before: local
  assert files.absolute('gs://b/run/') == 'gs://b/run'
  assert files.join('gs://b/run', 'checkpoints') == 'gs://b/run/checkpoints'
  assert files.dirname('gs://b/run/checkpoints') == 'gs://b/run'
  assert files.absolute('rel') == os.path.abspath('rel')


def test_a_workdir_that_cannot_be_created_is_one_clear_error(tmp_path):
  (tmp_path / 'file').write_text('x')
  with pytest.raises(files.StorageError, match=r'file/run: cannot write there'):
    files.check_writable(tmp_path / 'file' / 'run')
