"""dlib identity similarity on real faces (skipped where dlib is not installed)."""

import cv2
import numpy as np
from PIL import Image
import pytest

from idm_jax.metrics import identity

pytest.importorskip('dlib')
if identity.unavailable_reason():
  pytest.skip(identity.unavailable_reason(), allow_module_level=True)


@pytest.fixture(scope='module')
def faces(celeba_dir):
  paths = sorted(celeba_dir.glob('*.jpg'))[:4]
  return [np.asarray(Image.open(p).convert('RGB')) for p in paths]


def test_identical_faces_score_one(faces):
  sim, fell_back = identity.identity_similarity(faces[0], faces[0])
  assert sim == pytest.approx(1.0, abs=1e-6)
  assert not fell_back  # real aligned 128 px faces are detected


def test_same_person_beats_different_people(faces):
  for i, face in enumerate(faces):
    blurred = cv2.GaussianBlur(face, (0, 0), 1.0)
    same, _ = identity.identity_similarity(blurred, face)
    other, _ = identity.identity_similarity(faces[(i + 1) % len(faces)], face)
    assert same > 0.97
    assert same > other + 0.1


def test_no_face_falls_back_to_whole_image(faces):
  flat = np.full_like(faces[0], 128)
  sim, fell_back = identity.identity_similarity(flat, flat)
  assert fell_back and sim == pytest.approx(1.0, abs=1e-6)
  scores = identity.identity_scores([faces[0], flat], [faces[0], flat])
  assert scores['fallbacks'] == 1 and len(scores['per_image']) == 2


def test_model_paths_and_errors():
  assert identity.model_path('landmarks68').endswith('shape_predictor_68_face_landmarks.dat')
  with pytest.raises(KeyError, match='unknown dlib model'):
    identity.model_path('nope')
  with pytest.raises(ValueError, match='differ in shape'):
    identity.identity_similarity(np.zeros((8, 8, 3), np.uint8), np.zeros((9, 8, 3), np.uint8))


def test_small_faces_are_found_after_upscaling(faces):
  """64 px aligned faces (the CPU config's size) are detected, not scored as whole images."""
  small = [np.asarray(Image.fromarray(f).resize((64, 64), Image.BICUBIC)) for f in faces]
  scores = identity.identity_scores(small, small)
  assert scores['fallbacks'] == 0
  same, fell_back = identity.identity_similarity(cv2.GaussianBlur(small[0], (0, 0), 0.7), small[0])
  other, _ = identity.identity_similarity(small[1], small[0])
  assert not fell_back and same > other + 0.05
