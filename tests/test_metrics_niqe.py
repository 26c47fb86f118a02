"""NIQE must reproduce BasicSR's (MATLAB-equivalent) values; MATLAB imresize properties."""

import configparser
import pathlib

import cv2
import matplotlib.cbook
import numpy as np
import pytest
from skimage import data

from idm_jax.metrics import matlab
from idm_jax.metrics import niqe


@pytest.fixture(scope='module')
def params(niqe_params_path):
  return niqe.load_niqe_params(niqe_params_path)


def _grace_hopper_rgb():
  path = matplotlib.cbook.get_sample_data('grace_hopper.jpg', asfileobj=False)
  return cv2.imread(str(path), cv2.IMREAD_COLOR)[..., ::-1]  # decode as BasicSR does (cv2)


def _blurred_jpeg_astronaut_rgb():
  # BasicSR's pipeline works in BGR: blur, JPEG-encode and decode the BGR image with OpenCV.
  bgr = np.ascontiguousarray(data.astronaut()[..., ::-1])
  blurred = cv2.GaussianBlur(bgr, (0, 0), 3)
  ok, buf = cv2.imencode('.jpg', blurred, [cv2.IMWRITE_JPEG_QUALITY, 30])
  assert ok
  return cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]


@pytest.mark.parametrize(
  'make_image, expected',
  [
    (data.astronaut, 3.0646),
    (_grace_hopper_rgb, 3.5786),
    (_blurred_jpeg_astronaut_rgb, 9.1355),
  ],
)
def test_niqe_matches_basicsr_reference_values(params, make_image, expected):
  score = niqe.niqe_score(make_image(), params)
  assert score == pytest.approx(expected, rel=0.01)


def test_niqe_accepts_path_and_ranks_degradation(niqe_params_path):
  img = data.astronaut()[:256, :256]
  blurred = cv2.GaussianBlur(img, (0, 0), 2)
  assert niqe.niqe_score(blurred, niqe_params_path) > niqe.niqe_score(img, niqe_params_path) + 1


def test_vectorised_block_features_match_per_block(params):
  rng = np.random.default_rng(0)
  blocks = rng.standard_normal((5, 48, 48)).astype(np.float32) * rng.uniform(0.5, 2, (5, 1, 1))
  blocks[2] = np.abs(blocks[2])  # no negatives: NaN features, as in the reference
  stacked = niqe.block_features(blocks)
  single = np.concatenate([niqe.block_features(b[None]) for b in blocks])
  np.testing.assert_allclose(stacked, single, rtol=1e-6)
  assert np.isnan(stacked[2]).any() and not np.isnan(stacked[[0, 1, 3, 4]]).any()


def test_aggd_recovers_gaussian_shape():
  # A zero-mean Gaussian is an AGGD with alpha = 2 and equal left/right scales.
  x = np.random.default_rng(1).standard_normal((1, 200_000))
  alpha, bl, br = niqe.aggd_params(x)
  assert alpha[0] == pytest.approx(2.0, abs=0.05)
  assert bl[0] == pytest.approx(br[0], rel=0.02)


def test_niqe_rejects_small_images(params):
  with pytest.raises(ValueError, match='at least 192'):
    niqe.niqe_score(np.zeros((128, 128, 3), np.uint8), params)


def test_load_niqe_params_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope.npz'):
    niqe.load_niqe_params(tmp_path / 'nope.npz')
  bad = tmp_path / 'bad.npz'
  np.savez(bad, mu_pris_param=np.zeros(36))
  with pytest.raises(ValueError, match='bad.npz.*cov_pris_param'):
    niqe.load_niqe_params(bad)
  junk = tmp_path / 'junk.npz'
  junk.write_text('not a zip')
  with pytest.raises(ValueError, match='junk.npz'):
    niqe.load_niqe_params(junk)


def test_shipped_params_are_package_data():
  """The pristine parameters ship inside the package, declared as package data so that a
  non-editable install carries them (NIQE then works on any folder)."""
  path = pathlib.Path(niqe.default_params_path())
  assert path.parent == pathlib.Path(niqe.__file__).resolve().parent and path.is_file()
  params = niqe.load_default()
  assert params.mu.shape == (36,) and params.cov.shape == (36, 36)
  assert params.window.shape == (7, 7) and params.window.sum() == pytest.approx(1)
  setup = configparser.ConfigParser()
  setup.read(pathlib.Path(__file__).resolve().parents[1] / 'setup.cfg')
  assert path.name in setup['options.package_data']['idm_jax.metrics'].split()


def test_rgb_to_y_matches_matlab_range():
  y = matlab.rgb_to_y(np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0]]], np.uint8))
  np.testing.assert_allclose(y[0], [16.0, 235.0, 16 + 65.481], atol=1e-9)


def test_imresize_identity_constant_and_ramp():
  rng = np.random.default_rng(0)
  img = rng.uniform(0, 1, (20, 24, 3))
  np.testing.assert_allclose(matlab.imresize(img, 1.0), img, atol=1e-12)
  np.testing.assert_allclose(matlab.imresize(np.full((17, 9), 0.3), 0.5), 0.3, atol=1e-12)
  # The (antialiased) cubic kernel is symmetric and sums to 1, so a linear ramp maps to the
  # ramp sampled at the output centres u = 2k - 0.5 (1-based) away from the borders.
  ramp = np.tile(np.arange(1, 41, dtype=np.float64)[:, None], (1, 4))
  out = matlab.imresize(ramp, 0.5)
  assert out.shape == (20, 2)
  k = np.arange(1, 21)
  np.testing.assert_allclose(out[3:-3, 0], (2 * k - 0.5)[3:-3], atol=1e-9)


def test_imresize_symmetric_padding_and_antialiasing():
  # Symmetric padding: resizing x must equal resizing the mirrored extension [x', x, x'] and
  # keeping the middle, for any x (the border taps read the mirror images).
  x = np.random.default_rng(0).uniform(0, 1, (8, 1))
  long = np.concatenate([x[::-1], x, x[::-1]])
  for scale, aa in ((0.5, True), (0.5, False), (2.0, True)):
    n = int(8 * scale)
    np.testing.assert_allclose(
      matlab.imresize(long, scale, aa)[n : 2 * n], matlab.imresize(x, scale, aa), atol=1e-12
    )
  assert np.allclose(matlab.resize_matrix(8, 4, 0.5).sum(axis=1), 1.0)
  # Antialiasing attenuates a stripe pattern at the output's Nyquist frequency; plain bicubic
  # sampling keeps it (and overshoots).
  stripes = np.tile(np.array([0.0, 0.0, 1.0, 1.0]), 8)[:, None] * np.ones((1, 4))
  aa = matlab.imresize(stripes, 0.5, antialiasing=True)
  no_aa = matlab.imresize(stripes, 0.5, antialiasing=False)
  assert np.ptp(aa[2:-2]) < 0.75
  assert np.ptp(no_aa[2:-2]) > 1.0
