"""FID: Frechet distance vs a scipy.linalg.sqrtm reference; Inception weight plumbing."""

import numpy as np
import pytest
from scipy import linalg

from idm_jax.metrics import convert_weights
from idm_jax.metrics import fid
from idm_jax.metrics import npz_weights


def _reference_fd(mu1, s1, mu2, s2):
  covmean = linalg.sqrtm(s1 @ s2).real
  return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _random_gaussian(rng, d):
  a = rng.standard_normal((d, d))
  return rng.standard_normal(d), a @ a.T / d + 0.1 * np.eye(d)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_frechet_distance_matches_sqrtm_reference(seed):
  rng = np.random.default_rng(seed)
  mu1, s1 = _random_gaussian(rng, 16)
  mu2, s2 = _random_gaussian(rng, 16)
  assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
    _reference_fd(mu1, s1, mu2, s2), rel=1e-6
  )


def _rounding_tolerance(s1, s2):
  """How far from 0 float64 rounding may leave the distance of a set to itself: dimensions x eps
  x the covariances' scale (their traces), whatever the BLAS build."""
  return s1.shape[0] * np.finfo(np.float64).eps * (np.trace(s1) + np.trace(s2))


def test_frechet_distance_special_cases():
  rng = np.random.default_rng(3)
  mu, s = _random_gaussian(rng, 16)
  assert 0 <= fid.frechet_distance(mu, s, mu, s) <= _rounding_tolerance(s, s)
  # 1-D closed form: (m1 - m2)^2 + (sd1 - sd2)^2.
  assert fid.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1)
  # Rank-deficient sample covariances (fewer samples than dims) stay finite and agree.
  f1, f2 = rng.standard_normal((10, 32)), rng.standard_normal((12, 32)) + 0.5
  got = fid.fid_from_features(f1, f2)
  ref = _reference_fd(*fid.statistics(f1), *fid.statistics(f2))
  assert np.isfinite(got) and got == pytest.approx(ref, rel=1e-4)
  # A set against itself: never negative, and 0 to rounding although 23 of the 32 covariance
  # eigenvalues are zero (their square roots must not add sqrt(eps)-sized terms).
  s1 = fid.statistics(f1)[1]
  assert 0 <= fid.fid_from_features(f1, f1) <= _rounding_tolerance(s1, s1)


@pytest.mark.parametrize('seed', range(5))
def test_frechet_distance_of_a_set_with_itself_is_zero_to_rounding(seed):
  rng = np.random.default_rng(seed)
  n, d = rng.integers(3, 60), rng.integers(8, 64)  # rank-deficient and full-rank covariances
  f = rng.standard_normal((n, d)) * rng.uniform(0.1, 10)
  s = fid.statistics(f)[1]
  assert 0 <= fid.fid_from_features(f, f) <= _rounding_tolerance(s, s)


# Facts about pytorch-fid's pt_inception-2015-12-05-6726825d.pth (PyTorch OIHW shapes).
REAL_KEYS = {
  'Conv2d_1a_3x3.conv.weight': (32, 3, 3, 3),
  'Conv2d_4a_3x3.conv.weight': (192, 80, 3, 3),
  'Mixed_5b.branch_pool.conv.weight': (32, 192, 1, 1),
  'Mixed_6b.branch7x7_2.conv.weight': (128, 128, 1, 7),
  'Mixed_6e.branch7x7dbl_5.conv.weight': (192, 192, 1, 7),
  'Mixed_7a.branch3x3_2.conv.weight': (320, 192, 3, 3),
  'Mixed_7b.branch3x3dbl_3a.conv.weight': (384, 384, 1, 3),
  'Mixed_7c.branch_pool.conv.weight': (192, 2048, 1, 1),
  'Mixed_7c.branch_pool.bn.running_var': (192,),
}


def _fake_inception_state_dict(rng):
  """A random state dict with pytorch-fid's key names, derived from the Flax module names."""
  sd = {}
  for key, shape in npz_weights.flatten(fid.abstract_variables()).items():
    _, *path, layer, leaf = key.split('/')
    prefix = '.'.join(path)
    if layer == 'conv':
      h, w, i, o = shape.shape
      sd[f'{prefix}.conv.weight'] = rng.normal(0, np.sqrt(1 / (h * w * i)), (o, i, h, w))
    else:
      torch_leaf = {
        'scale': 'weight',
        'bias': 'bias',
        'mean': 'running_mean',
        'var': 'running_var',
      }[leaf]
      lo, hi = (0.5, 1.5) if leaf in ('scale', 'var') else (-0.1, 0.1)
      sd[f'{prefix}.bn.{torch_leaf}'] = rng.uniform(lo, hi, shape.shape)
      sd[f'{prefix}.bn.num_batches_tracked'] = np.array(0)
  sd['fc.weight'], sd['fc.bias'] = np.zeros((1008, 2048)), np.zeros(1008)
  return sd


@pytest.fixture(scope='module')
def inception_npz(tmp_path_factory):
  sd = _fake_inception_state_dict(np.random.default_rng(0))
  path = tmp_path_factory.mktemp('fid') / 'inception.npz'
  np.savez(path, **convert_weights.inception_from_torch(sd))
  return path, sd


def test_flax_inception_has_pytorch_fid_layout(inception_npz):
  _, sd = inception_npz
  for key, shape in REAL_KEYS.items():
    assert sd[key].shape == shape, key
  flat = npz_weights.flatten(fid.abstract_variables())
  assert sum(k.endswith('/conv/kernel') for k in flat) == 94  # InceptionV3's 94 conv layers
  n_params = sum(np.prod(v.shape) for k, v in flat.items() if k.startswith('params/'))
  # torchvision's inception_v3 has 27,161,264 parameters; less its fc (2,049,000) and aux
  # classifier (3,326,696) leaves the pool3 trunk, whose shapes pytorch-fid's net shares.
  assert n_params == 27_161_264 - 2_049_000 - 3_326_696


def test_inception_npz_round_trip(inception_npz):
  path, sd = inception_npz
  variables = fid.load(str(path))
  conv = variables['params']['Mixed_6b']['branch7x7_2']['conv']['kernel']
  assert conv.shape == (1, 7, 128, 128)
  np.testing.assert_allclose(
    conv, sd['Mixed_6b.branch7x7_2.conv.weight'].transpose(2, 3, 1, 0), rtol=1e-6
  )
  np.testing.assert_allclose(
    variables['batch_stats']['Mixed_7c']['branch_pool']['bn']['var'],
    sd['Mixed_7c.branch_pool.bn.running_var'],
    rtol=1e-6,
  )
  with pytest.raises(KeyError, match='unexpected key'):
    convert_weights.inception_from_torch({'Mixed_5b.branch1x1.weird': np.zeros(1)})


@pytest.mark.slow
def test_inception_features_shape_and_batch_independence(inception_npz):
  path, _ = inception_npz
  rng = np.random.default_rng(1)
  imgs = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(3)]
  f = fid.inception_features(imgs, str(path), batch_size=2)
  assert f.shape == (3, fid.FEATURE_DIM) and np.isfinite(f).all()
  f_single = fid.inception_features(imgs[2:], str(path), batch_size=2)
  np.testing.assert_allclose(f_single[0], f[2], rtol=1e-4, atol=1e-5)
  assert not np.allclose(f[0], f[1])


def test_converter_cli_without_torch_says_so(monkeypatch, tmp_path):
  monkeypatch.setitem(__import__('sys').modules, 'torch', None)  # import torch -> ImportError
  with pytest.raises(SystemExit, match='needs PyTorch'):
    convert_weights.main(['--inception', str(tmp_path / 'x.pth'), '--out', str(tmp_path / 'y.npz')])
  with pytest.raises(SystemExit):  # argparse: neither weights kind given
    convert_weights.main(['--out', str(tmp_path / 'y.npz')])
