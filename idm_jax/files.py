"""Atomic file writes: a reader, or a crash mid-write, sees the old file or the whole new one.

Every output the project writes for a user (images, checkpoints' side files, manifests, exported
models) goes through here, so no run ever leaves a half-written file under its final name.
"""
from __future__ import annotations

import io
import os
import tempfile

import numpy as np
from PIL import Image


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
  """Writes to a temp file beside `path`, fsyncs, then renames it over `path`."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.' + os.path.basename(path) + '.',
                             suffix='.tmp')
  try:
    # mkstemp makes the file private (0600); give it the permissions a plain open() would.
    os.fchmod(fd, 0o666 & ~_umask())
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


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


def encode_image(image: np.ndarray, fmt: str = 'PNG', **kwargs) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, format=fmt, **kwargs)
  return buf.getvalue()


def save_image(path: str | os.PathLike, image: np.ndarray) -> None:
  """Writes an RGB uint8 image atomically; the format follows the extension (png, jpg)."""
  if os.fspath(path).lower().endswith(('.jpg', '.jpeg')):
    write_atomic(path, encode_image(image, 'JPEG', quality=95))
  else:
    write_atomic(path, encode_image(image, 'PNG'))
