"""Tests for idm_jax.diffusion.schedules."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from idm_jax.diffusion import schedules


def _schedule_fns():
  return {
    'cosine': lambda t: schedules.cosine_logsnr(t),
    'cosine_narrow': lambda t: schedules.cosine_logsnr(t, -10.0, 12.0),
    'shifted_cosine': lambda t: schedules.shifted_cosine_logsnr(t, 128, 64),
    'linear': lambda t: schedules.linear_beta_logsnr(t),
  }


def test_alpha_sigma_is_variance_preserving_and_matches_logsnr():
  logsnr = jnp.linspace(-25.0, 25.0, 101)
  alpha, sigma = schedules.alpha_sigma(logsnr)
  np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)
  # log(alpha^2 / sigma^2) recovers the log-SNR (checked where float32 can represent both).
  mid = np.abs(np.asarray(logsnr)) <= 12.0
  np.testing.assert_allclose(np.log(alpha**2 / sigma**2)[mid], np.asarray(logsnr)[mid], atol=1e-3)
  assert np.all(np.asarray(alpha) > 0) and np.all(np.asarray(sigma) > 0)


@pytest.mark.parametrize('name', sorted(_schedule_fns()))
def test_logsnr_strictly_decreasing_and_finite(name):
  t = jnp.linspace(0.0, 1.0, 2001)
  logsnr = np.asarray(_schedule_fns()[name](t))
  assert logsnr.dtype == np.float32
  assert np.all(np.isfinite(logsnr))
  assert np.all(np.diff(logsnr) < 0), f'{name}: logsnr is not strictly decreasing'


def test_cosine_endpoints_hit_limits():
  for lo, hi in ((-20.0, 20.0), (-10.0, 12.0), (-5.0, 3.0)):
    ends = np.asarray(schedules.cosine_logsnr(jnp.array([0.0, 1.0]), lo, hi))
    # The two-branch evaluation keeps even the t = 1 end exact to float32 precision.
    np.testing.assert_allclose(ends, [hi, lo], rtol=1e-5, atol=1e-5)


def test_cosine_matches_formula_inside():
  # With the t-range trick t' = t_min + t (t_max - t_min); check against float64 numpy.
  t = np.linspace(0.01, 0.99, 50)
  t_min = 2 / np.pi * np.arctan(np.exp(-10.0))
  t_max = 2 / np.pi * np.arctan(np.exp(10.0))
  expected = -2 * np.log(np.tan(np.pi * (t_min + t * (t_max - t_min)) / 2))
  np.testing.assert_allclose(schedules.cosine_logsnr(t), expected, rtol=1e-5, atol=1e-5)
  assert abs(float(schedules.cosine_logsnr(0.5))) < 1e-5  # symmetric: SNR = 1 halfway


def test_shifted_cosine_is_cosine_plus_log_ratio():
  t = jnp.linspace(0.0, 1.0, 33)
  for res, base in ((128, 64), (512, 64), (32, 64)):
    shifted = schedules.shifted_cosine_logsnr(t, res, base)
    np.testing.assert_allclose(
      shifted, schedules.cosine_logsnr(t) + 2 * math.log(base / res), rtol=1e-6, atol=1e-5
    )
  # More pixels need more noise: the larger image has the lower log-SNR everywhere.
  assert np.all(
    np.asarray(schedules.shifted_cosine_logsnr(t, 256, 64)) < np.asarray(schedules.cosine_logsnr(t))
  )


@pytest.mark.parametrize('beta_end', [0.02, 0.3])
def test_linear_beta_matches_discrete_ddpm(beta_end):
  n = 1000
  betas = np.linspace(1e-4, beta_end, n)
  alpha_bar = np.cumprod(1.0 - betas)
  expected = np.log(alpha_bar / (1.0 - alpha_bar))
  t = np.arange(1, n + 1) / n
  got = np.asarray(schedules.linear_beta_logsnr(t, 1e-4, beta_end, n, logsnr_min=-1e3))
  np.testing.assert_allclose(got, expected, atol=2e-4, rtol=1e-5)
  # At t = 0 the data is clean: infinite SNR, clipped to logsnr_max.
  assert float(schedules.linear_beta_logsnr(0.0)) == 20.0


def test_logsnr_to_t_inverts():
  t = jnp.linspace(0.001, 0.999, 41)
  for name, fn in _schedule_fns().items():
    t_back = schedules.logsnr_to_t(fn, fn(t))
    np.testing.assert_allclose(t_back, t, atol=2e-5, err_msg=name)
  # Out of range maps to the nearest end.
  np.testing.assert_allclose(
    schedules.logsnr_to_t(schedules.cosine_logsnr, jnp.array([50.0, -50.0])), [0.0, 1.0], atol=1e-6
  )


def test_the_config_binds_the_schedule(test_config):
  from idm_jax.runtime import configlib

  cfg = test_config.diffusion
  t = jnp.linspace(0.0, 1.0, 9)
  cfg.schedule = 'cosine'
  np.testing.assert_allclose(
    configlib.logsnr_fn(cfg, 32)(t), schedules.cosine_logsnr(t, cfg.logsnr_min, cfg.logsnr_max)
  )
  cfg.schedule = 'shifted_cosine'
  cfg.shift_base_resolution = 64
  np.testing.assert_allclose(
    configlib.logsnr_fn(cfg, 256)(t), schedules.shifted_cosine_logsnr(t, 256, 64), rtol=1e-6
  )
  cfg.schedule = 'linear'
  np.testing.assert_allclose(configlib.logsnr_fn(cfg, 32)(t), schedules.linear_beta_logsnr(t))
  cfg.schedule = 'cosine'
  cfg.logsnr_min, cfg.logsnr_max = -7.0, 9.0
  np.testing.assert_allclose(
    configlib.logsnr_fn(cfg, 32)(jnp.array([0.0, 1.0])), [9.0, -7.0], atol=1e-5
  )
  cfg.schedule = 'sigmoid'
  with pytest.raises(ValueError, match='diffusion.schedule'):
    configlib.logsnr_fn(cfg, 32)
