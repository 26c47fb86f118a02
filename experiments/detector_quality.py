"""What the HOG and CNN face detectors find, and how good the five landmarks on their boxes are.

    python experiments/split_view.py --eval dev --dst DEV && \
    taskset -c 0 python experiments/detector_quality.py --faces DEV [-n 40]

A selection script (docs/PROTOCOL.md): it chose faces.DEFAULT_MIN_SCORE and faces.ROLL_STARTS,
so a --faces folder holding a face of the test split is refused. (Its committed evidence was
measured on all 900 faces before the split existed.)

Four tables (markdown), the evidence behind faces.DEFAULT_MIN_SCORE and faces.ROLL_STARTS:
  0. every face of --faces, upright, each alone on grey (256 px, upsample 0: the faces are far
     above both detectors' smallest size): faces found by each, and by each among the other's
     misses;
  1. face-free photos (skimage's samples): detections and the highest score, per detector;
  2. 16 faces from --faces on grey, blurred, downsampled by f, JPEG q=40 and upsampled back:
     faces found and their scores, per detector;
  3. n faces from --faces, each alone, 96 px wide and turned by -55..55 degrees: faces found and
     how many of them have landmarks off (mean five-point error over 0.15 eye distances), with
     the predictor fitted once on the upright box (as before ROLL_STARTS) and as shipped.
The true landmarks of a turned face are HOG's on the upright face at 2x, carried by the turn.
"""

import argparse
import io
import os

import cv2
import numpy as np
from PIL import Image
from skimage import data
from split_view import refuse_test_faces

from idm_jax.inference import faces

FACE_FREE = (
  'chelsea',
  'coffee',
  'rocket',
  'hubble_deep_field',
  'immunohistochemistry',
  'retina',
  'cat',
  'colorwheel',
  'logo',
  'stereo_motorcycle',
)
ANGLES = (-55, -40, 0, 40, 55)
OFF = 0.15  # eye distances: a landmark error that misaligns the face


def rgb(image):
  image = image[0] if isinstance(image, tuple) else image
  image = np.stack([image] * 3, -1) if image.ndim == 2 else image[..., :3]
  image = image.astype(np.uint8)
  scale = 700 / max(image.shape[:2])
  if scale < 1:
    image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
  return np.ascontiguousarray(image)


def degrade(image, factor):
  """Blur, downsample by `factor`, JPEG q=40, upsample back (as tests/test_app.py's degraded)."""
  if factor == 1:
    return image
  small = cv2.resize(
    cv2.GaussianBlur(image, (0, 0), 0.4 * factor),
    None,
    fx=1 / factor,
    fy=1 / factor,
    interpolation=cv2.INTER_AREA,
  )
  buf = io.BytesIO()
  Image.fromarray(cv2.resize(small, image.shape[1::-1], interpolation=cv2.INTER_LINEAR)).save(
    buf, format='JPEG', quality=40
  )
  return np.ascontiguousarray(np.asarray(Image.open(buf).convert('RGB')))


def mosaic(crops):
  """4x4 grid of the crops, each with a 32 px grey margin."""
  cells = [
    cv2.copyMakeBorder(c, 32, 32, 32, 32, cv2.BORDER_CONSTANT, value=(128, 128, 128))
    for c in crops[:16]
  ]
  return np.concatenate([np.concatenate(cells[i : i + 4], 1) for i in range(0, 16, 4)], 0)


def turned(face, angle):
  """(144x144 photo, affine): the 128 px face scaled to 96 px and turned about its centre."""
  affine = cv2.getRotationMatrix2D((63.5, 63.5), angle, 0.75)
  affine[:, 2] += 71.5 - 63.5
  photo = cv2.warpAffine(
    face,
    affine,
    (144, 144),
    flags=cv2.INTER_LINEAR,
    borderMode=cv2.BORDER_CONSTANT,
    borderValue=(128, 128, 128),
  )
  return np.ascontiguousarray(photo), affine


def five_points(detector, photo, rect, shipped):
  """The five landmarks on `rect` as shipped, or fitted once on the upright box (as before
  faces.ROLL_STARTS)."""
  saved = faces.ROLL_STARTS, faces.ROLL_ITERATIONS
  if not shipped:
    faces.ROLL_STARTS, faces.ROLL_ITERATIONS = (0.0,), 0
  try:
    return faces.five_from_68(detector.landmarks68(photo, rect))
  finally:
    faces.ROLL_STARTS, faces.ROLL_ITERATIONS = saved


def landmark_table(crops, detectors):
  """{(detector, angle, shipped): [faces found, faces with landmarks off]}."""
  rows = {}
  for face in crops:
    ref = detectors['hog'].detect(cv2.resize(face, (256, 256), interpolation=cv2.INTER_CUBIC))
    if len(ref) != 1:
      continue
    ref5 = (ref[0].landmarks + 0.5) / 2 - 0.5
    for angle in ANGLES:
      photo, affine = turned(face, angle)
      truth = faces.apply_affine(affine, ref5)
      eyes = np.linalg.norm(truth[1] - truth[0])
      for name, detector in detectors.items():
        boxes = [(s, r) for r, s in detector.boxes(photo) if s >= faces.DEFAULT_MIN_SCORE[name]]
        for shipped in (False, True):
          cell = rows.setdefault((name, angle, shipped), [0, 0])
          if boxes:
            rect = max(boxes, key=lambda b: b[0])[1]
            err = np.linalg.norm(five_points(detector, photo, rect, shipped) - truth, axis=1)
            cell[0] += 1
            cell[1] += int(err.mean() / eyes > OFF)
  return rows


def upright_table(folder, names, detectors):
  """{detector: set of the names it finds} over every face of the folder."""
  found = {name: set() for name in detectors}
  for n in names:
    face = np.asarray(Image.open(os.path.join(folder, n)).convert('RGB'))
    photo = np.ascontiguousarray(
      cv2.copyMakeBorder(face, 64, 64, 64, 64, cv2.BORDER_CONSTANT, value=(128, 128, 128))
    )
    for name, detector in detectors.items():
      if any(s >= faces.DEFAULT_MIN_SCORE[name] for _, s in detector.boxes(photo)):
        found[name].add(n)
  return found


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--faces', required=True, help='a folder of aligned 128 px face crops')
  p.add_argument('-n', type=int, default=40, help='faces for the landmark table')
  p.add_argument('--splits', default='docs/results/splits.json')
  args = p.parse_args(argv)
  names = sorted(n for n in os.listdir(args.faces) if n.lower().endswith(('.jpg', '.png')))
  refuse_test_faces(names, args.splits)
  crops = [
    np.asarray(Image.open(os.path.join(args.faces, n)).convert('RGB'))
    for n in names[: max(args.n, 16)]
  ]
  detectors = {name: faces.get_detector(name, min_score=0.0) for name in faces.DETECTORS}
  thresholds = faces.DEFAULT_MIN_SCORE

  found = upright_table(
    args.faces, names, {name: faces.get_detector(name, upsample=0) for name in faces.DETECTORS}
  )
  hog, cnn = found['hog'], found['cnn']
  print(f"| {len(names)} upright faces | found | found among the other's misses |")
  print('| --- | --- | --- |')
  print(f'| hog | {len(hog)} | {len(hog - cnn)} of {len(names) - len(cnn)} |')
  print(f'| cnn | {len(cnn)} | {len(cnn - hog)} of {len(names) - len(hog)} |\n', flush=True)

  print('| face-free photo | hog: detections (max score) | cnn: detections (max score) |')
  print('| --- | --- | --- |')
  for title in FACE_FREE:
    image = rgb(getattr(data, title)())
    cells = []
    for detector in detectors.values():
      scores = [s for _, s in detector.boxes(image)]
      cells.append(f'{len(scores)} ({max(scores):.2f})' if scores else '0')
    print(f'| {title} {image.shape[1]}x{image.shape[0]} | ' + ' | '.join(cells) + ' |', flush=True)

  print('\n| 16 faces, degraded by | detector | found | at the default threshold | scores |')
  print('| --- | --- | --- | --- | --- |')
  grid = mosaic(crops)
  for factor in (1, 4, 6, 8):
    image = degrade(grid, factor)
    for name, detector in detectors.items():
      scores = sorted(s for _, s in detector.boxes(image))
      kept = sum(s >= thresholds[name] for s in scores)
      print(
        f'| x{factor} | {name} | {len(scores)} | {kept} (>= {thresholds[name]}) | '
        + ', '.join(f'{s:.2f}' for s in scores)
        + ' |',
        flush=True,
      )

  rows = landmark_table(crops[: args.n], detectors)
  print('\n| detector | landmark fit | ' + ' | '.join(f'{a} deg' for a in ANGLES) + ' |')
  print('| --- | --- |' + ' --- |' * len(ANGLES))
  for name in detectors:
    for shipped in (False, True):
      cells = [
        f'{rows[(name, a, shipped)][0]} found, {rows[(name, a, shipped)][1]} off' for a in ANGLES
      ]
      fit = 'as shipped' if shipped else 'upright box only'
      print(f'| {name} | {fit} | ' + ' | '.join(cells) + ' |', flush=True)


if __name__ == '__main__':
  main()
