"""Tests for idm_jax.diffusion.samplers.

Two kinds of exact reference:
  * an oracle denoiser that knows the data x0 (every sampler must return x0, and the states it
    visits must lie exactly on the forward process at the log-SNR it reports);
  * Gaussian data x0 ~ N(mu, s^2) per pixel, whose optimal denoiser E[x0 | x_t] and whose
    probability-flow ODE map (the monotone affine transport from N(0, 1) to N(mu, s^2)) are
    known in closed form.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idm_jax.diffusion import objectives
from idm_jax.diffusion import samplers
from idm_jax.diffusion import schedules

PARAMS = ('eps', 'v', 'x0')
VARIANTS = (('ddpm', 0.0), ('ddim', 0.0), ('ddim', 1.0), ('dpmpp_2m', 0.0))
LOGSNR_FN = schedules.cosine_logsnr
SHAPE = (2, 8, 8, 3)
MU, STD = 0.2, 0.3


def _x0(seed=1):
  return jax.random.uniform(jax.random.key(seed), SHAPE, minval=-1.0, maxval=1.0)


def _recording_oracle(x0, param, calls):
  """model_fn that returns the exact prediction for x0 and records what it was given."""

  def model_fn(x_t, logsnr):
    calls.append((np.asarray(x_t), np.asarray(logsnr)))
    return objectives.x0_to_pred(x0, x_t, logsnr, param)

  return model_fn


def _implied_eps(x0, x_t, logsnr):
  alpha, sigma = schedules.alpha_sigma(logsnr[:, None, None, None])
  return np.asarray((x_t - alpha * x0) / sigma)


@pytest.mark.parametrize('param', PARAMS)
def test_oracle_denoiser_recovers_data_exactly(param):
  x0 = _x0()
  init_noise = jax.random.normal(jax.random.split(jax.random.key(0))[0], SHAPE)
  # Eager execution lets the oracle record each call; it is also faster than compiling 16
  # programs here. test_jit_and_determinism covers the compiled path.
  with jax.disable_jit():
    for sampler, eta in VARIANTS:
      for steps in (1, 2, 7, 50):
        msg = f'{param} {sampler} eta={eta} steps={steps}'
        calls = []
        out = samplers.sample(
          _recording_oracle(x0, param, calls),
          jax.random.key(0),
          SHAPE,
          logsnr_fn=LOGSNR_FN,
          parameterization=param,
          sampler=sampler,
          steps=steps,
          eta=eta,
        )
        assert out.dtype == jnp.float32 and out.shape == SHAPE
        # eps-prediction at logsnr = -20 divides by alpha = 4.5e-5 to get x0: float32 rounding
        # is amplified ~2e4 times, so one step from pure noise is only good to ~1e-2.
        tol = 2e-2 if (param == 'eps' and steps == 1) else 1e-5
        np.testing.assert_allclose(out, x0, atol=tol, err_msg=msg)
        # The model saw each grid time once, in order, as a per-example (B,) float32 logsnr.
        assert len(calls) == steps, msg
        want = np.asarray(LOGSNR_FN(1.0 - np.arange(steps) / steps))
        got = np.stack([l for _, l in calls])
        assert got.shape == (steps, SHAPE[0]) and got.dtype == np.float32, msg
        np.testing.assert_allclose(
          got, np.repeat(want[:, None], SHAPE[0], 1), rtol=1e-6, atol=1e-6, err_msg=msg
        )
        # Every state lies on the forward process at the reported logsnr. The deterministic
        # samplers (DDIM eta 0, DPM-Solver++) keep the starting noise exactly; the stochastic
        # ones mix in fresh noise, but it must stay unit-variance noise.
        for k, (x_t, l) in enumerate(calls):
          eps = _implied_eps(x0, x_t, l)
          if eta == 0.0 and sampler != 'ddpm':
            # (eps-prediction: the first x0 estimate's ~2e-3 error, see above, carries over.)
            np.testing.assert_allclose(
              eps, init_noise, atol=1e-2 if param == 'eps' else 1e-4, err_msg=f'{msg} call {k}'
            )
          else:
            assert abs(eps.std() - 1.0) < 0.15 and abs(eps.mean()) < 0.15, f'{msg} call {k}'
            if k > 0:  # fresh noise really was added
              assert not np.allclose(eps, init_noise, atol=1e-2), f'{msg} call {k}'
        if eta > 0 and steps >= 7:
          _check_posterior_noise(x0, calls, eta if sampler == 'ddim' else 1.0, msg)


def _check_posterior_noise(x0, calls, eta, msg):
  """Each stochastic step t -> s keeps a share rho = sqrt(1 - c^2 / sigma_s^2) of the old
  noise, with c^2 / sigma_s^2 = eta^2 (1 - SNR_t / SNR_s) (eta = 1: the DDPM posterior), and
  adds fresh unit noise for the rest. Undo that and the fresh part must be N(0, 1), independent
  of the old noise; a wrong posterior variance fails this."""
  fresh, old = [], []
  for (x_t, l_t), (x_s, l_s) in zip(calls[1:-1], calls[2:]):
    # (Skips the first step: for eps-prediction its x0 estimate is only good to ~2e-3.)
    frac = eta**2 * -np.expm1(l_t[0] - l_s[0])
    e_t, e_s = _implied_eps(x0, x_t, l_t), _implied_eps(x0, x_s, l_s)
    fresh.append((e_s - np.sqrt(1.0 - frac) * e_t) / np.sqrt(frac))
    old.append(e_t)
  fresh, old = np.concatenate(fresh).ravel(), np.concatenate(old).ravel()
  assert abs(fresh.std() - 1.0) < 0.05 and abs(fresh.mean()) < 0.05, (msg, fresh.std())
  assert abs(np.corrcoef(fresh, old)[0, 1]) < 0.05, msg


def test_clipping_keeps_state_on_the_clipped_estimate_path():
  """With clip_x0, eps is recomputed from the clipped x0 so that (x0_hat, eps_hat) still
  reproduce x_t; deterministic DDIM then stays on one forward path, that of x0 = clip(x0_hat)."""
  calls = []

  def too_bright(x_t, logsnr):  # always predicts x0 = 3, which clips to 1
    calls.append((np.asarray(x_t), np.asarray(logsnr)))
    return objectives.x0_to_pred(jnp.full(x_t.shape, 3.0), x_t, logsnr, 'v')

  with jax.disable_jit():
    out = samplers.sample(
      too_bright,
      jax.random.key(5),
      SHAPE,
      logsnr_fn=LOGSNR_FN,
      parameterization='v',
      sampler='ddim',
      steps=6,
    )
  np.testing.assert_allclose(out, 1.0)
  first = _implied_eps(np.ones(SHAPE), *calls[0])
  for x_t, l in calls[1:]:
    np.testing.assert_allclose(_implied_eps(np.ones(SHAPE), x_t, l), first, atol=1e-4)


@pytest.mark.parametrize('sampler,eta', VARIANTS)
def test_oracle_from_noised_start_image(sampler, eta):
  x_start = _x0(seed=4)
  t_start, steps = 0.4, 5
  calls = []
  with jax.disable_jit():
    out = samplers.sample(
      _recording_oracle(x_start, 'v', calls),
      jax.random.key(2),
      SHAPE,
      logsnr_fn=LOGSNR_FN,
      parameterization='v',
      sampler=sampler,
      steps=steps,
      eta=eta,
      t_start=t_start,
      x_start=x_start,
    )
  np.testing.assert_allclose(out, x_start, atol=1e-5)
  want = np.asarray(LOGSNR_FN(t_start * (1.0 - np.arange(steps) / steps)))
  np.testing.assert_allclose(np.stack([l[0] for _, l in calls]), want, rtol=1e-6, atol=1e-6)
  # The first state is x_start noised to logsnr(t_start) with unit Gaussian noise.
  eps = _implied_eps(x_start, *calls[0])
  assert abs(eps.std() - 1.0) < 0.15 and abs(eps.mean()) < 0.15


def test_start_image_is_required_and_checked():
  kw = dict(logsnr_fn=LOGSNR_FN, parameterization='v', steps=2)
  model_fn = lambda x, l: x
  with pytest.raises(ValueError, match='x_start'):
    samplers.sample(model_fn, jax.random.key(0), SHAPE, t_start=0.5, **kw)
  with pytest.raises(ValueError, match='x_start'):
    samplers.sample(
      model_fn, jax.random.key(0), SHAPE, t_start=0.5, x_start=jnp.zeros((1, 8, 8, 3)), **kw
    )
  with pytest.raises(ValueError, match='sampler'):
    samplers.sample(model_fn, jax.random.key(0), SHAPE, sampler='euler', **kw)
  with pytest.raises(ValueError, match='t_start'):
    samplers.sample(model_fn, jax.random.key(0), SHAPE, t_start=1.5, **kw)


def _gaussian_denoiser(param):
  """The exact E[x0 | x_t] for x0 ~ N(MU, STD^2) per pixel, as a `param` prediction."""

  def model_fn(x_t, logsnr):
    alpha, sigma = schedules.alpha_sigma(logsnr[:, None, None, None])
    gain = alpha * STD**2 / (alpha**2 * STD**2 + sigma**2)
    return objectives.x0_to_pred(MU + gain * (x_t - alpha * MU), x_t, logsnr, param)

  return model_fn


def _gaussian_sample(sampler, steps, shape, param='v', eta=0.0, seed=3):
  fn = jax.jit(
    functools.partial(
      samplers.sample,
      _gaussian_denoiser(param),
      shape=shape,
      logsnr_fn=LOGSNR_FN,
      parameterization=param,
      sampler=sampler,
      steps=steps,
      eta=eta,
      clip_x0=False,
    )
  )
  return np.asarray(fn(jax.random.key(seed)))


def _exact_ode_solution(shape, seed=3):
  """Probability-flow ODE from t = 1 for Gaussian data: in 1-D the flow is monotone, so it is
  the affine map from N(alpha_1 MU, alpha_1^2 STD^2 + sigma_1^2) to N(MU, STD^2)."""
  noise = jax.random.normal(jax.random.split(jax.random.key(seed))[0], shape)
  alpha, sigma = schedules.alpha_sigma(LOGSNR_FN(1.0))
  return np.asarray(MU + STD * (noise - alpha * MU) / jnp.sqrt(alpha**2 * STD**2 + sigma**2))


@pytest.mark.parametrize('sampler,param', [('ddim', 'eps'), ('ddpm', 'v'), ('dpmpp_2m', 'x0')])
def test_gaussian_data_is_sampled_with_right_moments(sampler, param):
  shape = (4, 16, 16, 3)  # 3072 independent pixels
  out = _gaussian_sample(sampler, 200 if sampler != 'dpmpp_2m' else 50, shape, param)
  # Standard errors: mean ~0.0054, std ~0.0038; the tolerances are ~5 of them.
  assert abs(out.mean() - MU) < 0.03, out.mean()
  assert abs(out.std() - STD) < 0.02, out.std()
  if sampler != 'ddpm':  # deterministic: the ODE solution itself, pixel by pixel
    np.testing.assert_allclose(out, _exact_ode_solution(shape), atol=0.03)


def test_dpm_solver_beats_ddim_at_equal_steps():
  """Second order: at 10 steps DPM-Solver++(2M) lands closer to the exact ODE solution (which
  many-step DDIM converges to) than DDIM does."""
  shape = (2, 8, 8, 3)
  exact = _exact_ode_solution(shape)
  rms = lambda a: float(np.sqrt(np.mean((a - exact) ** 2)))
  ddim_fine = rms(_gaussian_sample('ddim', 400, shape))
  ddim_10 = rms(_gaussian_sample('ddim', 10, shape))
  dpm_10 = rms(_gaussian_sample('dpmpp_2m', 10, shape))
  dpm_20 = rms(_gaussian_sample('dpmpp_2m', 20, shape))
  assert ddim_fine < 0.01, ddim_fine
  assert dpm_10 < 0.75 * ddim_10, (dpm_10, ddim_10)
  # Halving the step size cuts a second-order method's error ~4x (a first-order one's ~2x;
  # the final x0 step is O(h^2) here too, as sigma^2 ~ t^2 near t = 0). Measured: 0.12;
  # with r = h_prev / h inverted, 0.38.
  assert dpm_20 < 0.3 * dpm_10, (dpm_20, dpm_10)


def test_jit_and_determinism():
  model_fn = _gaussian_denoiser('v')
  run = jax.jit(
    functools.partial(
      samplers.sample,
      model_fn,
      shape=SHAPE,
      logsnr_fn=LOGSNR_FN,
      parameterization='v',
      sampler='ddpm',
      steps=6,
    )
  )
  a, b, c = run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(1))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  assert np.all(np.abs(np.asarray(a)) <= 1.0)  # clip_x0 defaults to True
  # DDIM with a traced eta: eta = 0 is deterministic given the start noise, eta > 0 is not.
  run_eta = jax.jit(
    lambda rng, eta: samplers.sample(
      model_fn,
      rng,
      SHAPE,
      logsnr_fn=LOGSNR_FN,
      parameterization='v',
      sampler='ddim',
      steps=6,
      eta=eta,
    )
  )
  np.testing.assert_allclose(
    run_eta(jax.random.key(0), 0.0),
    samplers.sample(
      model_fn,
      jax.random.key(0),
      SHAPE,
      logsnr_fn=LOGSNR_FN,
      parameterization='v',
      sampler='ddim',
      steps=6,
    ),
    atol=1e-5,
  )
  assert not np.allclose(run_eta(jax.random.key(0), 0.0), run_eta(jax.random.key(0), 1.0))


def test_guided():
  cond = lambda x, l: 2.0 * x + l[:, None, None, None]
  uncond = lambda x, l: -x
  x = jax.random.normal(jax.random.key(0), SHAPE)
  l = jnp.array([0.5, -1.0])
  assert samplers.guided(cond, uncond, 1.0) is cond
  np.testing.assert_allclose(samplers.guided(cond, uncond, 0.0)(x, l), uncond(x, l))
  np.testing.assert_allclose(
    samplers.guided(cond, uncond, 3.0)(x, l),
    uncond(x, l) + 3.0 * (cond(x, l) - uncond(x, l)),
    rtol=1e-6,
  )
  # A traced scale works too (no Python branch on it).
  np.testing.assert_allclose(
    jax.jit(lambda s: samplers.guided(cond, uncond, s)(x, l))(1.0), cond(x, l), rtol=1e-6
  )


class _ResidualOracle:
  """Stands in for the UNet: the exact prediction of the residual hq - lq (model range)."""

  def __init__(self, hq, param):
    self.hq, self.param = hq, param

  def apply(self, variables, x_t, logsnr, lq, train=False, drop_cond=None):
    from idm_jax.diffusion import objectives

    return objectives.x0_to_pred(self.hq - lq, x_t, logsnr, self.param)


@pytest.mark.parametrize('param', ('eps', 'v', 'x0'))
def test_residual_sampling_adds_the_lq_back(param):
  import jax

  from idm_jax.diffusion import schedules

  rng = np.random.default_rng(2)
  hq = rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
  lq = np.clip(hq + rng.normal(0, 0.5, hq.shape), -1, 1).astype(np.float32)
  for sampler, t_start in (('ddim', 1.0), ('ddpm', 1.0), ('dpmpp_2m', 0.5)):
    out = samplers.sample_batch(
      _ResidualOracle(hq, param),
      None,
      lq,
      jax.random.key(0),
      shape=hq.shape,
      logsnr_fn=schedules.cosine_logsnr,
      parameterization=param,
      sampler=sampler,
      steps=5,
      eta=0.0,
      t_start=t_start,
      residual=True,
    )
    np.testing.assert_allclose(out, hq, atol=2e-3 if param == 'eps' else 1e-5)
  # Without residual=True the same oracle's output is hq - lq: the flag is what adds lq back.
  plain = samplers.sample_batch(
    _ResidualOracle(hq, param),
    None,
    lq,
    jax.random.key(0),
    shape=hq.shape,
    logsnr_fn=schedules.cosine_logsnr,
    parameterization=param,
    sampler='ddim',
    steps=5,
    eta=0.0,
    t_start=1.0,
    residual=False,
  )
  assert np.abs(np.asarray(plain) - hq).max() > 0.1
