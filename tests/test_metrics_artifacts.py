"""The artifacts outlier score: finds blurred, noisy and JPEG-blocked images among sharp ones."""

import cv2
import numpy as np
from PIL import Image
import pytest

from idm_jax.data import contaminate
from idm_jax.metrics import artifacts


def _textures(n, size=64, seed=0):
  """Natural-looking smooth textures: random low-res noise, bicubically upsampled, plus detail."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    base = Image.fromarray(rng.integers(0, 256, (13, 13, 3)).astype(np.uint8))
    img = np.asarray(base.resize((size, size), Image.BICUBIC)).astype(np.float32)
    img += rng.normal(0, 6, img.shape)  # the fine detail a sharp photo has
    out.append(np.clip(img, 0, 255).astype(np.uint8))
  return out


def test_defective_images_rank_first_on_a_known_answer():
  imgs = _textures(30)
  defects = {
    3: dict(kind='blur', sigma=1.0),
    7: dict(kind='resize', factor=2.0),
    11: dict(kind='noise', sigma=12.0, noise_seed=1),
    19: dict(kind='jpeg', quality=30),
    25: dict(kind='blur', sigma=0.9),
  }
  for i, d in defects.items():
    imgs[i] = contaminate.apply_defect(imgs[i], d)
  scores = artifacts.outlier_scores([artifacts.features(im) for im in imgs])
  assert set(np.argsort(-scores)[: len(defects)]) == set(defects)


def test_features_move_the_right_way():
  img = _textures(1)[0]
  detail, block = artifacts.features(img)
  blurred = cv2.GaussianBlur(img, (0, 0), 1.0)
  noisy = np.clip(img + np.random.default_rng(0).normal(0, 15, img.shape), 0, 255).astype(np.uint8)
  jpeg = contaminate.apply_defect(img, dict(kind='jpeg', quality=20))
  assert artifacts.features(blurred)[0] < detail < artifacts.features(noisy)[0]
  assert artifacts.features(jpeg)[1] > block + 0.05
  assert abs(block) < 0.1  # no 8x8 grid in an image that never saw JPEG


def test_bad_input():
  with pytest.raises(ValueError, match='uint8'):
    artifacts.features(np.zeros((8, 8), np.float32))
  with pytest.raises(ValueError, match='at least 3'):
    artifacts.outlier_scores([(0.0, 0.0), (1.0, 1.0)])
