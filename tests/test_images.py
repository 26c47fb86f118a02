"""The one image reader: its decoding rules, its errors, the lister, and that every entry point
(training, make_testset, restore and its web demo, evaluate, generate) decodes a file the same."""

import io
import pathlib
import struct
import types
import zlib

import cv2
import ml_collections
import numpy as np
from PIL import Image
import pytest
from skimage import data

from idm_jax import app
from idm_jax import restore
from idm_jax import score
from idm_jax.data import make_testset
from idm_jax.data import sources
from idm_jax.inference import generate
from idm_jax.storage import images

R = 48  # every test file is R x R, so the square crop and resize of training are no-ops


def _gradient(h, w):
  """A colourful image in which every rotation and flip is distinguishable."""
  y, x = np.mgrid[0:h, 0:w]
  return np.stack(
    [x * 255 // (w - 1), y * 255 // (h - 1), (x * y) * 255 // ((h - 1) * (w - 1))], -1
  ).astype(np.uint8)


def _phone_jpeg(path):
  """A JPEG stored sideways with EXIF Orientation 6 (what phones write): shown rotated 90
  degrees clockwise. Returns the upright pixels a viewer shows."""
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(_gradient(R, R)).save(path, quality=95, exif=exif)
  with Image.open(path) as im:
    stored = np.asarray(im.convert('RGB'))  # Pillow alone ignores the tag
  return np.rot90(stored, k=-1)  # clockwise


def _rgba_png(path):
  """Half-transparent red over a gradient of alpha. Returns it composited on white."""
  a = np.zeros((R, R, 4), np.uint8)
  a[..., 0], a[..., 1], a[..., 2] = 200, 40, 10
  a[..., 3] = np.linspace(0, 255, R).astype(np.uint8)[None, :]
  Image.fromarray(a, 'RGBA').save(path)
  alpha = a[..., 3:].astype(float) / 255
  return np.rint(a[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)


def _png16(path):
  """A 16-bit RGB PNG whose values are not multiples of 257, so rounding x / 257 and keeping the
  high byte (Pillow's own reduction) give different pixels. Returns the rounded 8-bit image."""
  rng = np.random.default_rng(0)
  a = rng.integers(0, 65536, (R, R, 3), dtype=np.uint16)
  a[0, 0] = (65535, 0, 257 * 100 + 129)  # 255, 0 and 100.5 -> 101 (the high byte gives 100)
  cv2.imwrite(str(path), a[..., ::-1])  # cv2 writes BGR
  return ((a.astype(np.int64) + 128) // 257).astype(np.uint8)


FILES = {'phone.jpg': _phone_jpeg, 'rgba.png': _rgba_png, 'deep16.png': _png16}


@pytest.fixture(scope='module')
def odd_files(tmp_path_factory):
  """{name: (path, the pixels it must decode to)} of the three files every entry point reads."""
  d = tmp_path_factory.mktemp('odd')
  return {name: (d / name, make(d / name)) for name, make in FILES.items()}


class _Bar:
  def write(self, line):
    pass


def _via_generate(path, tmp_path, monkeypatch):
  """generate.run with `path` already in place as sample 0: it reads it back for the grid."""
  out = tmp_path / 'generated'
  out.mkdir()
  (out / '000000.png').write_bytes(path.read_bytes())
  config = ml_collections.ConfigDict(
    {
      'seed': 0,
      'model': {'conditional': False},
      'generate': {'out_dir': str(out), 'num_samples': 1, 'batch_size': 1},
    }
  )
  # Every sample exists: it never samples (one process: no lockstep).
  restorer = types.SimpleNamespace(config=config, lockstep=False)
  monkeypatch.setattr(generate.engine, 'load', lambda w, c: (restorer, 1))
  generate.run(config, str(tmp_path))
  grid = np.asarray(Image.open(tmp_path / 'generated_grid.png').convert('RGB'))
  return grid[2 : 2 + R, 2 : 2 + R]  # image_grid's 2 px padding


@pytest.mark.parametrize('name', sorted(FILES))
def test_every_entry_point_decodes_the_same(odd_files, name, tmp_path, monkeypatch):
  path, want = odd_files[name]
  got = {
    'images.read': images.read(path),
    'training (sources.load_image)': sources.load_image(path, R),
    'training (FolderSource)': sources.FolderSource((str(path),), R)[0]['image'],
    'make_testset': make_testset.load_square(path, R),
    'restore': restore._read(str(path), restore._Report(_Bar()), images.MAX_PIXELS),
    'web demo': app.preview_file(str(path))[1],
    'score': score.read_image(path),
    'generate': _via_generate(path, tmp_path, monkeypatch),
  }
  for entry, image in got.items():
    assert image.shape == (R, R, 3) and image.dtype == np.uint8, entry
    # JPEG and the alpha blend may round differently from this test's float arithmetic by one
    # level; every entry point must agree with the reader exactly.
    assert np.abs(image.astype(int) - want).max() <= (1 if name == 'rgba.png' else 0), entry
    np.testing.assert_array_equal(image, got['images.read'], err_msg=entry)


def test_the_rules_are_not_what_pillow_does_alone(odd_files):
  # What each file would decode to without the rules: the test files really exercise them.
  path, want = odd_files['phone.jpg']
  assert not np.array_equal(np.asarray(Image.open(path).convert('RGB')), want)
  path, want = odd_files['rgba.png']
  assert np.abs(np.asarray(Image.open(path).convert('RGB')).astype(int) - want).max() > 100
  path, want = odd_files['deep16.png']
  pillow = np.asarray(Image.open(path).convert('RGB'))
  assert pillow[0, 0, 2] == 100 and want[0, 0, 2] == 101
  assert tuple(images.read(path)[0, 0]) == (255, 0, 101)


# --- the rules and the errors, one by one (these came from test_restore.py) ----------------


def _png_header_only(width, height):
  """A small PNG whose header claims width x height: a 'decompression bomb'."""

  def chunk(kind, payload):
    return (
      struct.pack('>I', len(payload))
      + kind
      + payload
      + struct.pack('>I', zlib.crc32(kind + payload) & 0xFFFFFFFF)
    )

  ihdr = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
  return (
    b'\x89PNG\r\n\x1a\n'
    + chunk(b'IHDR', ihdr)
    + chunk(b'IDAT', zlib.compress(b''))
    + chunk(b'IEND', b'')
  )


def test_read_image_converts_what_it_can(tmp_path):
  gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
  Image.fromarray(gray, 'L').save(tmp_path / 'gray.png')
  img, notes = images.read_with_notes(str(tmp_path / 'gray.png'))
  assert img.shape == (8, 8, 3) and img.dtype == np.uint8
  assert all(np.array_equal(img[..., c], gray) for c in range(3))
  assert any('grayscale' in n for n in notes)

  rgba = np.zeros((4, 4, 4), np.uint8)
  rgba[0, 0] = (255, 0, 0, 0)  # fully transparent red -> white background
  rgba[0, 1] = (0, 0, 255, 255)  # opaque blue stays blue
  Image.fromarray(rgba, 'RGBA').save(tmp_path / 'rgba.png')
  img, notes = images.read_with_notes(str(tmp_path / 'rgba.png'))
  assert tuple(img[0, 0]) == (255, 255, 255) and tuple(img[0, 1]) == (0, 0, 255)
  assert any('transparency' in n for n in notes)

  g16 = np.array([[0, 257 * 100, 65535]], np.uint16)
  cv2.imwrite(str(tmp_path / 'g16.png'), g16)
  img, notes = images.read_with_notes(str(tmp_path / 'g16.png'))
  np.testing.assert_array_equal(img[0, :, 0], [0, 100, 255])
  assert any('16-bit' in n for n in notes)

  c16 = np.full((2, 2, 3), 257 * 200, np.uint16)
  cv2.imwrite(str(tmp_path / 'c16.png'), c16)
  img, notes = images.read_with_notes(str(tmp_path / 'c16.png'))
  assert np.all(np.abs(img.astype(int) - 200) <= 1) and any('16-bit' in n for n in notes)

  # EXIF orientation 6 (rotate 90 degrees): the result comes out upright, i.e. transposed size.
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.new('RGB', (40, 20), (10, 20, 30)).save(tmp_path / 'rot.jpg', exif=exif)
  img, notes = images.read_with_notes(str(tmp_path / 'rot.jpg'))
  assert img.shape == (40, 20, 3) and notes == []


def test_read_image_rejects_bad_files(tmp_path):
  good = io.BytesIO()
  Image.fromarray(data.astronaut()).save(good, format='JPEG')
  cases = {
    'empty.png': (b'', 'empty file'),
    'notes.txt': (b'hello, not an image\n' * 20, 'not an image'),
    'trunc.jpg': (good.getvalue()[:3000], 'corrupt or truncated'),
    'bomb.png': (_png_header_only(8000, 6000), 'too large: 8000x6000 = 48.0 MP'),
  }
  for name, (content, msg) in cases.items():
    (tmp_path / name).write_bytes(content)
    with pytest.raises(images.BadImage, match=msg):
      images.read_with_notes(str(tmp_path / name))
  (tmp_path / 'ok.jpg').write_bytes(good.getvalue())
  with pytest.raises(images.BadImage, match='over the 0.1 MP limit'):
    images.read_with_notes(str(tmp_path / 'ok.jpg'), max_pixels=100_000)


def test_errors_name_the_file_and_the_problem(tmp_path):
  good = io.BytesIO()
  Image.fromarray(data.astronaut()).save(good, format='JPEG')
  cases = {
    'trunc.jpg': (good.getvalue()[: len(good.getvalue()) // 2], images.CORRUPT, 'truncated'),
    'page.png': (b'<html>not a picture</html>\n', images.NOT_AN_IMAGE, 'not an image'),
    'huge.png': (_png_header_only(20000, 20000), images.TOO_LARGE, 'over the 40 MP limit'),
    'void.jpg': (b'', images.EMPTY, 'empty file'),
  }
  for name, (content, kind, words) in cases.items():
    (tmp_path / name).write_bytes(content)
    with pytest.raises(images.BadImage) as e:
      images.read(tmp_path / name)
    assert str(e.value).startswith(f'{tmp_path / name}: '), str(e.value)
    assert e.value.name == str(tmp_path / name) and e.value.kind == kind, name
    assert words in e.value.reason, (name, e.value.reason)
    # Bytes (a dataset record) are named by the caller.
    with pytest.raises(images.BadImage, match='^record_3: '):
      images.read(content, 'record_3')
  with pytest.raises(images.BadImage, match='cannot read file') as e:
    images.read(tmp_path / 'missing.png')
  assert e.value.kind == images.UNREADABLE


def test_the_pixel_limit_is_checked_before_decoding(tmp_path, monkeypatch):
  # The header claims 48 MP over 2 KB; refusing it must not decode (or allocate) anything.
  path = tmp_path / 'bomb.png'
  path.write_bytes(_png_header_only(8000, 6000))
  monkeypatch.setattr(Image.Image, 'load', lambda self: pytest.fail('decoded a bomb'))
  with pytest.raises(images.BadImage, match='over the 40 MP limit'):
    images.read(path)
  with pytest.raises(images.BadImage, match='over the 1e-05 MP limit'):
    images.read(path, max_pixels=10)


def test_16bit_gray_and_rgba_scale_by_rounding(tmp_path):
  g = np.array([[0, 128, 257 * 7 + 129, 65535]], np.uint16)  # 0, 0.498 -> 0, 7.502 -> 8, 255
  cv2.imwrite(str(tmp_path / 'g16.png'), g)
  np.testing.assert_array_equal(images.read(tmp_path / 'g16.png')[0, :, 0], [0, 0, 8, 255])
  a = np.zeros((1, 2, 4), np.uint16)
  a[0, 0] = (257 * 9 + 200, 0, 0, 65535)  # opaque: the rounded colour, 10
  a[0, 1] = (65535, 65535, 0, 0)  # fully transparent: white
  cv2.imwrite(str(tmp_path / 'rgba16.png'), a[..., [2, 1, 0, 3]])
  img, notes = images.read_with_notes(tmp_path / 'rgba16.png')
  assert tuple(img[0, 0]) == (10, 0, 0) and tuple(img[0, 1]) == (255, 255, 255)
  assert '16-bit image scaled to 8 bits' in notes and any('transparency' in n for n in notes)


def test_exif_orientation_flips_and_rotations(tmp_path):
  upright = _gradient(12, 20)
  # Orientation tag -> what the stored pixels need to become upright (EXIF 2.3 table).
  undo = {
    1: lambda a: a,
    2: np.fliplr,
    3: lambda a: np.rot90(a, 2),
    4: np.flipud,
    5: lambda a: np.transpose(a, (1, 0, 2)),
    6: lambda a: np.rot90(a, -1),
    8: lambda a: np.rot90(a, 1),
  }
  for tag, fn in undo.items():
    # Store the pixels such that undoing the tag gives `upright` (PNG: lossless, exact).
    stored = upright
    for _ in range(4):  # fn is its own inverse or has order 4; find the preimage
      if np.array_equal(fn(stored), upright):
        break
      stored = fn(stored)
    exif = Image.Exif()
    exif[0x0112] = tag
    Image.fromarray(np.ascontiguousarray(stored)).save(tmp_path / f'o{tag}.png', exif=exif)
    np.testing.assert_array_equal(
      images.read(tmp_path / f'o{tag}.png'), upright, err_msg=f'orientation {tag}'
    )


def test_list_files_sorted_hidden_skipped_and_recursion(tmp_path):
  for rel in (
    'b/2.png',
    'a/10.JPG',
    'a/9.webp',
    'top.tiff',
    'notes.txt',
    '.hidden.png',
    '.cache/x.png',
    'a/.~tmp.png.123.tmp',
  ):
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_bytes(b'x')
  (tmp_path / 'folder.png').mkdir()
  rel = lambda ps: [pathlib.Path(p).relative_to(tmp_path).as_posix() for p in ps]
  assert rel(images.list_images(tmp_path)) == ['a/10.JPG', 'a/9.webp', 'b/2.png', 'top.tiff']
  assert rel(images.list_images(tmp_path, recursive=False)) == ['top.tiff']
  assert rel(images.list_files(tmp_path, extensions=None)) == [
    'a/10.JPG',
    'a/9.webp',
    'b/2.png',
    'notes.txt',
    'top.tiff',
  ]
  (tmp_path / 'only_hidden').mkdir()
  (tmp_path / 'only_hidden' / '.x.png').write_bytes(b'x')
  with pytest.raises(FileNotFoundError, match='holds no images'):
    images.list_images(tmp_path / 'only_hidden')
  # A folder the user names is read even if hidden itself: only names inside it are skipped.
  assert rel(images.list_images(tmp_path / '.cache')) == ['.cache/x.png']
  with pytest.raises(FileNotFoundError, match='does not exist'):
    images.list_images(tmp_path / 'missing')


def test_pixel_ranges_round_trip_on_numpy_and_jax():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  x = np.arange(256, dtype=np.uint8)
  f = images.to_model_range(x)
  assert f.dtype == np.float32 and f[0] == -1 and f[-1] == 1
  np.testing.assert_array_equal(images.to_uint8(f), x)
  fj = images.to_model_range(jnp.asarray(x))
  assert isinstance(fj, jnp.ndarray) and fj.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(fj), f, atol=1e-6)  # XLA may differ by an ulp
  # Rounded, not truncated: just under a level's midpoint stays, just over goes up.
  assert images.to_uint8(np.array([(10.49 / 127.5) - 1, (10.51 / 127.5) - 1])).tolist() == [10, 11]


@pytest.mark.parametrize('fmt', ['GIF', 'TIFF'])
def test_an_animated_or_multi_page_file_says_only_its_first_frame_is_used(tmp_path, fmt):
  frames = [Image.new('RGB', (16, 16), (40 * i, 0, 0)) for i in range(3)]
  path = tmp_path / f'x.{fmt.lower()}'
  frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:])
  img, notes = images.read_with_notes(str(path))
  assert img.shape == (16, 16, 3) and img[0, 0, 0] == 0  # the first frame
  assert '3 frames (animated or multi-page): only the first is used' in notes
