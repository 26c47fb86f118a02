"""PSNR/SSIM agree with scikit-image; consistency measures agreement with the LQ input."""

import cv2
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio
from skimage.metrics import structural_similarity

from idm_jax.metrics import fidelity
from idm_jax.metrics import matlab


def _pair(seed, shape=(48, 56, 3), noise=25):
  rng = np.random.default_rng(seed)
  # A smooth image plus noise, so SSIM is neither ~0 nor ~1.
  base = cv2.resize(
    rng.integers(0, 256, (6, 7, 3), dtype=np.uint8), shape[1::-1], interpolation=cv2.INTER_CUBIC
  )
  noisy = np.clip(base.astype(int) + rng.integers(-noise, noise + 1, shape), 0, 255)
  return base, noisy.astype(np.uint8)


def _sk_ssim(a, b, channel_axis=-1):
  return structural_similarity(
    a,
    b,
    gaussian_weights=True,
    sigma=1.5,
    use_sample_covariance=False,
    data_range=255,
    channel_axis=channel_axis,
  )


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_rgb_metrics_match_skimage(seed):
  a, b = _pair(seed)
  assert fidelity.psnr(a, b) == pytest.approx(
    peak_signal_noise_ratio(a, b, data_range=255), abs=1e-4
  )
  assert fidelity.ssim(a, b) == pytest.approx(_sk_ssim(a, b), abs=1e-4)


def test_y_metrics_match_skimage_on_matlab_y():
  a, b = _pair(3)
  ya, yb = matlab.rgb_to_y(a), matlab.rgb_to_y(b)
  assert fidelity.psnr(a, b, y_channel=True) == pytest.approx(
    peak_signal_noise_ratio(ya, yb, data_range=255), abs=1e-4
  )
  assert fidelity.ssim(a, b, y_channel=True) == pytest.approx(
    _sk_ssim(ya, yb, channel_axis=None), abs=1e-4
  )
  # Y differs from RGB: the test would not notice if y_channel were ignored otherwise.
  assert abs(fidelity.psnr(a, b, y_channel=True) - fidelity.psnr(a, b)) > 0.1


def test_identical_and_ordering():
  a, b = _pair(4, noise=10)
  _, c = _pair(4, noise=40)
  assert fidelity.psnr(a, a) == float('inf')
  assert fidelity.ssim(a, a) == pytest.approx(1.0)
  assert fidelity.psnr(a, b) > fidelity.psnr(a, c)
  assert fidelity.ssim(a, b) > fidelity.ssim(a, c)


def test_shape_mismatch_is_an_error():
  with pytest.raises(ValueError, match='differ in shape'):
    fidelity.psnr(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9, 3), np.uint8))


def test_consistency_smaller_lq(celeba_dir):
  from PIL import Image

  hq = np.asarray(Image.open(sorted(celeba_dir.glob('*.jpg'))[0]).convert('RGB'))
  lq = cv2.resize(hq, (32, 32), interpolation=cv2.INTER_AREA)
  # The HQ explains its own LQ exactly; a different face does not.
  assert fidelity.consistency(hq, lq) == float('inf')
  other = np.asarray(Image.open(sorted(celeba_dir.glob('*.jpg'))[1]).convert('RGB'))
  assert fidelity.consistency(other, lq) < 25


def test_consistency_same_size_ignores_lost_detail():
  a, _ = _pair(5, shape=(64, 64, 3))
  # Zero-mean high-frequency detail (a 1-pixel checkerboard) averages out at 4x downsampling
  # (up to clipping at 0/255), so a restoration that adds detail the LQ lacks stays
  # consistent ...
  checker = np.indices((64, 64)).sum(0) % 2 * 2 - 1
  detailed = np.clip(a.astype(int) + 20 * checker[..., None], 0, 255).astype(np.uint8)
  assert fidelity.consistency(detailed, a, scale=4) > 35
  assert fidelity.psnr(detailed, a) < 25
  # ... while a colour shift (low frequency) is not.
  shifted = np.clip(a.astype(int) + 20, 0, 255).astype(np.uint8)
  assert fidelity.consistency(shifted, a, scale=4) < 25
