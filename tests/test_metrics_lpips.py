"""LPIPS: the distance arithmetic vs numpy, and the torch -> npz -> Flax weight plumbing."""

import numpy as np
import pytest

from idm_jax.metrics import convert_weights
from idm_jax.metrics import lpips
from idm_jax.metrics import npz_weights


def _np_lpips_from_features(f0s, f1s, lins):
  total = 0
  for f0, f1, w in zip(f0s, f1s, lins):
    n0 = f0 / (np.sqrt((f0**2).sum(-1, keepdims=True)) + 1e-10)
    n1 = f1 / (np.sqrt((f1**2).sum(-1, keepdims=True)) + 1e-10)
    total = total + ((n0 - n1) ** 2 * w).sum(-1).mean(axis=(1, 2))
  return total


def test_distance_from_features_matches_numpy():
  rng = np.random.default_rng(0)
  shapes = [(2, 8, 8, 4), (2, 4, 4, 6), (2, 2, 2, 5)]
  f0 = [rng.standard_normal(s).astype(np.float32) for s in shapes]
  f1 = [rng.standard_normal(s).astype(np.float32) for s in shapes]
  lins = [rng.uniform(0, 1, s[-1]).astype(np.float32) for s in shapes]
  got = np.asarray(lpips.distance_from_features(f0, f1, lins))
  np.testing.assert_allclose(got, _np_lpips_from_features(f0, f1, lins), rtol=1e-5)
  # Channel normalisation makes it scale invariant per pixel.
  got_scaled = np.asarray(lpips.distance_from_features([3 * f for f in f0], f1, lins))
  np.testing.assert_allclose(got_scaled, got, rtol=1e-5)


def _fake_torch_state_dicts(seed=0):
  """State dicts with the real files' key names and (PyTorch OIHW) shapes."""
  rng = np.random.default_rng(seed)
  vgg, cin = {}, 3
  convs = [c for block in lpips.VGG_SLICES for _, c in block]
  for idx, cout in zip(convert_weights.VGG_CONV_INDICES, convs):
    vgg[f'features.{idx}.weight'] = rng.normal(0, np.sqrt(2 / (9 * cin)), (cout, cin, 3, 3))
    vgg[f'features.{idx}.bias'] = rng.normal(0, 0.1, cout)
    cin = cout
  vgg['classifier.0.weight'] = np.zeros((4, 4))  # ignored by the converter
  lin = {
    f'lin{i}.model.1.weight': rng.uniform(0, 1, (1, c, 1, 1)) for i, c in enumerate(lpips.CHANNELS)
  }
  return vgg, lin


def _conv3x3_relu_reference(x, w, b):
  """PyTorch Conv2d(3x3, padding 1) + ReLU semantics on NHWC x with OIHW w."""
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  h, wd = x.shape[1:3]
  out = b + sum(
    np.einsum('nhwi,oi->nhwo', xp[:, dy : dy + h, dx : dx + wd], w[:, :, dy, dx])
    for dy in range(3)
    for dx in range(3)
  )
  return np.maximum(out, 0)


@pytest.fixture(scope='module')
def lpips_npz(tmp_path_factory):
  vgg, lin = _fake_torch_state_dicts()
  path = tmp_path_factory.mktemp('lpips') / 'lpips.npz'
  np.savez(path, **convert_weights.lpips_from_torch(vgg, lin))
  return path, vgg, lin


def test_converted_weights_round_trip(lpips_npz):
  path, vgg, lin = lpips_npz
  variables = lpips.load(str(path))
  params = variables['params']
  np.testing.assert_allclose(params['lin2'], lin['lin2.model.1.weight'].reshape(-1), rtol=1e-6)
  np.testing.assert_allclose(
    params['vgg']['conv3_3']['kernel'], vgg['features.14.weight'].transpose(2, 3, 1, 0), rtol=1e-6
  )
  np.testing.assert_allclose(params['vgg']['conv5_3']['bias'], vgg['features.28.bias'], rtol=1e-6)


def test_forward_with_converted_weights(lpips_npz):
  path, vgg, _ = lpips_npz
  variables = lpips.load(str(path))
  rng = np.random.default_rng(1)
  x = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  # The first feature map equals PyTorch-semantics convs with the original OIHW weights, which
  # pins the kernel transposition and orientation.
  feats = lpips.VGG16Features().apply({'params': variables['params']['vgg']}, x)
  assert [f.shape[1:] for f in feats] == [
    (16, 16, 64),
    (8, 8, 128),
    (4, 4, 256),
    (2, 2, 512),
    (1, 1, 512),
  ]
  ref = _conv3x3_relu_reference(x, vgg['features.0.weight'], vgg['features.0.bias'])
  ref = _conv3x3_relu_reference(ref, vgg['features.2.weight'], vgg['features.2.bias'])
  np.testing.assert_allclose(np.asarray(feats[0]), ref, rtol=1e-3, atol=1e-4)
  imgs = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(3)]
  d_same = lpips.lpips_distances(imgs, imgs, str(path))
  d_diff = lpips.lpips_distances(imgs, imgs[::-1], str(path))
  assert len(d_same) == 3 and max(d_same) < 1e-6
  assert d_diff[0] > 1e-3 and d_diff[1] < 1e-6  # the middle pair is identical


def test_bad_weight_files_are_named(tmp_path, lpips_npz):
  path, _, _ = lpips_npz
  flat = dict(np.load(path))
  del flat['params/lin0']
  flat['params/vgg/conv1_1/kernel'] = flat['params/vgg/conv1_1/kernel'][..., :3]
  bad = tmp_path / 'bad.npz'
  np.savez(bad, **flat)
  with pytest.raises(ValueError, match=r'bad\.npz.*missing.*lin0.*wrong shapes'):
    npz_weights.load_variables(bad, lpips.abstract_variables(), 'LPIPS')
  with pytest.raises(FileNotFoundError, match='nothere.npz'):
    lpips.load(str(tmp_path / 'nothere.npz'))
  vgg, lin = _fake_torch_state_dicts()
  del lin['lin4.model.1.weight']
  with pytest.raises(KeyError, match='lin4'):
    convert_weights.lpips_from_torch(vgg, lin)
