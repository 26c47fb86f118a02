"""Where the `face_recognition_models` files are: dlib's landmark predictors, face-recognition
net and CNN detector, shipped in that pip package (nothing is downloaded).

One locator for the two users: face alignment (`faces`) and the identity metric
(`metrics.identity`). It only finds files; loading them needs dlib, which each user imports and
explains itself.
"""

from __future__ import annotations

import importlib.util
import os

MODEL_FILES = {
  'recognition': 'dlib_face_recognition_resnet_model_v1.dat',
  'landmarks5': 'shape_predictor_5_face_landmarks.dat',
  'landmarks68': 'shape_predictor_68_face_landmarks.dat',
  'cnn_detector': 'mmod_human_face_detector.dat',
}
PACKAGE = 'face_recognition_models'


class ModelFileMissing(RuntimeError):
  """The package or one of its files is not there; the message says what to install."""


def model_path(name: str) -> str:
  """Path of one of the package's files (a key of MODEL_FILES); raises ModelFileMissing."""
  if name not in MODEL_FILES:
    raise KeyError(f'unknown dlib model {name!r}; choose one of {sorted(MODEL_FILES)}')
  # find_spec, not import: the package's __init__ imports pkg_resources, which new setuptools
  # no longer ships, and we only need the folder.
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or not spec.origin:
    raise ModelFileMissing(f'the {PACKAGE} package is not installed (pip install {PACKAGE})')
  path = os.path.join(os.path.dirname(spec.origin), 'models', MODEL_FILES[name])
  if not os.path.isfile(path):
    raise ModelFileMissing(f'dlib model file {path!r} is missing; reinstall {PACKAGE}')
  return path
