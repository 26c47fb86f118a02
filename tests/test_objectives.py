"""Tests for idm_jax.diffusion.objectives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idm_jax.diffusion import objectives
from idm_jax.diffusion import schedules

PARAMS = ('eps', 'v', 'x0')
SHAPE = (4, 6, 5, 3)


def _diff_cfg(**kw):
  return objectives.LossSpec(
    **dict(dict(parameterization='v', loss='mse', loss_weighting='none', min_snr_gamma=5.0), **kw)
  )


def _logsnr_fn():
  return schedules.get_logsnr_fn('cosine', SHAPE[1], logsnr_min=-20.0, logsnr_max=20.0)


def _data(seed=0, logsnr=(-6.0, -1.0, 0.5, 7.0)):
  k1, k2 = jax.random.split(jax.random.key(seed))
  x0 = jax.random.uniform(k1, SHAPE, minval=-1.0, maxval=1.0)
  eps = jax.random.normal(k2, SHAPE)
  return x0, eps, jnp.array(logsnr, jnp.float32)


def test_q_sample_broadcasts_per_example():
  x0, eps, logsnr = _data()
  x_t = np.asarray(objectives.q_sample(x0, eps, logsnr))
  for b, l in enumerate(np.asarray(logsnr, np.float64)):
    alpha, sigma = np.sqrt(1 / (1 + np.exp(-l))), np.sqrt(1 / (1 + np.exp(l)))
    np.testing.assert_allclose(
      x_t[b], alpha * np.asarray(x0[b]) + sigma * np.asarray(eps[b]), atol=1e-6
    )
  with pytest.raises(ValueError, match='logsnr'):
    objectives.q_sample(x0, eps, logsnr[:2])


def test_v_target_definition():
  x0, eps, logsnr = _data()
  alpha, sigma = schedules.alpha_sigma(logsnr)
  v = objectives.target_for(x0, eps, logsnr, 'v')
  np.testing.assert_allclose(
    v, alpha[:, None, None, None] * eps - sigma[:, None, None, None] * x0, atol=1e-6
  )
  np.testing.assert_array_equal(objectives.target_for(x0, eps, logsnr, 'eps'), eps)
  np.testing.assert_array_equal(objectives.target_for(x0, eps, logsnr, 'x0'), x0)


@pytest.mark.parametrize('param', PARAMS)
def test_target_agrees_with_pred_to_x0_eps(param):
  x0, eps, logsnr = _data()
  x_t = objectives.q_sample(x0, eps, logsnr)
  target = objectives.target_for(x0, eps, logsnr, param)
  x0_hat, eps_hat = objectives.pred_to_x0_eps(target, x_t, logsnr, param)
  np.testing.assert_allclose(x0_hat, x0, atol=1e-4)
  np.testing.assert_allclose(eps_hat, eps, atol=1e-4)
  # x0_to_pred is the inverse map: the exact prediction for the true x0 is the target.
  np.testing.assert_allclose(objectives.x0_to_pred(x0, x_t, logsnr, param), target, atol=1e-4)


@pytest.mark.parametrize('param', PARAMS)
def test_round_trip_pred_x0_pred(param):
  k1, k2 = jax.random.split(jax.random.key(3))
  pred = jax.random.normal(k1, SHAPE)
  x_t = jax.random.normal(k2, SHAPE)
  logsnr = jnp.array([-5.0, -0.3, 2.0, 6.0])
  x0_hat, eps_hat = objectives.pred_to_x0_eps(pred, x_t, logsnr, param)
  # Whatever the prediction, the pair is consistent with x_t ...
  np.testing.assert_allclose(objectives.q_sample(x0_hat, eps_hat, logsnr), x_t, atol=1e-4)
  # ... and converting back gives the prediction.
  np.testing.assert_allclose(
    objectives.x0_to_pred(x0_hat, x_t, logsnr, param), pred, atol=1e-3, rtol=1e-4
  )


def test_unknown_parameterization_raises():
  x0, eps, logsnr = _data()
  with pytest.raises(ValueError, match='parameterization'):
    objectives.target_for(x0, eps, logsnr, 'score')


def test_min_snr_weights_at_known_logsnr():
  # SNR = 1, gamma, 4 gamma, gamma / 4 with gamma = 5.
  logsnr = jnp.log(jnp.array([1.0, 5.0, 20.0, 1.25]))
  expected = {
    'x0': [1.0, 5.0, 5.0, 1.25],  # min(SNR, gamma)
    'eps': [1.0, 1.0, 0.25, 1.0],  # min(SNR, gamma) / SNR
    'v': [0.5, 5.0 / 6.0, 5.0 / 21.0, 1.25 / 2.25],  # min(SNR, gamma) / (SNR + 1)
  }
  for param, want in expected.items():
    cfg = _diff_cfg(parameterization=param, loss_weighting='min_snr')
    np.testing.assert_allclose(objectives.loss_weight(logsnr, cfg), want, rtol=1e-5, err_msg=param)
  np.testing.assert_array_equal(objectives.loss_weight(logsnr, _diff_cfg()), 1.0)
  # Extreme log-SNRs stay finite.
  for param in PARAMS:
    w = objectives.loss_weight(
      jnp.array([-20.0, 20.0]), _diff_cfg(parameterization=param, loss_weighting='min_snr')
    )
    assert np.all(np.isfinite(w)), param


def test_min_snr_is_the_same_x0_space_loss_for_every_parameterization():
  """The point of expressing the weighting per parameterization: for the same x0 estimate,
  the weighted losses agree and equal min(SNR, gamma) * ||x0 - x0_hat||^2."""
  x0, eps, logsnr = _data(logsnr=(-3.0, 0.0, 1.5, 4.0))
  x_t = objectives.q_sample(x0, eps, logsnr)
  x0_hat = x0 + 0.1 * jax.random.normal(jax.random.key(9), SHAPE)
  x0_mse = jnp.mean((x0_hat - x0) ** 2, axis=(1, 2, 3))
  expected = jnp.minimum(jnp.exp(logsnr), 5.0) * x0_mse
  for param in PARAMS:
    cfg = _diff_cfg(parameterization=param, loss_weighting='min_snr')
    pred = objectives.x0_to_pred(x0_hat, x_t, logsnr, param)
    loss = objectives.loss_per_example(pred, x0, eps, logsnr, cfg)
    np.testing.assert_allclose(loss, expected, rtol=1e-3, err_msg=param)


def test_loss_mse_and_l1_values():
  x0, eps, logsnr = _data()
  pred = eps + 0.5  # eps-prediction off by a constant 0.5 everywhere
  mse = objectives.loss_per_example(pred, x0, eps, logsnr, _diff_cfg(parameterization='eps'))
  l1 = objectives.loss_per_example(
    pred, x0, eps, logsnr, _diff_cfg(parameterization='eps', loss='l1')
  )
  assert mse.shape == (4,) and mse.dtype == jnp.float32
  np.testing.assert_allclose(mse, 0.25, rtol=1e-5)
  np.testing.assert_allclose(l1, 0.5, rtol=1e-5)
  with pytest.raises(ValueError, match='diffusion.loss'):
    objectives.loss_per_example(pred, x0, eps, logsnr, _diff_cfg(loss='huber'))


def test_sample_t_is_stratified_in_unit_interval():
  for seed in range(5):
    t = np.asarray(objectives.sample_t(jax.random.key(seed), 16))
    assert t.shape == (16,) and t.dtype == np.float32
    assert np.all((t >= 0) & (t < 1))
    # Exactly one t in each of the 16 equal bins.
    np.testing.assert_array_equal(np.sort(np.floor(t * 16)), np.arange(16))
  assert not np.allclose(
    objectives.sample_t(jax.random.key(0), 8), objectives.sample_t(jax.random.key(1), 8)
  )


@pytest.mark.parametrize('param', PARAMS)
def test_training_loss_is_zero_for_an_oracle(param):
  """A model that knows x0 and reads (x_t, logsnr) exactly has zero loss: this fails if
  training_loss hands the model an x_t or logsnr other than the ones behind the target."""
  x0, _, _ = _data()
  cfg = _diff_cfg(parameterization=param)
  logsnr_fn = _logsnr_fn()

  def oracle(x_t, logsnr):
    return objectives.x0_to_pred(x0, x_t, logsnr, param)

  loss, aux = objectives.training_loss(oracle, x0, jax.random.key(0), logsnr_fn, cfg)
  assert float(loss) < 1e-4
  assert aux['loss_per_example'].shape == (4,) and aux['logsnr'].shape == (4,)


def test_training_loss_gradients_flow_through_linear_model():
  x0, _, _ = _data()
  cfg = _diff_cfg(parameterization='v', loss_weighting='min_snr')
  logsnr_fn = _logsnr_fn()
  params = {'w': 0.1 * jnp.eye(3), 'b': jnp.zeros((3,)), 'c': jnp.zeros((3,))}

  def loss_fn(p, rng):
    def model_fn(x_t, logsnr):
      return x_t @ p['w'] + p['b'] + p['c'] * logsnr[:, None, None, None] / 20.0

    return objectives.training_loss(model_fn, x0, rng, logsnr_fn, cfg)

  (loss, aux), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, jax.random.key(1))
  assert loss.shape == () and loss.dtype == jnp.float32 and np.isfinite(float(loss))
  np.testing.assert_allclose(loss, jnp.mean(aux['loss_per_example']), rtol=1e-6)
  for name, g in grads.items():
    assert np.all(np.isfinite(g)) and float(jnp.abs(g).sum()) > 0, name
  # A few SGD steps reduce the loss on a fixed draw: the gradient points the right way.
  rng = jax.random.key(1)
  start = float(loss_fn(params, rng)[0])
  for _ in range(5):
    g = jax.grad(lambda p: loss_fn(p, rng)[0])(params)
    params = jax.tree.map(lambda p, gi: p - 0.5 * gi, params, g)
  assert float(loss_fn(params, rng)[0]) < start
  # Same key, same loss.
  np.testing.assert_array_equal(loss_fn(params, rng)[0], loss_fn(params, rng)[0])


def test_training_loss_rejects_uint8():
  cfg = _diff_cfg()
  with pytest.raises(ValueError, match='float'):
    objectives.training_loss(
      lambda x, l: x, jnp.zeros(SHAPE, jnp.uint8), jax.random.key(0), schedules.cosine_logsnr, cfg
    )
