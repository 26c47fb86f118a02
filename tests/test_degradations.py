"""Tests for idm_jax.data.degradations: kernel maths, each stage against plain OpenCV calls,
determinism, and the visible effect of each degradation."""

import json
import math

import cv2
import numpy as np
from PIL import Image
import pytest

from idm_jax.data import degradations as D
from idm_jax.runtime import configlib


@pytest.fixture(scope='module')
def face(celeba_dir):
  """A real 128x128 RGB face, uint8."""
  path = sorted(celeba_dir.glob('*.jpg'))[0]
  return np.asarray(Image.open(path).convert('RGB'))


def _params(**over):
  """A mild, fully specified parameter set; tests override what they probe."""
  p = dict(
    kernel_type='aniso',
    sigma_x=2.0,
    sigma_y=0.7,
    theta=0.4,
    kernel_size=41,
    scale=2.5,
    noise_sigma=5.0,
    noise_seed=123,
    jpeg_quality=75,
    color_shift=None,
    gray=False,
    jitter=None,
    flip=False,
  )
  p.update(over)
  return p


def _reference(hq, p, blur_fn):
  """The pipeline written out with plain cv2/numpy calls, stage by stage."""
  img = hq.astype(np.float32) / np.float32(255)
  h, w = img.shape[:2]
  img = blur_fn(img, p)
  s = p['scale']
  img = cv2.resize(img, (int(w // s), int(h // s)), interpolation=cv2.INTER_LINEAR)
  noise = np.random.default_rng(p['noise_seed']).standard_normal(img.shape, dtype=np.float32)
  img = np.clip(img + noise * np.float32(p['noise_sigma'] / 255), 0, 1)
  u8 = np.rint(img * 255).astype(np.uint8)
  _, enc = cv2.imencode(
    '.jpg', u8[:, :, ::-1].copy(), [cv2.IMWRITE_JPEG_QUALITY, p['jpeg_quality']]
  )
  img = cv2.imdecode(enc, cv2.IMREAD_COLOR)[:, :, ::-1].astype(np.float32) / np.float32(255)
  img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
  if p['color_shift'] is not None:
    img = np.clip(img + np.float32(p['color_shift']), 0, 1)
  if p['gray']:
    img = np.tile(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[:, :, None], (1, 1, 3))
  assert p['jitter'] is None, 'the reference has no jitter'
  return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


def _filter2d(img, p):
  """The straightforward blur: cv2.filter2D with make_kernel's 2-D kernel, default borders."""
  k = D.make_kernel(p['kernel_type'], p['sigma_x'], p['sigma_y'], p['theta'], p['kernel_size'])
  return cv2.filter2D(img, -1, k.astype(np.float32))


def _grad_energy(img):
  g = img.astype(np.float64).mean(-1)
  return np.mean(np.diff(g, axis=0) ** 2) + np.mean(np.diff(g, axis=1) ** 2)


# ----------------------------------------------------------------------------- kernel ----


def _moments(k):
  r = k.shape[0] // 2
  ax = np.arange(-r, r + 1.0)
  u, v = np.meshgrid(ax, ax)  # u varies along columns, v along rows
  cov = np.array([[np.sum(k * u * u), np.sum(k * u * v)], [np.sum(k * u * v), np.sum(k * v * v)]])
  return cov, (np.sum(k * u), np.sum(k * v))


@pytest.mark.parametrize(
  'kt,sx,sy,th', [('iso', 1.5, 1.5, 0.0), ('aniso', 3.0, 0.5, 1.1), ('aniso', 0.1, 10.0, -2.5)]
)
def test_kernel_normalised_and_point_symmetric(kt, sx, sy, th):
  k = D.make_kernel(kt, sx, sy, th, 41)
  assert k.shape == (41, 41)
  assert abs(k.sum() - 1) < 1e-12
  assert np.all(k >= 0)
  np.testing.assert_allclose(k, k[::-1, ::-1], rtol=0, atol=1e-15)  # (u, v) -> (-u, -v)


def test_iso_kernel_is_outer_product_and_ignores_sy_theta():
  ax = np.arange(-10, 11.0)
  g = np.exp(-0.5 * ax**2 / 2.3**2)
  g /= g.sum()
  k = D.make_kernel('iso', 2.3, 99.0, 1.0, 21)
  np.testing.assert_allclose(k, np.outer(g, g), rtol=1e-10, atol=1e-15)


def test_kernel_second_moments_match_sigma():
  sx, sy, th = 4.0, 2.0, 0.3
  k = D.make_kernel('aniso', sx, sy, th, 41)
  rot = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
  sigma = rot @ np.diag([sx**2, sy**2]) @ rot.T
  cov, mean = _moments(k)
  assert max(abs(mean[0]), abs(mean[1])) < 1e-12
  np.testing.assert_allclose(cov, sigma, rtol=1e-3, atol=1e-3 * np.abs(sigma).max())


def test_kernel_rotation_convention():
  # theta = pi/4 turns the long x axis to (u, v) = (1, 1)/sqrt2: down-right along the main
  # diagonal of the array (rows = v grows downwards, columns = u grows to the right).
  k = D.make_kernel('aniso', 6.0, 0.6, math.pi / 4, 41)
  c = 20
  assert k[c + 5, c + 5] > 1e3 * k[c + 5, c - 5]
  assert k[c - 5, c - 5] == pytest.approx(k[c + 5, c + 5])
  # theta = 0 keeps the long axis horizontal (along columns).
  k0 = D.make_kernel('aniso', 6.0, 0.6, 0.0, 41)
  assert k0[c, c + 5] > 1e3 * k0[c + 5, c]


def test_kernel_rejects_bad_args():
  with pytest.raises(ValueError, match='kernel_size'):
    D.make_kernel('iso', 1.0, 1.0, 0.0, 40)
  with pytest.raises(ValueError, match='sigma'):
    D.make_kernel('aniso', 1.0, 0.0, 0.0, 41)
  with pytest.raises(ValueError, match='kernel_type'):
    D.make_kernel('box', 1.0, 1.0, 0.0, 41)


# ------------------------------------------------------------------------ sampling ----


@pytest.mark.parametrize('preset', configlib.PRESETS)
def test_sample_params_ranges_and_json(preset):
  cfg = configlib.degradation_config(preset)
  rng = np.random.default_rng(0)
  ps = [D.sample_params(rng, cfg, 512) for _ in range(300)]
  for p in ps:
    assert json.loads(json.dumps(p)) == p  # plain, lossless JSON
    assert cfg.blur_sigma[0] <= p['sigma_x'] <= cfg.blur_sigma[1]
    assert cfg.scale[0] <= p['scale'] <= cfg.scale[1]
    assert cfg.noise_sigma[0] <= p['noise_sigma'] <= cfg.noise_sigma[1]
    assert cfg.jpeg_quality[0] <= p['jpeg_quality'] <= cfg.jpeg_quality[1]
    assert isinstance(p['jpeg_quality'], int) and isinstance(p['noise_seed'], int)
    if p['kernel_type'] == 'iso':
      assert p['sigma_y'] == p['sigma_x'] and p['theta'] == 0.0
    if p['color_shift'] is not None:
      assert len(p['color_shift']) == 3 and max(map(abs, p['color_shift'])) <= 20 / 255
    if p['jitter'] is not None:
      assert sorted(p['jitter']['order']) == sorted(D.JITTER_OPS)
      assert cfg.hue[0] <= p['jitter']['hue'] <= cfg.hue[1]
  frac = lambda f: np.mean([f(p) for p in ps])
  assert 0.4 < frac(lambda p: p['kernel_type'] == 'iso') < 0.6
  assert 0.22 < frac(lambda p: p['color_shift'] is not None) < 0.38
  assert 0.22 < frac(lambda p: p['jitter'] is not None) < 0.38
  assert 0.4 < frac(lambda p: p['flip']) < 0.6
  assert len({p['noise_seed'] for p in ps}) == len(ps)


def test_sample_params_reproducible_and_scale_capped():
  cfg = configlib.degradation_config('codeformer_heavy')
  a = D.sample_params(np.random.default_rng([3, 7]), cfg, 16)
  b = D.sample_params(np.random.default_rng([3, 7]), cfg, 16)
  assert a == b
  assert int(16 // a['scale']) >= 1


# --------------------------------------------------------------------------- apply ----


def test_blur_matches_filter2d(face):
  img = face.astype(np.float32) / 255
  rect = img[:50, :90]  # non-square, kernel wider than half the image: reflect-101 borders
  for x in (img, rect):
    for kt, sx, sy, th in [
      ('iso', 3.0, 3.0, 0.0),
      ('aniso', 8.0, 1.0, 0.7),
      ('iso', 0.2, 0.2, 0.0),
      ('iso', 9.5, 9.5, 0.0),
    ]:
      p = _params(kernel_type=kt, sigma_x=sx, sigma_y=sy, theta=th)
      out = D.blur(x, p)
      assert out.dtype == np.float32 and out.shape == x.shape
      if kt == 'aniso':  # the straightforward call itself
        np.testing.assert_array_equal(out, _filter2d(x, p))
      else:  # separable: equal up to float32 rounding
        np.testing.assert_allclose(out, _filter2d(x, p), rtol=0, atol=2e-6)


def test_separable_iso_equals_2d_kernel():
  g = D.gaussian_1d(2.7, 41)
  np.testing.assert_allclose(
    np.outer(g, g), D.make_kernel('iso', 2.7, 2.7, 0.0, 41), rtol=1e-12, atol=1e-18
  )


@pytest.mark.parametrize(
  'over',
  [
    {},
    dict(kernel_type='iso', sigma_x=4.0, sigma_y=4.0, theta=0.0, scale=0.8, jpeg_quality=95),
    dict(scale=7.3, noise_sigma=18.0, jpeg_quality=61, color_shift=[0.05, -0.07, 0.01]),
    dict(scale=3.0, gray=True, color_shift=[-0.02, 0.03, 0.0]),
  ],
)
def test_apply_matches_plain_cv2_reference(face, over):
  p = _params(**over)
  out = D.apply(face, p)
  assert out.dtype == np.uint8 and out.shape == face.shape
  # Same blur, every other stage written with plain cv2 calls: byte-identical.
  np.testing.assert_array_equal(out, _reference(face, p, D.blur))
  ref = _reference(face, p, _filter2d)
  if p['kernel_type'] == 'aniso':
    np.testing.assert_array_equal(out, ref)
  else:  # separable blur differs by ~1e-7 in float32, which may flip a rare rounding
    assert np.mean(out != ref) < 0.01 and np.abs(out.astype(int) - ref).max() <= 8


def test_apply_deterministic_and_input_untouched(face):
  p = _params(
    jitter={
      'order': ['hue', 'contrast', 'brightness', 'saturation'],
      'brightness': 1.2,
      'contrast': 0.7,
      'saturation': 0.5,
      'hue': 0.05,
    }
  )
  before = face.copy()
  a, b = D.apply(face, p), D.apply(face, p)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(face, before)
  # A different noise seed changes the result.
  assert np.any(D.apply(face, dict(p, noise_seed=124)) != a)


@pytest.mark.parametrize('kt', ['iso', 'aniso'])
def test_apply_independent_of_opencv_threads(face, kt):
  p = _params(
    kernel_type=kt,
    sigma_x=3.0,
    sigma_y=3.0 if kt == 'iso' else 1.0,
    theta=0.0 if kt == 'iso' else 0.5,
    scale=1.3,
  )
  n = cv2.getNumThreads()
  try:
    cv2.setNumThreads(1)
    a = D.apply(face, p)
    cv2.setNumThreads(4)
    b = D.apply(face, p)
  finally:
    cv2.setNumThreads(n)
  np.testing.assert_array_equal(a, b)


def test_random_params_match_straightforward_pipeline(face):
  """Over sampled params (jitter off), apply equals the all-filter2D pipeline byte for byte for
  anisotropic kernels and almost always for isotropic ones (separable float32 rounding)."""
  cfg = configlib.degradation_config('gfpgan')
  identical = {'iso': [], 'aniso': []}
  for i in range(30):
    p = D.sample_params(np.random.default_rng([5, i]), cfg, face.shape[1])
    p['jitter'] = None
    out, ref = D.apply(face, p), _reference(face, p, _filter2d)
    assert np.mean(out != ref) < 0.01, p
    identical[p['kernel_type']].append(np.array_equal(out, ref))
  assert all(identical['aniso']) and len(identical['aniso']) >= 5
  assert np.mean(identical['iso']) >= 0.75 and len(identical['iso']) >= 5


def test_iso_blur_drops_only_negligible_taps(face):
  # sigma 0.5 and 1.0 have taps in float32's subnormal range; dropping them changes nothing.
  img = face.astype(np.float32) / 255
  for sigma in (0.5, 1.0):
    g = D.gaussian_1d(sigma, 41).astype(np.float32)
    assert np.any((g > 0) & (g < np.finfo(np.float32).tiny))  # the case this guards
    full = cv2.sepFilter2D(img, -1, g, g)
    np.testing.assert_array_equal(D.blur(img, _params(kernel_type='iso', sigma_x=sigma)), full)


def test_lq_differs_and_large_scale_removes_high_frequencies(face):
  mild = D.apply(
    face,
    _params(
      kernel_type='iso',
      sigma_x=0.2,
      sigma_y=0.2,
      theta=0.0,
      scale=1.0,
      noise_sigma=0.0,
      jpeg_quality=100,
    ),
  )
  heavy = D.apply(
    face,
    _params(
      kernel_type='iso',
      sigma_x=0.2,
      sigma_y=0.2,
      theta=0.0,
      scale=8.0,
      noise_sigma=0.0,
      jpeg_quality=100,
    ),
  )
  assert np.any(mild != face)
  # A near-identity degradation stays close; scale 8 loses most gradient energy.
  assert np.abs(mild.astype(int) - face).mean() < 2.0
  assert _grad_energy(heavy) < 0.3 * _grad_energy(face)
  assert _grad_energy(mild) > 0.7 * _grad_energy(face)


def test_gray_gives_equal_channels(face):
  out = D.apply(face, _params(gray=True, color_shift=[0.05, -0.05, 0.02]))
  np.testing.assert_array_equal(out[..., 0], out[..., 1])
  np.testing.assert_array_equal(out[..., 1], out[..., 2])
  assert np.any(D.apply(face, _params())[..., 0] != D.apply(face, _params())[..., 1])


def test_jpeg_quality_matters(face):
  base = dict(kernel_type='iso', sigma_x=0.3, sigma_y=0.3, theta=0.0, scale=1.0, noise_sigma=0.0)
  q100 = D.apply(face, _params(jpeg_quality=100, **base))
  q10 = D.apply(face, _params(jpeg_quality=10, **base))
  err = lambda x: np.abs(x.astype(int) - face).mean()
  assert err(q100) < 1.5
  assert err(q10) > 3 * err(q100)
  # Colours survive the RGB<->BGR round trip: channel means stay put at quality 100.
  np.testing.assert_allclose(q100.reshape(-1, 3).mean(0), face.reshape(-1, 3).mean(0), atol=1.0)


def test_color_shift_moves_channel_means(face):
  base = dict(noise_sigma=0.0, jpeg_quality=100, scale=1.0)
  a = D.apply(face, _params(**base)).reshape(-1, 3).mean(0)
  b = D.apply(face, _params(color_shift=[20 / 255, 0.0, -20 / 255], **base)).reshape(-1, 3).mean(0)
  d = b - a
  assert 15 < d[0] < 21 and abs(d[1]) < 0.5 and -21 < d[2] < -15  # RGB order, /255 units


def _jit(order, **f):
  full = dict(brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0)
  full.update(f)
  return dict(order=order, **full)


def test_jitter_torchvision_semantics():
  rng = np.random.default_rng(0)
  img = rng.uniform(0, 1, (16, 16, 3)).astype(np.float32)
  gray = img @ np.array([0.2989, 0.587, 0.114], np.float32)
  ops = list(D.JITTER_OPS)
  np.testing.assert_allclose(D._jitter(img, _jit(ops, brightness=0.5)), img * 0.5, atol=1e-6)
  np.testing.assert_allclose(
    D._jitter(img, _jit(ops, contrast=0.0)), np.full_like(img, gray.mean()), atol=1e-5
  )
  np.testing.assert_allclose(
    D._jitter(img, _jit(ops, saturation=0.0)), np.repeat(gray[..., None], 3, -1), atol=1e-5
  )
  # Hue: a shift of 1/3 turn maps pure red to pure green, and identity factors change nothing.
  red = np.zeros((2, 2, 3), np.float32)
  red[..., 0] = 1
  np.testing.assert_allclose(D._jitter(red, _jit(ops, hue=1 / 3))[0, 0], [0, 1, 0], atol=1e-5)
  np.testing.assert_allclose(D._jitter(img, _jit(ops)), img, atol=1e-5)
  # Order matters: brightness then contrast != contrast then brightness (both clamp to [0, 1]).
  a = D._jitter(
    img, _jit(['brightness', 'contrast', 'saturation', 'hue'], brightness=1.5, contrast=1.5)
  )
  b = D._jitter(
    img, _jit(['contrast', 'brightness', 'saturation', 'hue'], brightness=1.5, contrast=1.5)
  )
  assert np.abs(a - b).max() > 0.01


def _tv_hue(img, factor):
  """torchvision's adjust_hue (_rgb2hsv, shift, _hsv2rgb) in float64 numpy."""
  r, g, b = np.moveaxis(img.astype(np.float64), -1, 0)
  maxc, minc = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
  eqc = maxc == minc
  cr = maxc - minc
  s = cr / np.where(eqc, 1.0, maxc)
  div = np.where(eqc, 1.0, cr)
  rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
  h = (
    (maxc == r) * (bc - gc)
    + ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    + ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
  )
  h = np.fmod(h / 6.0 + 1.0, 1.0)
  h = np.mod(h + factor, 1.0)
  v = maxc
  i = np.floor(h * 6.0)
  f = h * 6.0 - i
  i = i.astype(int) % 6
  p = np.clip(v * (1 - s), 0, 1)
  q = np.clip(v * (1 - s * f), 0, 1)
  t = np.clip(v * (1 - s * (1 - f)), 0, 1)
  choose = lambda *opts: np.choose(i, opts)
  return np.stack(
    [choose(v, q, p, p, t, v), choose(t, v, v, q, p, p), choose(p, p, t, v, v, q)], -1
  )


@pytest.mark.parametrize('factor', [-0.1, -0.03, 0.07, 0.5])
def test_hue_matches_torchvision_formula(factor):
  img = np.random.default_rng(1).uniform(0, 1, (32, 32, 3)).astype(np.float32)
  img[0, :4] = [[0.2, 0.2, 0.2], [1, 0, 0], [0, 0, 0], [1, 1, 1]]  # gray, pure, extremes
  got = D._jitter(img, _jit(['hue', 'brightness', 'contrast', 'saturation'], hue=factor))
  np.testing.assert_allclose(got, _tv_hue(img, factor), rtol=0, atol=2e-5)


def test_apply_rejects_bad_input(face):
  with pytest.raises(ValueError, match='uint8'):
    D.apply(face.astype(np.float32), _params())
  with pytest.raises(ValueError, match='uint8'):
    D.apply(face[..., 0], _params())
  p = _params()
  del p['jpeg_quality']
  with pytest.raises(KeyError, match='jpeg_quality'):
    D.apply(face, p)


def test_degrade_pair_flips_both_and_replays(face):
  cfg = configlib.degradation_config('gfpgan')
  seen = set()
  for i in range(12):
    hq, lq, p = D.degrade_pair(face, np.random.default_rng([1, i]), cfg)
    seen.add(p['flip'])
    np.testing.assert_array_equal(hq, face[:, ::-1] if p['flip'] else face)
    np.testing.assert_array_equal(lq, D.apply(hq, json.loads(json.dumps(p))))
  assert seen == {True, False}


# ------------------------------------------------------------------------ the mild share ----


def _psnr(a, b):
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
  return 10 * np.log10(255.0**2 / mse) if mse else math.inf


def test_mild_ranges_are_the_gentlest_fifth_of_the_preset():
  cfg = configlib.degradation_config('gfpgan')
  assert cfg.mild.blur_sigma == pytest.approx((0.1, 0.1 + 0.2 * 9.9))
  assert cfg.mild.scale == pytest.approx((0.8, 0.8 + 0.2 * 7.2))
  assert cfg.mild.noise_sigma == pytest.approx((0.0, 4.0))
  assert tuple(cfg.mild.jpeg_quality) == (92, 100)
  # The heavy presets keep the same mild end: mild means mild whatever the preset.
  assert configlib.degradation_config('codeformer_heavy').mild == cfg.mild


def test_no_mild_share_keeps_every_earlier_pair(face):
  cfg = configlib.degradation_config('gfpgan')
  assert cfg.mild_share == 0
  for seed in range(20):
    _, lq, params = D.degrade_pair(face, np.random.default_rng(seed), cfg)
    expected = D.sample_params(np.random.default_rng(seed), cfg, face.shape[1])
    assert params == {**expected, 'identity': False}
    hq = face[:, ::-1] if expected['flip'] else face
    np.testing.assert_array_equal(lq, D.apply(np.ascontiguousarray(hq), expected))


def test_identity_pairs_are_exact_and_replay(face):
  cfg = configlib.degradation_config('gfpgan')
  cfg.mild_share = 1.0
  cfg.mild.identity_prob = 1.0
  for seed in range(10):
    hq, lq, params = D.degrade_pair(face, np.random.default_rng(seed), cfg)
    assert params['identity']
    np.testing.assert_array_equal(lq, hq)
    np.testing.assert_array_equal(D.apply(hq, params), lq)
    assert lq is not hq


def test_mild_pairs_draw_from_the_mild_ranges_without_colour_changes(face):
  cfg = configlib.degradation_config('gfpgan')
  cfg.mild_share = 1.0
  cfg.mild.identity_prob = 0.0
  mild, heavy = [], []
  for seed in range(60):
    hq, lq, p = D.degrade_pair(face, np.random.default_rng(seed), cfg)
    assert not p['identity']
    assert cfg.mild.blur_sigma[0] <= p['sigma_x'] <= cfg.mild.blur_sigma[1]
    assert cfg.mild.scale[0] <= p['scale'] <= cfg.mild.scale[1]
    assert cfg.mild.noise_sigma[0] <= p['noise_sigma'] <= cfg.mild.noise_sigma[1]
    assert cfg.mild.jpeg_quality[0] <= p['jpeg_quality'] <= cfg.mild.jpeg_quality[1]
    assert p['color_shift'] is None and p['jitter'] is None and not p['gray']
    np.testing.assert_array_equal(D.apply(hq, p), lq)  # the record replays
    mild.append(_psnr(hq, lq))
    heavy.append(
      _psnr(
        *D.degrade_pair(face, np.random.default_rng(seed), configlib.degradation_config('gfpgan'))[
          :2
        ]
      )
    )
  # Same seeds, gentler ranges: every pair is at least as close to its HQ, most far closer.
  assert np.median(mild) > np.median(heavy) + 5


def test_mild_share_is_the_share_of_mild_pairs(face):
  cfg = configlib.degradation_config('gfpgan')
  cfg.mild_share = 0.3
  cfg.mild.identity_prob = 0.5
  small = np.ascontiguousarray(face[::8, ::8])
  params = [D.degrade_pair(small, np.random.default_rng([5, i]), cfg)[2] for i in range(2000)]
  # A mild draw has no colour shift, jitter or gray and its blur within the mild range; a heavy
  # one can look mild by chance, so count identities (mild only) and bound the rest.
  identity = np.mean([p['identity'] for p in params])
  assert abs(identity - 0.15) < 4 * math.sqrt(0.15 * 0.85 / 2000)
  big_blur = np.mean([p['sigma_x'] > cfg.mild.blur_sigma[1] for p in params])
  # Heavy draws exceed the mild blur range with probability (10 - 2.08) / 9.9 = 0.8.
  expected = 0.7 * (10 - cfg.mild.blur_sigma[1]) / 9.9
  assert abs(big_blur - expected) < 4 * math.sqrt(expected * (1 - expected) / 2000)
