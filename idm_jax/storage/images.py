"""Image bytes: the one reader (files -> upright 8-bit RGB, one set of rules for every entry
point), the one writer (`encode`, `save`), and listing the images of a folder.

Training data, the fixed test set, restore, the web demo, evaluate and generate all decode here,
so a file becomes the same pixels wherever it goes. The rules:
  * empty, unreadable, truncated and non-image files raise `BadImage(name, reason)`;
  * a header claiming more than `MAX_PIXELS` pixels is refused before anything is decoded
    (decompression bombs: a few KB of PNG can claim gigapixels);
  * EXIF orientation is applied, so phone photos are upright;
  * grayscale (L, I;16, I, F, 1) is expanded to three equal channels;
  * transparency (RGBA, LA, PA, palette with a transparent colour) is composited on WHITE,
    the usual background of cut-out portraits (black would darken the hair edges);
  * CMYK, YCbCr, LAB, HSV are converted to RGB by Pillow (it undoes Adobe's CMYK inversion);
  * 16-bit samples are scaled to 8 bit by rounding x / 257 (65535 -> 255), never clipped and
    never truncated to the high byte (what Pillow does to 16-bit colour PNGs).
Each caller decides what a bad file means to it: a bad record that training skips and counts, or
an error naming the file in a CLI. This module knows nothing of configs or of the model.
"""

from __future__ import annotations

import io
import os
import pathlib
import posixpath
from typing import Iterable, Sequence

import numpy as np
from PIL import Image
from PIL import ImageOps

from idm_jax.storage import files

EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.tif', '.tiff')
# Forty megapixels: any camera photo passes, while restore's upscaled copy of it still fits in
# memory; a bomb is refused from its header alone.
MAX_PIXELS = 40_000_000
ALPHA_BACKGROUND = (255, 255, 255)

# BadImage.kind: a short, fixed word per failure, for callers that tally reasons.
UNREADABLE, EMPTY, NOT_AN_IMAGE, TOO_LARGE, CORRUPT, TOO_SMALL = (
  'unreadable',
  'empty',
  'not an image',
  'too large',
  'corrupt',
  'too small',
)

_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


class BadImage(ValueError):
  """A file that cannot become an image; str() names the file and the problem.

  `name` is the file (or record) name, `reason` the problem alone, `kind` one of the words above.
  """

  def __init__(self, name: str, reason: str, kind: str = CORRUPT):
    super().__init__(f'{name}: {reason}')
    self.name = name
    self.reason = reason
    self.kind = kind


# ---------------------------------------------------------------------------------------------
# Pillow modes -> RGB.


def to_rgb(im: Image.Image) -> Image.Image:
  """Any Pillow mode -> 8-bit RGB, with alpha composited and 16-bit samples scaled properly."""
  mode = im.mode
  if mode == 'RGB':
    return im
  if mode.startswith('I;16') or (mode == 'I' and np.asarray(im).max(initial=0) > 255):
    # 16-bit grayscale (PNG/TIFF). Pillow's own convert('L') clips at 255, so scale by hand.
    # (A 32-bit 'I' image holding 0..255 values is 8-bit data and falls through to convert.)
    a = np.asarray(im).astype(np.int64)
    return Image.fromarray(_scale16(np.clip(a, 0, 65535)), 'L').convert('RGB')
  if mode == 'F':
    a = np.asarray(im, dtype=np.float64)
    scale = 255.0 if np.nanmax(a) <= 1.0 else 1.0  # [0, 1] floats or 0..255 floats
    a = np.clip(np.nan_to_num(a) * scale + 0.5, 0, 255)
    return Image.fromarray(a.astype(np.uint8), 'L').convert('RGB')
  if mode == 'P':
    has_alpha = 'transparency' in im.info or im.palette is not None and im.palette.mode == 'RGBA'
    im = im.convert('RGBA' if has_alpha else 'RGB')
  elif mode in ('LA', 'La', 'PA', 'RGBa'):
    im = im.convert('RGBA')
  elif mode in ('L', '1') and 'transparency' in im.info:
    im = im.convert('RGBA')
  if im.mode == 'RGBA':
    background = Image.new('RGBA', im.size, ALPHA_BACKGROUND + (255,))
    return Image.alpha_composite(background, im).convert('RGB')
  return im.convert('RGB')  # L, 1, CMYK, YCbCr, LAB, HSV


def _scale16(a: np.ndarray) -> np.ndarray:
  """0..65535 -> 0..255 rounded: 257 maps the 16-bit range exactly onto the 8-bit one."""
  return ((a.astype(np.int64) + 128) // 257).astype(np.uint8)


def _png_16bit_colour(data: bytes) -> int:
  """The PNG colour type (2 RGB, 6 RGBA) when `data` is a 16-bit colour PNG, else 0."""
  if data[:8] == _PNG_SIGNATURE and data[12:16] == b'IHDR' and len(data) >= 26:
    depth, colour = data[24], data[25]
    if depth == 16 and colour in (2, 6):
      return colour
  return 0


def _png_16bit_gray(data: bytes) -> bool:
  return (
    data[:8] == _PNG_SIGNATURE
    and data[12:16] == b'IHDR'
    and len(data) >= 26
    and data[24] == 16
    and data[25] in (0, 4)
  )


def _decode_16bit_colour(data: bytes, colour: int, im: Image.Image) -> Image.Image:
  """The full-precision pixels of a 16-bit colour PNG, rounded to 8 bit (Pillow keeps only the
  high byte, which darkens by up to one level). `im` is Pillow's decode, whose EXIF is kept."""
  import cv2  # noqa: PLC0415 (a slow import; only these rare files need it)

  a = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
  want = 3 if colour == 2 else 4
  if a is None or a.dtype != np.uint16 or a.ndim != 3 or a.shape[2] != want:
    return im  # cv2 disagrees about the file; Pillow's decode is still a valid image
  rgb = _scale16(a)[..., [2, 1, 0, 3][:want]]  # cv2 gives BGR(A)
  out = Image.fromarray(np.ascontiguousarray(rgb), 'RGB' if want == 3 else 'RGBA')
  if 'exif' in im.info:
    out.info['exif'] = im.info['exif']
  return out


def conversion_notes(im: Image.Image, data: bytes = b'') -> list[str]:
  """What `to_rgb` will change in `im`, in words (for CLIs that tell the user)."""
  notes = []
  frames = getattr(im, 'n_frames', 1)
  if frames > 1:  # animated GIF/PNG/WebP, multi-page TIFF: decoding keeps frame 0 only
    notes.append(f'{frames} frames (animated or multi-page): only the first is used')
  mode = im.mode
  if mode == 'F':
    notes.append('floating-point image scaled to 8 bits')
  elif (
    mode.startswith('I;16')
    or (mode == 'I' and np.asarray(im).max(initial=0) > 255)
    or _png_16bit_colour(data)
    or _png_16bit_gray(data)
  ):
    notes.append('16-bit image scaled to 8 bits')
  if mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or 'transparency' in im.info:
    notes.append('transparency composited onto white')
  elif mode in ('L', '1', 'I', 'F') or mode.startswith('I;16'):
    notes.append('grayscale converted to RGB')
  elif mode not in ('RGB', 'P'):
    notes.append(f'{mode} converted to RGB')
  return notes


# ---------------------------------------------------------------------------------------------
# Files -> images.


def _read_bytes(data: bytes | str | os.PathLike, name: str | None) -> tuple[bytes, str]:
  if isinstance(data, (bytes, bytearray, memoryview)):
    return bytes(data), name or '<bytes>'
  name = name or str(data)
  try:
    return files.read_bytes(data), name
  except OSError as e:
    raise BadImage(name, f'cannot read file ({e.strerror or e})', UNREADABLE) from e


def decode(
  data: bytes | str | os.PathLike,
  name: str | None = None,
  *,
  max_pixels: int = MAX_PIXELS,
  draft_side: int = 0,
) -> tuple[Image.Image, list[str]]:
  """(upright RGB Pillow image, notes on what was converted) of a file's bytes or path.

  Raises BadImage naming `name` (default: the path). `draft_side` > 0 says the caller will shrink
  the short side to it: a JPEG at least twice as large is then decoded at a reduced DCT scale,
  never below that size, so the caller's antialiased resize still does the filtering.
  """
  data, name = _read_bytes(data, name)
  if not data:
    raise BadImage(name, 'empty file (0 bytes)', EMPTY)
  try:
    im = Image.open(io.BytesIO(data))
  except Image.UnidentifiedImageError as e:
    raise BadImage(name, 'not an image (format not recognised)', NOT_AN_IMAGE) from e
  except Image.DecompressionBombError as e:  # Pillow's own, far higher, limit
    raise BadImage(
      name, f'too large: over the {max_pixels / 1e6:g} MP limit ({e})', TOO_LARGE
    ) from e
  except (OSError, SyntaxError, ValueError, EOFError) as e:
    raise BadImage(name, f'corrupt or truncated image: cannot read the header ({e})') from e
  w, h = im.size
  if w * h > max_pixels:
    raise BadImage(
      name,
      f'too large: {w}x{h} = {w * h / 1e6:.1f} MP, over the {max_pixels / 1e6:g} MP limit',
      TOO_LARGE,
    )
  if w < 1 or h < 1:
    raise BadImage(name, f'has no pixels ({w}x{h})')
  try:
    side = min(w, h)
    if draft_side > 0 and im.format == 'JPEG' and side >= 2 * draft_side:
      # libjpeg decodes at 1/2 .. 1/8 scale: ~4-10x faster on big JPEGs.
      factor = draft_side / side
      im.draft(im.mode, (int(np.ceil(w * factor)), int(np.ceil(h * factor))))
    im.load()  # decode now: truncated files fail here, not later
    colour16 = _png_16bit_colour(data)
    notes = conversion_notes(im, data)
    if colour16:
      im = _decode_16bit_colour(data, colour16, im)
    im = to_rgb(ImageOps.exif_transpose(im))
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError) as e:
    raise BadImage(name, f'corrupt or truncated image: {str(e) or type(e).__name__}') from e
  return im, notes


def read(
  data: bytes | str | os.PathLike, name: str | None = None, *, max_pixels: int = MAX_PIXELS
) -> np.ndarray:
  """uint8 RGB (H, W, 3) of a file's bytes or path, by the module's rules; raises BadImage."""
  return np.array(decode(data, name, max_pixels=max_pixels)[0], dtype=np.uint8)


def read_with_notes(
  data: bytes | str | os.PathLike, name: str | None = None, *, max_pixels: int = MAX_PIXELS
) -> tuple[np.ndarray, list[str]]:
  """(uint8 RGB (H, W, 3), notes saying what was converted); raises BadImage."""
  im, notes = decode(data, name, max_pixels=max_pixels)
  return np.array(im, dtype=np.uint8), notes


def square(im: Image.Image, resolution: int) -> np.ndarray:
  """Centre-crops to the largest square, resizes to `resolution`: uint8 (R, R, 3).

  Pillow's bicubic filter widens with the scale factor, so shrinking is antialiased.
  """
  w, h = im.size
  side = min(w, h)
  left, top = (w - side) // 2, (h - side) // 2
  if (w, h) != (side, side):
    im = im.crop((left, top, left + side, top + side))
  if side != resolution:
    im = im.resize((resolution, resolution), Image.Resampling.BICUBIC)
  return np.array(im, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# Folders.


def _hidden(part: str) -> bool:
  # Dot-files are never inputs: macOS '._x.jpg' forks, editors' and our own atomic temp files.
  return part.startswith('.')


def list_files(
  directory: str | os.PathLike,
  *,
  extensions: Sequence[str] | None = EXTENSIONS,
  recursive: bool = True,
) -> list[str]:
  """Paths of the files below `directory` (any nesting, e.g. FFHQ's 00000/00000.png), sorted by
  their relative path, so the order is the same on every machine.

  Hidden files and folders are skipped. `extensions=None` keeps every file (restore reports the
  ones that are not images instead of silently ignoring them). Raises FileNotFoundError when
  `directory` is not a folder or holds no such file.
  """
  exts = None if extensions is None else tuple(e.lower() for e in extensions)
  d = files.absolute(directory)  # a local folder or a bucket prefix: one walk for both
  if not files.isdir(d):
    raise FileNotFoundError(f'image folder {d!r} does not exist (or is not a folder)')
  entries = [
    (rel, files.join(d, rel)) for rel in files.walk_files(d) if recursive or '/' not in rel
  ]
  found = []
  for rel, p in entries:
    if any(_hidden(part) for part in rel.split('/')):
      continue
    if exts is None or posixpath.splitext(rel)[1].lower() in exts:
      found.append((rel, p))
  if not found:
    what = 'files' if exts is None else f'images (looked for {", ".join(exts)})'
    where = ' in all subfolders' if recursive else ''
    raise FileNotFoundError(f'image folder {str(d)!r} holds no {what}{where}')
  return [path for _, path in sorted(found)]


def list_images(directory: str | os.PathLike, *, recursive: bool = True) -> list[str]:
  """The image files (by EXTENSIONS) below `directory`, sorted; see list_files."""
  return list_files(directory, recursive=recursive)


def is_image_name(path: str | os.PathLike) -> bool:
  return pathlib.Path(path).suffix.lower() in EXTENSIONS


# ---------------------------------------------------------------------------------------------
# Pixel ranges. Written with array methods only, so they work on numpy and jax arrays alike
# (traced ones too) and this module needs no jax.


def encode(image: np.ndarray, fmt: str = 'PNG', **options) -> bytes:
  """An RGB (or grayscale) uint8 image as the bytes of a file in `fmt`; `options` go to Pillow
  (PNG `compress_level`, JPEG `quality`)."""
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, format=fmt, **options)
  return buf.getvalue()


def save(path: files.PathLike, image: np.ndarray) -> None:
  """Writes an RGB uint8 image atomically (local or gs://); the format follows the extension:
  JPEG (quality 95) for .jpg and .jpeg, PNG otherwise."""
  if os.fspath(path).lower().endswith(('.jpg', '.jpeg')):
    files.write_atomic(path, encode(image, 'JPEG', quality=95))
  else:
    files.write_atomic(path, encode(image, 'PNG'))


def to_model_range(images_uint8) -> 'np.ndarray':
  """uint8 [0, 255] -> float32 [-1, 1]; numpy in, numpy out; jax in, jax out."""
  return images_uint8.astype(np.float32) / 127.5 - 1.0


def to_uint8(images: Iterable) -> np.ndarray:
  """float [-1, 1] -> uint8, rounded (not truncated, which would darken by half a level)."""
  return np.clip(np.rint((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
