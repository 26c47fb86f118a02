"""Where face images come from: image folders, prepared TFDS datasets, and built-in demo faces.

Every source is a random-access sequence of records `{'image': uint8 (R, R, 3), 'name': str}`
that grain can index. Decoding happens in `__getitem__` (so in grain's worker processes), and a
file that cannot be decoded never raises there: it comes back as a *bad record*
`{'image': None, 'name': name, 'error': reason}` that the pipeline drops, counts and logs once,
because one corrupt JPEG among 70,000 must not end a week-long training run.

`load_image` turns a file into a square RGB uint8 array of the training resolution: it decodes
with `idm_jax.storage.images` (EXIF, alpha on white, 16-bit, grayscale, CMYK, the pixel limit: the rules
every entry point shares), then applies the training policy:
  * non-square images are centre-cropped to the largest square;
  * a square side below `resolution * MIN_SIZE_FRACTION` (1/4) is rejected as too small (upscaling
    more than 4x only invents blur, which a restoration model must not learn as "HQ");
    anything between is upscaled, larger is downscaled with antialiasing (Pillow's bicubic
    filter widens with the scale factor, so there is no aliasing).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.resources
import os
import pathlib
from typing import Any, Sequence

import numpy as np
from PIL import Image

from idm_jax.storage import files
from idm_jax.storage import images

MIN_SIZE_FRACTION = 0.25
# Prepared datasets live under this TFDS builder name: --name ffhq512 is 'idm_faces/ffhq512'.
TFDS_BUILDER_NAME = 'idm_faces'

Record = dict[str, Any]


def bad_record(name: str, reason: str) -> Record:
  """The record a source returns instead of raising, so the pipeline can skip and report it."""
  return {'image': None, 'name': name, 'error': reason}


def is_bad(record: Record) -> bool:
  return record.get('image') is None


# ---------------------------------------------------------------------------------------------
# Decoding.


def load_image(
  data: bytes | str | os.PathLike, resolution: int, name: str | None = None
) -> np.ndarray:
  """Decodes an image file (bytes or a path) into uint8 (resolution, resolution, 3).

  Raises images.BadImage naming `name` (default: the path) for files that cannot be used; see the
  module docstring for the rules.
  """
  # Big JPEGs may decode at a reduced scale, but never below twice the target: the final
  # antialiased resize still does the filtering.
  im, _ = images.decode(data, name, draft_side=2 * resolution)
  name = name or (str(data) if isinstance(data, (str, os.PathLike)) else '<bytes>')
  w, h = im.size
  min_side = int(np.ceil(resolution * MIN_SIZE_FRACTION))
  if min(w, h) < min_side:
    raise images.BadImage(
      name,
      f'too small: {w}x{h}, the short side must be at least '
      f'{min_side} px (resolution {resolution} / 4)',
      images.TOO_SMALL,
    )
  out = images.square(im, resolution)
  if out.shape != (resolution, resolution, 3):  # a defect in the code above, not in the file
    raise AssertionError(f'{name}: decoded to {out.shape}')
  return out


def encode_png(image: np.ndarray) -> bytes:
  """Lossless encoding for prepared datasets (level 1: 3x faster, ~10% larger than level 6)."""
  return images.encode(image, 'PNG', compress_level=1)


# ---------------------------------------------------------------------------------------------
# Folders.


@dataclasses.dataclass(frozen=True)
class FolderSource:
  """Random access to image files; a file that fails to decode yields a bad record.

  Names are paths relative to `root` when given (stable across machines), else the paths.
  """

  paths: Sequence[str]
  resolution: int
  root: str | None = None

  def __len__(self) -> int:
    return len(self.paths)

  def _name(self, path: str) -> str:
    return files.relpath(path, self.root) if self.root else path

  def name(self, index: int) -> str:
    """The record's name without decoding the file."""
    return self._name(self.paths[index])

  def __getitem__(self, index: int) -> Record:
    path = self.paths[index]
    name = self._name(path)
    try:
      return {'image': load_image(path, self.resolution, name), 'name': name}
    except images.BadImage as e:
      return bad_record(name, e.reason)


# ---------------------------------------------------------------------------------------------
# Built-in demo faces.

# (package, file, (left, top, side) of a square face box). All three ship inside wheels that a
# plain `pip install idm_jax` brings (scikit-image is a dependency; the third travels with
# idm_jax itself) and are read from the package directory, so nothing is fetched (scikit-image's
# pooch fetcher is bypassed entirely). Grace Hopper's portrait (US Navy photograph, 1984; public
# domain) is the file matplotlib ships as sample data, byte for byte: copied here, so that the
# demo needs no plotting library and its crops stay the pixels it was tuned on.
_BUILTIN_FACES = (
  ('skimage.data', 'astronaut.png', (145, 25, 170)),  # Eileen Collins, NASA
  ('idm_jax.data', 'grace_hopper.jpg', (140, 70, 250)),  # Grace Hopper
  ('skimage.data', 'camera.png', (160, 60, 130)),  # the cameraman, grayscale profile
)
BUILTIN_TRAIN_SIZE = 64
BUILTIN_VAL_SIZE = 8


@functools.lru_cache(maxsize=None)
def _builtin_photo(package: str, filename: str) -> Image.Image:
  path = importlib.resources.files(package).joinpath(filename)
  with path.open('rb') as f:
    return images.decode(f.read(), filename)[0]


def _augmented_crop(
  photo: Image.Image, box: tuple[int, int, int], rng: np.random.Generator, resolution: int
) -> np.ndarray:
  """The face box shifted by up to 8% and scaled by 0.9-1.1, maybe flipped, at resolution."""
  left, top, side = box
  scale = rng.uniform(0.9, 1.1)
  new_side = side * scale
  cx = left + side / 2 + rng.uniform(-0.08, 0.08) * side
  cy = top + side / 2 + rng.uniform(-0.08, 0.08) * side
  w, h = photo.size
  new_side = min(new_side, w, h)
  x0 = float(np.clip(cx - new_side / 2, 0, w - new_side))
  y0 = float(np.clip(cy - new_side / 2, 0, h - new_side))
  # resize(box=...) crops with sub-pixel precision and filters in one step.
  im = photo.resize(
    (resolution, resolution), Image.Resampling.BICUBIC, box=(x0, y0, x0 + new_side, y0 + new_side)
  )
  if rng.random() < 0.5:
    im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return np.asarray(im, dtype=np.uint8)


@functools.lru_cache(maxsize=8)
def builtin_faces(split: str, resolution: int) -> tuple[tuple[str, np.ndarray], ...]:
  """Deterministic augmented face crops: 64 for 'train', 8 held out for 'validation'.

  Validation uses a different seed, so its crops are different augmentations of the same three
  people (there are only three faces in the wheels; this is a demo, not a benchmark).
  """
  count, seed = {'train': (BUILTIN_TRAIN_SIZE, 0), 'validation': (BUILTIN_VAL_SIZE, 1)}[split]
  rng = np.random.default_rng([seed, resolution])
  out = []
  for i in range(count):
    package, filename, box = _BUILTIN_FACES[i % len(_BUILTIN_FACES)]
    image = _augmented_crop(_builtin_photo(package, filename), box, rng, resolution)
    stem = pathlib.Path(filename).stem
    out.append((f'builtin/{split}/{stem}_{i:03d}', image))
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class BuiltinSource:
  """The built-in faces as a random-access source (computed once per process, in memory)."""

  split: str
  resolution: int

  def __len__(self) -> int:
    return len(builtin_faces(self.split, self.resolution))

  def __getitem__(self, index: int) -> Record:
    name, image = builtin_faces(self.split, self.resolution)[index]
    return {'image': image, 'name': name}


# ---------------------------------------------------------------------------------------------
# TFDS (array_record, read without TensorFlow).


def resolve_tfds_name(name: str, data_dir: str) -> str:
  """'ffhq512' -> 'idm_faces/ffhq512' when that was prepared in data_dir; other names as given."""
  if '/' not in name and data_dir and files.isdir(files.join(data_dir, TFDS_BUILDER_NAME, name)):
    return f'{TFDS_BUILDER_NAME}/{name}'
  return name


class TfdsSource:
  """Records of a TFDS array_record dataset as {'image', 'name'}.

  Works with datasets made by `idm_jax.data.prepare` (an Image feature 'image' and the relative
  file name 'name') and with catalog datasets such as celeb_a_hq whose Image feature tfds
  decodes to uint8 arrays without TensorFlow (centre-cropped/resized here if the size differs).
  Encoded bytes in 'image' are decoded with `load_image`. Catalog datasets must have been
  prepared with file_format='array_record' (preparing celeb_a_hq itself needs TensorFlow).
  """

  def __init__(self, name: str, data_dir: str, split: str, resolution: int, max_examples: int = 0):
    import tensorflow_datasets as tfds  # noqa: PLC0415 (a slow import, for TFDS sources only)

    self.name = resolve_tfds_name(name, data_dir)
    self.split = split
    self.resolution = resolution
    try:
      builder = tfds.builder(self.name, data_dir=data_dir or None)
      self._source = builder.as_data_source(split=split)
    except Exception as e:  # tfds raises many types; all mean "not there / not readable"
      raise FileNotFoundError(
        f'cannot open TFDS dataset {self.name!r} split {split!r} in data_dir '
        f'{data_dir!r}: {str(e).rstrip(".")}. Prepare one with `python -m '
        'idm_jax.data.prepare`; note that reading needs file_format=array_record.'
      ) from e
    n = len(self._source)
    self._len = min(n, max_examples) if max_examples else n

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> Record:
    if not 0 <= index < self._len:
      raise IndexError(index)
    try:
      ex = self._source[index]
    except Exception as e:  # a corrupt shard chunk must not end the run either
      return bad_record(f'{self.name}/{self.split}[{index}]', f'cannot read record ({e})')
    name = ex.get('name', f'{self.split}[{index}]')
    if isinstance(name, bytes):
      name = name.decode('utf-8', 'replace')
    name = str(name)
    image = ex.get('image')
    try:
      if isinstance(image, (bytes, bytearray)):
        image = load_image(image, self.resolution, name)
      elif isinstance(image, np.ndarray) and image.dtype == np.uint8:
        if image.shape != (self.resolution, self.resolution, 3):
          # Same rules as load_image, via a lossless re-encode (rare: catalog datasets only).
          image = load_image(
            encode_png(image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image),
            self.resolution,
            name,
          )
      else:
        raise images.BadImage(name, f'record has no usable "image" feature (got {type(image)})')
    except images.BadImage as e:
      return bad_record(name, e.reason)
    return {'image': image, 'name': name}


# ---------------------------------------------------------------------------------------------


def folder_split(paths: Sequence[str], num_val: int, split: str) -> list[str]:
  """The last `num_val` sorted files are validation, the rest train."""
  if num_val >= len(paths):
    raise ValueError(
      f'config.data.num_val={num_val} leaves no training images ({len(paths)} files)'
    )
  cut = len(paths) - num_val
  return list(paths[:cut] if split == 'train' else paths[cut:])


def stable_fraction(name: str) -> float:
  """A number in [0, 1) from a file name, the same on every machine and Python version."""
  return int.from_bytes(hashlib.sha256(name.encode('utf-8')).digest()[:8], 'big') / 2**64


def _canonical_split(split: str) -> str:
  s = {
    'train': 'train',
    'validation': 'validation',
    'val': 'validation',
    'valid': 'validation',
    'eval': 'validation',
    'test': 'validation',
  }.get(split)
  if s is None:
    raise ValueError(f'split {split!r}: source=folder/builtin know only "train" and "validation"')
  return s


def make_source(data_cfg, split: str):
  """A random-access source of {'image', 'name'} records for config.data and a split name.

  `split` is 'train'/'validation' (folder and builtin) or any TFDS split string (tfds).
  max_examples (when > 0) truncates the training split.
  """
  res = int(data_cfg.resolution)
  is_train = split in ('train', data_cfg.train_split)
  max_examples = int(data_cfg.max_examples) if is_train else 0
  if data_cfg.source == 'folder':
    split = _canonical_split('train' if is_train else split)
    paths = folder_split(images.list_images(data_cfg.dir), int(data_cfg.num_val), split)
    if max_examples:
      paths = paths[:max_examples]
    if not paths:
      raise ValueError(f'config.data.num_val=0: folder {data_cfg.dir!r} has no {split} images')
    return FolderSource(tuple(paths), res, root=files.absolute(data_cfg.dir))
  if data_cfg.source == 'builtin':
    source = BuiltinSource(_canonical_split('train' if is_train else split), res)
    if max_examples and max_examples < len(source):
      return _Truncated(source, max_examples)
    return source
  if data_cfg.source == 'tfds':
    return TfdsSource(data_cfg.tfds_name, data_cfg.tfds_data_dir, split, res, max_examples)
  raise ValueError(f'config.data.source: unknown source {data_cfg.source!r}')


@dataclasses.dataclass(frozen=True)
class _Truncated:
  """The first n records of a source."""

  source: Any
  n: int

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, index: int) -> Record:
    if not 0 <= index < self.n:
      raise IndexError(index)
    return self.source[index]
