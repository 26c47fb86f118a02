"""Image decoding rules, bad-file handling, folder listing/splits and the built-in faces."""

import pathlib
import shutil
import socket

import cv2
import numpy as np
from PIL import Image
import pytest

from idm_jax.data import sources
from idm_jax.storage import images

R = 32


def _png(path, array, mode=None):
  Image.fromarray(array, mode).save(path, format='PNG') if mode else Image.fromarray(array).save(
    path, format='PNG'
  )
  return path


def _gradient(h, w):
  """A colourful test image whose crops and flips are all distinguishable."""
  y, x = np.mgrid[0:h, 0:w]
  return np.stack(
    [x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 255 // max(h + w - 2, 1)], -1
  ).astype(np.uint8)


# --- rejected files ------------------------------------------------------------------------------


@pytest.mark.parametrize(
  'kind, reason',
  [
    ('empty', 'empty'),
    ('truncated', 'truncated'),
    ('text', 'not an image'),
    ('tiny', 'too small'),
  ],
)
def test_bad_files_raise_naming_the_file(tmp_path, celeba_dir, kind, reason):
  jpeg = (celeba_dir / '201600.jpg').read_bytes()
  path = tmp_path / f'{kind}_file.png'
  if kind == 'empty':
    path.write_bytes(b'')
  elif kind == 'truncated':
    path = tmp_path / 'truncated_file.jpg'
    path.write_bytes(jpeg[: len(jpeg) // 2])
  elif kind == 'text':
    path.write_text('this is not a picture\n')
  elif kind == 'tiny':
    _png(path, _gradient(R // 4 - 1, 40))  # short side 7 < 32/4
  with pytest.raises(images.BadImage) as e:
    sources.load_image(str(path), R)
  assert path.name in str(e.value)
  assert e.value.name == str(path)
  assert reason in e.value.reason.lower()
  # The same bytes with an explicit name (TFDS records) name that instead.
  with pytest.raises(images.BadImage, match='record_7'):
    sources.load_image(path.read_bytes(), R, 'record_7')


def test_missing_file_is_a_bad_image(tmp_path):
  with pytest.raises(images.BadImage, match='nope.png'):
    sources.load_image(tmp_path / 'nope.png', R)


def test_exactly_a_quarter_is_accepted_and_upscaled(tmp_path):
  out = sources.load_image(_png(tmp_path / 'q.png', _gradient(R // 4, R // 4)), R)
  assert out.shape == (R, R, 3) and out.dtype == np.uint8


# --- converted files -----------------------------------------------------------------------------


def test_grayscale_expands_to_equal_channels(tmp_path):
  g = _gradient(R, R)[..., 0]
  out = sources.load_image(_png(tmp_path / 'g.png', g), R)
  assert out.shape == (R, R, 3)
  np.testing.assert_array_equal(out[..., 0], g)
  np.testing.assert_array_equal(out[..., 1], g)
  np.testing.assert_array_equal(out[..., 2], g)


def test_16bit_gray_png_scales_not_clips(tmp_path):
  g = np.zeros((R, R), np.uint16)
  g[:, : R // 2] = 65535
  g[:, R // 2 :] = 257 * 100
  cv2.imwrite(str(tmp_path / 'g16.png'), g)
  assert Image.open(tmp_path / 'g16.png').mode.startswith('I')  # really 16-bit on disk
  out = sources.load_image(tmp_path / 'g16.png', R)
  assert (out[:, : R // 2] == 255).all()
  assert (out[:, R // 2 :] == 100).all()  # clipping would give 255 here


def test_16bit_rgb_png_scales(tmp_path):
  a = np.zeros((R, R, 3), np.uint16)
  a[..., 0], a[..., 1], a[..., 2] = 65535, 257 * 100, 0
  cv2.imwrite(str(tmp_path / 'rgb16.png'), a[..., ::-1])  # cv2 writes BGR
  out = sources.load_image(tmp_path / 'rgb16.png', R)
  assert (out[..., 0] == 255).all() and (out[..., 1] == 100).all() and (out[..., 2] == 0).all()


def test_rgba_composited_on_white(tmp_path):
  a = np.zeros((R, R, 4), np.uint8)
  a[..., 0] = 200  # red channel
  a[:, : R // 2, 3] = 255  # left half opaque, right half fully transparent
  a[:, R // 2 :, 3] = 0
  out = sources.load_image(_png(tmp_path / 'rgba.png', a), R)
  assert (out[:, : R // 2 - 2] == [200, 0, 0]).all()
  assert (out[:, R // 2 + 2 :] == [255, 255, 255]).all()


def test_la_composited_and_gray(tmp_path):
  a = np.zeros((R, R, 2), np.uint8)
  a[..., 0] = 50
  a[..., 1] = 128  # half transparent: 50*0.5 + 255*0.5 ~ 152
  out = sources.load_image(_png(tmp_path / 'la.png', a, 'LA'), R)
  assert Image.open(tmp_path / 'la.png').mode == 'LA'
  assert np.abs(out.astype(int) - 152).max() <= 1
  assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_palette_with_transparency(tmp_path):
  p = np.zeros((R, R), np.uint8)
  p[:, R // 2 :] = 1
  im = Image.fromarray(p, 'P')
  im.putpalette([10, 20, 30, 0, 255, 0] + [0] * 762)
  im.info['transparency'] = 1  # palette entry 1 (green) is transparent
  im.save(tmp_path / 'pal.png', transparency=1)
  assert Image.open(tmp_path / 'pal.png').mode == 'P'
  out = sources.load_image(tmp_path / 'pal.png', R)
  assert (out[:, : R // 2 - 2] == [10, 20, 30]).all()
  assert (out[:, R // 2 + 2 :] == [255, 255, 255]).all()


def test_cmyk_jpeg_becomes_rgb(tmp_path, celeba_dir):
  rgb = sources.load_image(celeba_dir / '201600.jpg', 128)
  Image.fromarray(rgb).convert('CMYK').save(tmp_path / 'cmyk.jpg', quality=98)
  assert Image.open(tmp_path / 'cmyk.jpg').mode == 'CMYK'
  out = sources.load_image(tmp_path / 'cmyk.jpg', 128)
  # JPEG is lossy; an inverted or channel-swapped decode would be off by ~100.
  assert np.abs(out.astype(int) - rgb).mean() < 4


def test_non_square_centre_crop(tmp_path):
  wide = _gradient(R, 3 * R)
  out = sources.load_image(_png(tmp_path / 'wide.png', wide), R)
  np.testing.assert_array_equal(out, wide[:, R : 2 * R])  # the middle third, no resize needed
  tall = _gradient(2 * R, R)
  out = sources.load_image(_png(tmp_path / 'tall.png', tall), R)
  np.testing.assert_array_equal(out, tall[R // 2 : R // 2 + R])


def test_downscale_is_antialiased(tmp_path):
  # 1-pixel stripes average to grey with a proper filter; point sampling would keep 0 or 255.
  stripes = np.zeros((4 * R, 4 * R), np.uint8)
  stripes[:, ::2] = 255
  out = sources.load_image(_png(tmp_path / 's.png', stripes), R)
  assert np.abs(out[:, 2:-2].astype(int) - 128).max() <= 3  # edges see the border padding


def test_large_jpeg_draft_decoding_matches_full_decode(tmp_path, celeba_dir):
  # load_image lets libjpeg decode big JPEGs at a reduced scale; it must stay close to a full
  # decode followed by an antialiased resize.
  big = cv2.resize(
    sources.load_image(celeba_dir / '201601.jpg', 128), (512, 512), interpolation=cv2.INTER_CUBIC
  )
  Image.fromarray(big).save(tmp_path / 'big.jpg', quality=95)
  fast = sources.load_image(tmp_path / 'big.jpg', 64).astype(int)
  full = Image.open(tmp_path / 'big.jpg').convert('RGB').resize((64, 64), Image.BICUBIC)
  assert np.abs(fast - np.asarray(full, int)).mean() < 3


def test_real_jpeg_loads(celeba_dir):
  out = sources.load_image(celeba_dir / '201600.jpg', 128)
  ref = np.asarray(Image.open(celeba_dir / '201600.jpg').convert('RGB'))
  np.testing.assert_array_equal(out, ref)  # already 128: decoded untouched


# --- folders -------------------------------------------------------------------------------------


def test_list_images_recursive_sorted(tmp_path):
  for rel in ('b/00001/x.PNG', 'a/00000/y.jpg', 'a/z.webp', 'c.bmp', 'd.tif', 'e.jpeg'):
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_bytes(b'x')
  (tmp_path / 'notes.txt').write_text('no')
  (tmp_path / 'dir.png').mkdir()  # a folder named like an image is not an image
  got = [pathlib.Path(p).relative_to(tmp_path).as_posix() for p in images.list_images(tmp_path)]
  assert got == sorted(got)
  assert set(got) == {'b/00001/x.PNG', 'a/00000/y.jpg', 'a/z.webp', 'c.bmp', 'd.tif', 'e.jpeg'}


def test_list_images_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    images.list_images(tmp_path / 'missing')
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'empty' / 'readme.txt').write_text('x')
  with pytest.raises(FileNotFoundError, match='no images'):
    images.list_images(tmp_path / 'empty')


def test_folder_source_flags_bad_records(tmp_path, celeba_dir):
  shutil.copy(celeba_dir / '201600.jpg', tmp_path / 'good.jpg')
  (tmp_path / 'bad.png').write_text('nope')
  src = sources.FolderSource(tuple(images.list_images(tmp_path)), R, root=str(tmp_path))
  bad, good = src[0], src[1]
  assert bad['image'] is None and bad['name'] == 'bad.png' and 'not an image' in bad['error']
  assert sources.is_bad(bad) and not sources.is_bad(good)
  assert good['name'] == 'good.jpg' and good['image'].shape == (R, R, 3)


def test_make_source_folder_splits(test_config, celeba_dir):
  d = test_config.data
  d.update(source='folder', dir=str(celeba_dir), num_val=100, resolution=R)
  train = sources.make_source(d, 'train')
  val = sources.make_source(d, 'validation')
  names = sorted(p.name for p in celeba_dir.iterdir())
  assert len(train) == 800 and len(val) == 100
  assert [val._name(p) for p in val.paths] == names[800:]
  assert train[0]['name'] == names[0] and val[99]['name'] == names[-1]
  d.max_examples = 10
  assert len(sources.make_source(d, 'train')) == 10
  assert len(sources.make_source(d, 'validation')) == 100  # max_examples is train only
  d.num_val = 900
  with pytest.raises(ValueError, match='num_val'):
    sources.make_source(d, 'train')


# --- built-in faces ------------------------------------------------------------------------------


def test_builtin_faces_distinct_deterministic_offline(monkeypatch, test_config):
  def no_network(*args, **kwargs):
    raise AssertionError('the built-in faces tried to use the network')

  monkeypatch.setattr(socket.socket, 'connect', no_network)
  sources.builtin_faces.cache_clear()
  sources._builtin_photo.cache_clear()
  d = test_config.data
  d.resolution = 64
  train = sources.make_source(d, 'train')
  val = sources.make_source(d, 'validation')
  assert len(train) == sources.BUILTIN_TRAIN_SIZE and len(val) == sources.BUILTIN_VAL_SIZE
  imgs = np.stack(
    [train[i]['image'] for i in range(len(train))] + [val[i]['image'] for i in range(len(val))]
  ).astype(np.float32)
  assert imgs.shape[1:] == (64, 64, 3)
  # Pairwise distinct (no duplicated crop, validation crops differ from all training crops).
  flat = imgs.reshape(len(imgs), -1)
  dist = np.abs(flat[:, None] - flat[None]).mean(-1)
  np.fill_diagonal(dist, np.inf)
  assert dist.min() > 1.0
  # Real picture content, not blank or constant.
  assert imgs.std(axis=(1, 2, 3)).min() > 20
  assert len({train[i]['name'] for i in range(len(train))}) == len(train)
  # Deterministic: rebuilt from scratch, the same pixels.
  first = train[5]['image'].copy()
  sources.builtin_faces.cache_clear()
  np.testing.assert_array_equal(sources.make_source(d, 'train')[5]['image'], first)
  d.max_examples = 10
  assert len(sources.make_source(d, 'train')) == 10


def test_builtin_face_box_holds_a_face():
  # scikit-image's LBP frontal-face cascade (shipped in its wheel) finds a face in the
  # astronaut and Grace Hopper crops: guards the hand-set boxes.
  from skimage import data  # pylint: disable=g-import-not-at-top
  from skimage import feature  # pylint: disable=g-import-not-at-top

  detector = feature.Cascade(data.lbp_frontal_face_cascade_filename())
  for i in (0, 1):  # sources._BUILTIN_FACES order: astronaut, grace_hopper
    face = sources.builtin_faces('train', 128)[i][1]
    found = detector.detect_multi_scale(
      face, scale_factor=1.2, step_ratio=1, min_size=(40, 40), max_size=(128, 128)
    )
    assert found, f'no face found in built-in crop {i}'
