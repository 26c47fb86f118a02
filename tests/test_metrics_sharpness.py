"""Sharpness measures: known values, and blur lowers them while noise raises them."""

import numpy as np
import pytest
from scipy import ndimage

from idm_jax.metrics import sharpness


def _gray(y):
  return np.repeat(np.asarray(y, np.uint8)[..., None], 3, axis=2)


def test_flat_image_has_no_sharpness():
  flat = _gray(np.full((16, 16), 117))
  assert sharpness.laplacian_variance(flat) == 0.0
  assert sharpness.gradient_magnitude(flat) == 0.0


def test_known_values_of_a_vertical_step():
  # A step 0 | 100 between columns 7 and 8: the Laplacian is +100 on column 7 and -100 on
  # column 8 (reflected borders elsewhere keep it 0), so over 16 columns its variance is
  # 2/16 * 100^2; Sobel's horizontal derivative is 4 * 100 on those two columns.
  y = np.zeros((16, 16))
  y[:, 8:] = 100
  img = _gray(y)
  assert sharpness.laplacian_variance(img) == pytest.approx(2 / 16 * 100**2)
  assert sharpness.gradient_magnitude(img) == pytest.approx(2 / 16 * 400)


def test_blur_lowers_and_noise_raises_both():
  rng = np.random.default_rng(0)
  base = ndimage.zoom(rng.uniform(0, 255, (16, 16)), 4, order=3).clip(0, 255)
  img = _gray(base)
  blurred = _gray(ndimage.gaussian_filter(base, 1.5))
  noisy = _gray((base + rng.normal(0, 10, base.shape)).clip(0, 255))
  for measure in (sharpness.laplacian_variance, sharpness.gradient_magnitude):
    assert measure(blurred) < 0.8 * measure(img)
    assert measure(noisy) > measure(img)


def test_colour_uses_luma():
  y = np.zeros((8, 8, 3), np.uint8)
  y[:, 4:, 1] = 100  # a green step: luma 58.7
  assert sharpness.gradient_magnitude(y) == pytest.approx(2 / 8 * 4 * 58.7)


def test_rejects_what_is_not_uint8_rgb():
  with pytest.raises(ValueError, match='uint8'):
    sharpness.laplacian_variance(np.zeros((8, 8, 3), np.float32))
  with pytest.raises(ValueError, match='uint8'):
    sharpness.gradient_magnitude(np.zeros((8, 8), np.uint8))
