"""HOG vs CNN face detection on the CPU, as idm_jax.inference.faces runs them (restore --detector).

    taskset -c 0 python bench/detector_speed.py [--faces ../shared/data/celeba_hq128_dev]
        [--repeats 3] [--upsample 0 1]

Photos: the astronaut (skimage, 512x512, one face), the same upscaled 2x and cut to 1024x768
(one larger face), and with --faces a 1024x768 group of twelve faces from that folder, 48-128 px
wide and turned by up to 55 degrees on grey. Prints a markdown table: per photo, detector and
upsample setting, the median wall time of the detector alone (boxes), of detect() (boxes plus the
five landmarks of every face found), and the faces found. Pin it to one core (taskset) so the
numbers say what one core costs; dlib's detectors run on one thread anyway.
"""

import argparse
import os
import statistics
import time

import cv2
import numpy as np
from PIL import Image
from skimage import data

from idm_jax.inference import faces

# (degrees turned counter-clockwise, face crop width in px) for the group photo's twelve faces.
GROUP = (
  (0, 128),
  (20, 96),
  (-20, 64),
  (40, 128),
  (-40, 96),
  (55, 64),
  (-55, 128),
  (0, 48),
  (30, 96),
  (-30, 48),
  (55, 96),
  (-55, 64),
)


def group_photo(folder: str) -> np.ndarray:
  """1024x768: the first twelve images of `folder` (sorted) as GROUP says, on grey."""
  names = sorted(n for n in os.listdir(folder) if n.lower().endswith(('.jpg', '.png')))
  photo = np.full((768, 1024, 3), 128, np.uint8)
  for k, ((angle, width), name) in enumerate(zip(GROUP, names)):
    face = cv2.resize(
      np.asarray(Image.open(os.path.join(folder, name)).convert('RGB')),
      (width, width),
      interpolation=cv2.INTER_AREA,
    )
    c = (width - 1) / 2
    affine = cv2.getRotationMatrix2D((c, c), angle, 1.0)
    cx, cy = 127.5 + 256 * (k % 4), 127.5 + 256 * (k // 4)  # a 4x3 grid of 256 px cells
    affine[:, 2] += (cx - c, cy - c)
    cv2.warpAffine(
      face,
      affine,
      (1024, 768),
      dst=photo,
      flags=cv2.INTER_LINEAR,
      borderMode=cv2.BORDER_TRANSPARENT,
    )  # paints only the face's square
  return photo


def photos(folder):
  astronaut = data.astronaut()
  big = cv2.resize(astronaut, (1024, 1024), interpolation=cv2.INTER_LANCZOS4)[128:896]
  out = {'astronaut 512x512': astronaut, 'astronaut 2x, 1024x768': big}
  if folder:
    out['12 tilted faces, 1024x768'] = group_photo(folder)
  return out


def median_time(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    result = fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), result


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--faces', default=None, help='a folder of face crops for the group photo')
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--upsample', type=int, nargs='+', default=[0, 1])
  args = p.parse_args(argv)
  print('| photo | detector | upsample | boxes | detect (boxes + landmarks) | faces |')
  print('| --- | --- | --- | --- | --- | --- |')
  for title, image in photos(args.faces).items():
    image = np.ascontiguousarray(image)
    for name in faces.DETECTORS:
      for upsample in args.upsample:
        detector = faces.get_detector(name, upsample=upsample)
        detector.detect(image)  # warm up (first-call allocations)
        t_boxes, _ = median_time(lambda d=detector, im=image: d.boxes(im), args.repeats)
        t_detect, found = median_time(lambda d=detector, im=image: d.detect(im), args.repeats)
        print(
          f'| {title} | {name} | {upsample} | {t_boxes:.2f} s | {t_detect:.2f} s | {len(found)} |',
          flush=True,
        )


if __name__ == '__main__':
  main()
