"""Whole photos: detect faces, align them to the FFHQ template, paste restored faces back.

Pipeline (as GFPGAN/CodeFormer via facexlib, written anew):
  1. a `FaceDetector` returns, per face, a box, a score and five landmarks (image x, y):
     subject's right eye centre (the eye on the image's left), left eye centre, nose tip,
     right mouth corner, left mouth corner;
  2. `similarity_transform` fits rotation + uniform scale + translation (least squares,
     no reflection) from those points to the FFHQ 5-point template scaled to the model size;
  3. `align_face` warps the face crop with cv2.warpAffine;
  4. after restoration `paste_faces` warps each face back with the inverse transform onto the
     photo upscaled by `upscale` (Lanczos) and blends it with a feathered (eroded + blurred) mask.

Detectors must come from models shipped inside pip packages (nothing is downloaded). Two are
provided, both dlib's: 'hog', the HOG frontal face detector (built into dlib, no file; fast, but
misses small, tilted and profile faces), and 'cnn', the MMOD CNN face detector
(`mmod_human_face_detector.dat`; finds more of those, at a much higher CPU cost: see
docs/PERFORMANCE.md). Either way the five points come from the 68-point shape predictor shipped
in the `face_recognition_models` package. Note that model was trained on the iBUG 300-W data,
whose licence excludes commercial use.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Protocol, Sequence, Tuple

import cv2
import numpy as np

from idm_jax.storage import dlib_models

# The 5-point FFHQ template for 512 px crops used by GFPGAN/facexlib (x, y).
FFHQ_TEMPLATE_512 = np.array(
  [
    [192.98138, 239.94708],  # eye on the image's left
    [318.90277, 240.1936],  # eye on the image's right
    [256.63416, 314.01935],  # nose tip
    [201.26117, 371.41043],  # mouth corner on the image's left
    [313.08905, 371.15118],  # mouth corner on the image's right
  ],
  np.float64,
)

DETECTOR_PACKAGES = 'dlib-bin (or dlib) and face_recognition_models'


class DetectorUnavailable(RuntimeError):
  """No face detector package is installed; the message says which to install."""


@dataclasses.dataclass
class Face:
  box: Tuple[float, float, float, float]  # left, top, right, bottom in pixels
  score: float
  landmarks: np.ndarray  # (5, 2) float64 x, y; order as FFHQ_TEMPLATE_512


class FaceDetector(Protocol):
  """The interface a detector implements, so backends can be swapped."""

  def detect(self, image: np.ndarray) -> List[Face]:
    """Faces in an RGB uint8 (H, W, 3) image, largest first."""


def template(resolution: int) -> np.ndarray:
  """The FFHQ template scaled to `resolution` px crops, in pixel-centre coordinates.

  The 512 template is in cv2's convention (pixel centres at integers), so scaling keeps the
  continuous position: (p + 0.5) * s - 0.5.
  """
  s = resolution / 512.0
  return (FFHQ_TEMPLATE_512 + 0.5) * s - 0.5


# The detectors a user chooses from (--detector); 'dlib' is the old name of 'hog'.
DETECTORS = ('hog', 'cnn')
_ALIASES = {'dlib': 'hog'}
# Per detector, since they score on different scales (HOG: an SVM margin; CNN: an MMOD
# confidence that is nearly the same for every clear face). The scores seen on clear, degraded
# and tilted faces, and so why these, are in docs/PERFORMANCE.md.
DEFAULT_MIN_SCORE = {'hog': 0.5, 'cnn': 0.3}

# The 68-point predictor starts from an upright mean shape and corrects a moderate roll only;
# on a face tilted further (the CNN detector finds those) it returns a wrong, upright-ish shape.
# So it also starts from the face turned by these angles (degrees), refits the turn to the
# roll its points show, and HOG, which scores upright faces best, picks among the fits.
ROLL_STARTS = (0.0, 35.0, -35.0)
ROLL_ITERATIONS = 3
VERIFY_BOX = 100  # px: the face's size when HOG checks it (HOG's window is 80 px)


def _import_dlib():
  try:
    import dlib  # noqa: PLC0415 (optional: dlib)
  except ImportError as e:
    raise DetectorUnavailable(
      f'whole-photo mode needs a face detector: pip install {DETECTOR_PACKAGES} '
      '(or pass --aligned for pre-aligned face crops)'
    ) from e
  return dlib


def _model_file(name: str, what: str, instead: str) -> str:
  try:
    return dlib_models.model_path(name)
  except dlib_models.ModelFileMissing as e:
    raise DetectorUnavailable(f'{what}: {e} (or {instead})') from e


def roll_degrees(pts68: np.ndarray) -> float:
  """The face's roll from 68 landmarks: the angle of the line from the image-left eye centre to
  the image-right one (degrees; positive turns the face clockwise as seen)."""
  d = pts68[42:48].mean(0) - pts68[36:42].mean(0)
  return float(np.degrees(np.arctan2(d[1], d[0])))


def turned_crop(
  image: np.ndarray, center: Tuple[float, float], angle: float, scale: float, size: int
) -> Tuple[np.ndarray, np.ndarray]:
  """(crop (size, size, 3), the (2, 3) affine image -> crop): `image` turned counter-clockwise
  by `angle` degrees about `center` and scaled by `scale`, `center` at the crop's centre."""
  affine = cv2.getRotationMatrix2D((float(center[0]), float(center[1])), float(angle), float(scale))
  affine[:, 2] += (size - 1) / 2 - np.asarray(center, np.float64)
  crop = cv2.warpAffine(
    image, affine, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
  )
  return np.ascontiguousarray(crop), affine


class DlibDetector:
  """dlib face boxes (HOG or CNN, see DETECTORS) + the 68-point predictor of
  face_recognition_models -> 5 points."""

  def __init__(self, backend: str = 'hog', upsample: int = 1, min_score: Optional[float] = None):
    if backend not in DETECTORS:
      raise ValueError(f'unknown face detector {backend!r}; available: {", ".join(DETECTORS)}')
    dlib = _import_dlib()
    self._predictor = dlib.shape_predictor(
      _model_file(
        'landmarks68',
        'whole-photo mode needs the 68-point landmark model',
        'pass --aligned for pre-aligned face crops',
      )
    )
    # HOG is built into dlib; the CNN backend uses it too, to check which turn is upright.
    self._hog = dlib.get_frontal_face_detector()
    self._cnn = None
    if backend == 'cnn':
      self._cnn = dlib.cnn_face_detection_model_v1(
        _model_file(
          'cnn_detector', "--detector cnn needs dlib's CNN face detector", 'use --detector hog'
        )
      )
    self._dlib = dlib
    self.backend = backend
    self.upsample = int(upsample)
    self.min_score = float(DEFAULT_MIN_SCORE[backend] if min_score is None else min_score)

  def boxes(self, image: np.ndarray) -> List[Tuple[object, float]]:
    """(dlib rectangle, score) per detection, in the backend's own score scale."""
    if self._cnn is not None:
      return [(d.rect, float(d.confidence)) for d in self._cnn(image, self.upsample)]
    rects, scores, _ = self._hog.run(image, self.upsample, 0.0)
    return list(zip(rects, scores))

  def detect(self, image: np.ndarray) -> List[Face]:
    image = np.ascontiguousarray(image)
    faces = []
    for rect, score in self.boxes(image):
      if score < self.min_score:
        continue
      pts = self.landmarks68(image, rect)
      faces.append(
        Face(
          box=(rect.left(), rect.top(), rect.right(), rect.bottom()),
          score=float(score),
          landmarks=five_from_68(pts),
        )
      )
    faces.sort(key=lambda f: -(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
    return faces

  def landmarks68(self, image: np.ndarray, rect) -> np.ndarray:
    """(68, 2) x, y for the face in `rect`, whatever its roll (see ROLL_STARTS)."""
    fits = [self._fit_roll(image, rect, start) for start in ROLL_STARTS]
    scores = [self._upright_score(image, rect, angle) for _, angle in fits]
    return fits[int(np.argmax(scores))][0]  # ties (no HOG view at all): the unturned start

  def _predict(self, image: np.ndarray, rect, angle: float) -> np.ndarray:
    """The predictor's 68 points on the face turned by `angle` about the box centre, in image
    coordinates; at angle 0 on the image itself."""
    if angle == 0:
      shape = self._predictor(image, rect)
      return np.array([[p.x, p.y] for p in shape.parts()], np.float64)
    center = ((rect.left() + rect.right()) / 2, (rect.top() + rect.bottom()) / 2)
    side = max(rect.width(), rect.height())
    size = 2 * side + 1
    crop, affine = turned_crop(image, center, angle, 1.0, size)
    left = (size - 1) // 2 - side // 2  # the same box, centred in the crop
    right = left + side - 1
    shape = self._predictor(crop, self._dlib.rectangle(left, left, right, right))
    pts = np.array([[p.x, p.y] for p in shape.parts()], np.float64)
    return apply_affine(cv2.invertAffineTransform(affine), pts)

  def _fit_roll(self, image: np.ndarray, rect, start: float) -> Tuple[np.ndarray, float]:
    """(68 points, roll): predict on the face turned by `start`, then turned by the roll those
    points show, until the roll stops changing."""
    angle = start
    pts = self._predict(image, rect, angle)
    for _ in range(ROLL_ITERATIONS):
      roll = roll_degrees(pts)
      if abs(roll - angle) < 2.0:  # degrees: within the predictor's own wobble
        break
      angle = roll
      pts = self._predict(image, rect, angle)
    return pts, angle

  def _upright_score(self, image: np.ndarray, rect, angle: float) -> float:
    """HOG's score for the face turned upright by `angle` (-inf if it sees none there)."""
    side = max(rect.width(), rect.height())
    center = ((rect.left() + rect.right()) / 2, (rect.top() + rect.bottom()) / 2)
    crop, _ = turned_crop(image, center, angle, VERIFY_BOX / side, 2 * VERIFY_BOX)
    # HOG's own threshold: where HOG does not see a face in any view (a profile, a blurred
    # face), its weaker scores rank the turns no better than chance, so the unturned fit stays.
    rects, scores, _ = self._hog.run(crop, 0, 0.0)
    near = [
      s
      for r, s in zip(rects, scores)
      if abs((r.left() + r.right()) / 2 - VERIFY_BOX) < VERIFY_BOX / 3
      and abs((r.top() + r.bottom()) / 2 - VERIFY_BOX) < VERIFY_BOX / 3
    ]
    return max(near, default=-np.inf)


def center_face(faces: Sequence[Face], image_shape: Sequence[int]) -> List[Face]:
  """The one face whose box centre is closest to the image centre (GFPGAN's
  --only_center_face: a portrait's subject, not the people behind); [] if there is none.
  Ties go to the earlier face, i.e. the larger one."""
  if not faces:
    return []
  cy, cx = (image_shape[0] - 1) / 2, (image_shape[1] - 1) / 2

  def dist2(face):
    left, top, right, bottom = face.box
    return ((left + right) / 2 - cx) ** 2 + ((top + bottom) / 2 - cy) ** 2

  return [min(faces, key=dist2)]


def five_from_68(pts: np.ndarray) -> np.ndarray:
  """iBUG 68-point landmarks -> the template's five: eye centres, nose tip, mouth corners."""
  return np.stack([pts[36:42].mean(0), pts[42:48].mean(0), pts[30], pts[48], pts[54]])


def get_detector(name: str = 'hog', **kwargs) -> FaceDetector:
  """A detector by name (one of DETECTORS); raises DetectorUnavailable (which package or file
  is missing) if it cannot be loaded."""
  return DlibDetector(_ALIASES.get(name, name), **kwargs)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """The (2, 3) similarity (rotation, uniform scale, translation; no reflection) that maps
  `src` points onto `dst` in the least-squares sense (Umeyama 1991)."""
  src = np.asarray(src, np.float64)
  dst = np.asarray(dst, np.float64)
  mu_s, mu_d = src.mean(0), dst.mean(0)
  s, d = src - mu_s, dst - mu_d
  cov = d.T @ s / len(src)
  u, sig, vt = np.linalg.svd(cov)
  sign = np.eye(2)
  if np.linalg.det(u) * np.linalg.det(vt) < 0:
    sign[1, 1] = -1.0
  rot = u @ sign @ vt
  var_s = (s**2).sum() / len(src)
  scale = (sig * np.diag(sign)).sum() / var_s
  m = np.zeros((2, 3))
  m[:, :2] = scale * rot
  m[:, 2] = mu_d - scale * rot @ mu_s
  return m


def apply_affine(affine: np.ndarray, pts: np.ndarray) -> np.ndarray:
  """Applies a (2, 3) affine to (N, 2) points."""
  pts = np.asarray(pts, np.float64)
  return pts @ affine[:, :2].T + affine[:, 2]


def align_face(
  image: np.ndarray, landmarks: np.ndarray, resolution: int
) -> Tuple[np.ndarray, np.ndarray]:
  """(aligned crop (R, R, 3) uint8, the (2, 3) affine image -> crop) for one face.

  Borders are reflected rather than black, so a face at the photo's edge gives the model a
  plausible context instead of a hard black edge it was never trained on.
  """
  affine = similarity_transform(landmarks, template(resolution))
  # Shrinking a lot with bilinear warping aliases; pre-blur area-style when scale < 1.
  scale = np.sqrt(abs(np.linalg.det(affine[:, :2])))
  src = image
  if scale < 0.5:
    sigma = 0.5 / scale * 0.5
    src = cv2.GaussianBlur(image, (0, 0), sigma)
  crop = cv2.warpAffine(
    src, affine, (resolution, resolution), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT_101
  )
  return crop, affine


def upscale_image(image: np.ndarray, upscale: float) -> np.ndarray:
  """The background for pasting: `image` upscaled by `upscale` with Lanczos."""
  if upscale == 1:
    return image.copy()
  h, w = image.shape[:2]
  return cv2.resize(
    image, (int(round(w * upscale)), int(round(h * upscale))), interpolation=cv2.INTER_LANCZOS4
  )


def inverse_affine(affine: np.ndarray, upscale: float) -> np.ndarray:
  """Crop -> upscaled-photo coordinates (pixel centres at integers in both).

  A photo pixel index x maps to the upscaled index u * x + (u - 1) / 2 (cv2.resize's
  half-pixel-centre convention).
  """
  inv = cv2.invertAffineTransform(affine) * upscale
  inv[:, 2] += (upscale - 1.0) / 2.0
  return inv


def feather_mask(inv: np.ndarray, face_size: int, out_hw: Tuple[int, int]) -> np.ndarray:
  """Float32 (H, W) mask in [0, 1]: the crop's footprint in the output, eroded and blurred so
  the pasted face fades into the background instead of showing the crop's edge."""
  h, w = out_hw
  ones = np.ones((face_size, face_size), np.float32)
  mask = cv2.warpAffine(
    ones, inv, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
  )
  area = float(mask.sum())
  edge = max(1, int(np.sqrt(area)) // 20)
  mask = cv2.erode(mask, np.ones((2 * edge + 1, 2 * edge + 1), np.uint8))
  mask = cv2.GaussianBlur(mask, (0, 0), edge)
  return np.clip(mask, 0.0, 1.0)


def warp_back(face: np.ndarray, inv: np.ndarray, out_hw: Tuple[int, int]) -> np.ndarray:
  """The restored face warped into the (upscaled) photo's frame, float32 (H, W, 3).

  When the face shrinks on the way back, resize it down first with INTER_AREA (and adjust the
  transform), since bilinear warping alone would alias fine detail.
  """
  h, w = out_hw
  scale = np.sqrt(abs(np.linalg.det(inv[:, :2])))
  face = face.astype(np.float32)
  if scale < 0.75:
    size = face.shape[0]
    small = max(8, int(round(size * scale)))
    s = small / size
    face = cv2.resize(face, (small, small), interpolation=cv2.INTER_AREA)
    # small index q relates to original index p by (q + 0.5) = s (p + 0.5).
    to_small = np.array([[s, 0.0, 0.5 * s - 0.5], [0.0, s, 0.5 * s - 0.5]])
    inv = inv @ np.vstack([cv2.invertAffineTransform(to_small), [0.0, 0.0, 1.0]])
  return cv2.warpAffine(face, inv, (w, h), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)


def paste_faces(
  image: np.ndarray, faces: Sequence[Tuple[np.ndarray, np.ndarray]], upscale: float = 1.0
) -> np.ndarray:
  """Pastes restored faces onto `image` upscaled by `upscale` (uint8 RGB).

  faces: (restored crop (R, R, 3) uint8, its align_face affine) per face.
  """
  out = upscale_image(image, upscale).astype(np.float32)
  hw = out.shape[:2]
  for face, affine in faces:
    inv = inverse_affine(affine, upscale)
    warped = warp_back(face, inv, hw)
    mask = feather_mask(inv, face.shape[0], hw)[..., None]
    out = mask * warped + (1.0 - mask) * out
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)
