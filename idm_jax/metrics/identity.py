"""Identity similarity with dlib's face-recognition ResNet (offline weights).

The weights come from the `face_recognition_models` pip package, which also ships dlib's 5- and
68-point shape predictors and the CNN face detector (located by `idm_jax.storage.dlib_models`, which face
alignment uses too); `load_models()` loads the dlib objects once per process.

When dlib or the models are missing, `unavailable_reason()` says why and the evaluation reports
identity as unavailable; we never substitute a number from another model.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import numpy as np

from idm_jax.metrics import resize
from idm_jax.storage import dlib_models


class IdentityUnavailable(RuntimeError):
  """dlib or its model files cannot be loaded; the message says which and how to fix it."""


def model_path(name: str) -> str:
  """Path of one of the `face_recognition_models` files (a key of dlib_models.MODEL_FILES)."""
  try:
    return dlib_models.model_path(name)
  except dlib_models.ModelFileMissing as e:
    raise IdentityUnavailable(str(e)) from e


@dataclasses.dataclass(frozen=True)
class FaceModels:
  detector: Any  # dlib.fhog_object_detector (HOG frontal face detector)
  landmarks5: Any  # dlib.shape_predictor
  recognition: Any  # dlib.face_recognition_model_v1


@functools.lru_cache(maxsize=1)
def load_models() -> FaceModels:
  """dlib's detector, 5-point landmarks and recognition net; loaded once per process."""
  try:
    import dlib  # noqa: PLC0415 (optional: dlib)
  except ImportError as e:
    raise IdentityUnavailable(f'dlib is not importable ({e}); pip install dlib-bin') from e
  return FaceModels(
    detector=dlib.get_frontal_face_detector(),
    landmarks5=dlib.shape_predictor(model_path('landmarks5')),
    recognition=dlib.face_recognition_model_v1(model_path('recognition')),
  )


def unavailable_reason() -> str | None:
  """None when identity can be computed, else a sentence saying why not."""
  try:
    load_models()
  except IdentityUnavailable as e:
    return str(e)
  return None


def face_box(img: np.ndarray, models: FaceModels | None = None):
  """The largest detected face as a dlib.rectangle, or None when the detector finds none."""
  models = models or load_models()
  rects = models.detector(np.ascontiguousarray(img), 0)
  if len(rects) == 0:
    return None
  return max(rects, key=lambda r: r.area())


def embed(img: np.ndarray, box, models: FaceModels | None = None) -> np.ndarray:
  """128-d dlib descriptor of the face in `box` of a uint8 RGB image.

  dlib finds 5 landmarks inside the box and embeds its own aligned 150x150 chip, so the box
  only needs to contain the face roughly.
  """
  models = models or load_models()
  img = np.ascontiguousarray(img)
  shape = models.landmarks5(img, box)
  return np.asarray(models.recognition.compute_face_descriptor(img, shape), dtype=np.float64)


def _whole_image_box(img: np.ndarray):
  import dlib  # noqa: PLC0415 (optional: dlib)

  return dlib.rectangle(0, 0, img.shape[1] - 1, img.shape[0] - 1)


DESCRIPTOR_MIN_SIZE = 150


def face_descriptors(images: Sequence[np.ndarray], progress=None) -> tuple[np.ndarray, np.ndarray]:
  """dlib descriptors of a set of faces with no partner images (e.g. generated samples).

  Returns (N, 128) descriptors and an (N,) bool array saying whether the HOG detector found a
  face (else the whole image is embedded). Images under DESCRIPTOR_MIN_SIZE px are upscaled
  (Lanczos, integer factor) first: the detector misses faces under about 80 px and dlib embeds
  a 150 px chip anyway.
  """
  models = load_models()
  feats, found = [], []
  for img in progress(images) if progress is not None else images:
    img = np.asarray(img)
    img = resize.upscale_lanczos(
      img, resize.factor_to_reach(min(img.shape[:2]), DESCRIPTOR_MIN_SIZE)
    )
    box = face_box(img, models)
    found.append(box is not None)
    feats.append(embed(img, box if box is not None else _whole_image_box(img), models))
  return np.stack(feats), np.asarray(found, dtype=bool)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def identity_similarity(pred: np.ndarray, gt: np.ndarray) -> tuple[float, bool]:
  """Cosine similarity of the dlib embeddings of a restored face and its ground truth.

  Both images are aligned crops in the same coordinates, so one box serves both: the face
  found in `gt` (else in `pred`), else the whole image. Returns (similarity, fell_back), where
  fell_back says the whole image was used.
  """
  for name, x in (('pred', pred), ('gt', gt)):
    if x.ndim != 3 or x.shape[-1] != 3 or x.dtype != np.uint8:
      raise ValueError(f'identity: {name} must be uint8 RGB (H, W, 3), got {x.dtype} {x.shape}')
  if pred.shape != gt.shape:
    raise ValueError(f'identity: images differ in shape, {pred.shape} vs {gt.shape}')
  # As in face_descriptors: the detector misses faces under about 80 px (every 64 px face).
  factor = resize.factor_to_reach(min(gt.shape[:2]), DESCRIPTOR_MIN_SIZE)
  pred, gt = resize.upscale_lanczos(pred, factor), resize.upscale_lanczos(gt, factor)
  models = load_models()
  box = face_box(gt, models) or face_box(pred, models)
  fell_back = box is None
  if fell_back:
    box = _whole_image_box(gt)
  return cosine(embed(pred, box, models), embed(gt, box, models)), fell_back


def identity_scores(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], progress=None) -> dict:
  """Per-image and mean identity similarity, and how many pairs fell back to the whole image.

  Raises IdentityUnavailable when dlib cannot be loaded. `progress` wraps the pair iterator
  (e.g. tqdm) when given.
  """
  load_models()
  pairs = zip(preds, gts)
  if progress is not None:
    pairs = progress(pairs)
  sims, fallbacks = [], 0
  for p, g in pairs:
    s, fb = identity_similarity(np.asarray(p), np.asarray(g))
    sims.append(s)
    fallbacks += fb
  return {
    'per_image': sims,
    'mean': float(np.mean(sims)) if sims else float('nan'),
    'fallbacks': fallbacks,
  }
