"""Atomic writes: whole files or nothing, ordinary permissions, nothing left behind."""
import os
import stat

import numpy as np
import pytest
from PIL import Image

from idm_jax import files


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


def test_save_image_format_follows_extension(tmp_path):
  img = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
  files.save_image(tmp_path / 'a.png', img)
  files.save_image(tmp_path / 'a.jpg', img)
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'a.png')), img)
  assert Image.open(tmp_path / 'a.jpg').format == 'JPEG'
