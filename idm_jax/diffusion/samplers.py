"""Samplers: DDPM (ancestral), DDIM (with eta) and DPM-Solver++(2M), as one lax.fori_loop.

The network enters only as `model_fn(x_t, logsnr) -> pred` (logsnr of shape (B,), float32), so
the same code samples conditional models (close over the LQ image), unconditional ones and
classifier-free guided ones (see `guided`).

Time grid: t_i = t_start * (1 - i / steps), i = 0..steps. Step i evaluates the model at t_i and
moves x to t_{i+1}. The last step goes to t = 0, i.e. to clean data, where every first-order
update reduces to the model's x0 estimate; so the output is x0_hat from the evaluation at
t_{steps-1} (clipped to [-1, 1] if clip_x0). Conditioning is continuous in logsnr, so any
number of steps works with any trained model.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from idm_jax.diffusion import objectives
from idm_jax.diffusion import schedules

SAMPLERS = ('ddpm', 'ddim', 'dpmpp_2m')
ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


@dataclasses.dataclass(frozen=True)
class Settings:
  """How to sample: one frozen, hashable value that the trainer's sample grids and the
  Restorer share (and key their compiled samplers on). configlib.sample_settings binds it to
  config.sample."""

  sampler: str = 'ddim'  # SAMPLERS
  steps: int = 50
  eta: float = 0.0  # DDIM stochasticity in [0, 1]
  t_start: float = 1.0  # in (0, 1]; below 1 starts from the noised LQ
  guidance_scale: float = 1.0  # classifier-free guidance; 1 = off

  def __post_init__(self):
    # Worded by argument, not config field: the restore CLI and the web demo show these.
    if self.sampler not in SAMPLERS:
      raise ValueError(f'sampler {self.sampler!r} is not one of {SAMPLERS}')
    if int(self.steps) != self.steps or self.steps < 1:
      raise ValueError(f'steps={self.steps} must be an integer >= 1')
    if not 0.0 < self.t_start <= 1.0:
      raise ValueError(f't_start={self.t_start} must be in (0, 1]')
    if not 0.0 <= self.eta <= 1.0:
      raise ValueError(f'eta={self.eta} must be in [0, 1]')


def guided(model_fn_cond: ModelFn, model_fn_uncond: ModelFn, scale) -> ModelFn:
  """Classifier-free guidance: uncond + scale * (cond - uncond).

  Linear in the prediction, so it is the same rule in eps, v and x0 space (each is an affine
  function of eps given x_t). scale = 1 returns model_fn_cond itself (no second network call).
  """
  if isinstance(scale, (int, float)) and float(scale) == 1.0:
    return model_fn_cond

  def model_fn(x_t, logsnr):
    uncond = model_fn_uncond(x_t, logsnr).astype(jnp.float32)
    cond = model_fn_cond(x_t, logsnr).astype(jnp.float32)
    return uncond + scale * (cond - uncond)

  return model_fn


def _ddim_update(x0_hat, eps_hat, logsnr_t, logsnr_s, eta, noise_rng):
  """One DDIM step t -> s (s < t): x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z.

  c^2 = eta^2 * sigma_s^2 * (1 - SNR_t / SNR_s): eta = 1 is the DDPM posterior q(x_s | x_t, x0)
  (ancestral sampling), eta = 0 the deterministic probability-flow (DDIM) update.
  """
  alpha_s, sigma_s = schedules.alpha_sigma(logsnr_s)
  if isinstance(eta, (int, float)) and float(eta) == 0.0:
    return alpha_s * x0_hat + sigma_s * eps_hat
  # -expm1(l_t - l_s) = 1 - SNR_t / SNR_s, accurate when the step is small.
  c2 = jnp.square(eta) * jnp.square(sigma_s) * -jnp.expm1(logsnr_t - logsnr_s)
  c2 = jnp.clip(c2, 0.0, jnp.square(sigma_s))
  z = jax.random.normal(noise_rng, x0_hat.shape, jnp.float32)
  return alpha_s * x0_hat + jnp.sqrt(jnp.square(sigma_s) - c2) * eps_hat + jnp.sqrt(c2) * z


def _dpmpp_2m_update(x, x0_hat, x0_prev, logsnr_prev, logsnr_t, logsnr_s, first):
  """One DPM-Solver++(2M) step t -> s (Lu et al. 2022, Algorithm 2), data prediction.

  With lambda = logsnr / 2 and h = lambda_s - lambda_t:
    x_s = (sigma_s / sigma_t) x_t - alpha_s expm1(-h) D,
    D = (1 + 1/(2r)) x0_hat(t) - 1/(2r) x0_hat(t_prev),  r = h_prev / h,
  and D = x0_hat(t) (first order, i.e. DDIM) on the first step, where no history exists.
  """
  _, sigma_t = schedules.alpha_sigma(logsnr_t)
  alpha_s, sigma_s = schedules.alpha_sigma(logsnr_s)
  h = 0.5 * (logsnr_s - logsnr_t)
  h_prev = 0.5 * (logsnr_t - logsnr_prev)
  # On the first step h_prev = 0; substitute r = 1 so the unused branch stays finite.
  r = jnp.where(first, 1.0, h_prev / h)
  d2 = (1.0 + 0.5 / r) * x0_hat - (0.5 / r) * x0_prev
  d = jnp.where(first, x0_hat, d2)
  return (sigma_s / sigma_t) * x - alpha_s * jnp.expm1(-h) * d


def sample(
  model_fn: ModelFn,
  rng: jax.Array,
  shape: Sequence[int],
  *,
  logsnr_fn: Callable[[jnp.ndarray], jnp.ndarray],
  parameterization: str,
  sampler: str = 'ddim',
  steps: int = 50,
  eta: float = 0.0,
  t_start: float = 1.0,
  x_start: Optional[jnp.ndarray] = None,
  clip_x0: bool = True,
  x0_bounds: Optional[tuple] = None,
) -> jnp.ndarray:
  """Runs the reverse process from t_start to 0 in `steps` steps; returns x0 (float32).

  Args:
    model_fn: (x_t (B, H, W, C) float32, logsnr (B,) float32) -> prediction in
      `parameterization` space.
    rng: PRNG key. The start noise and every step's noise derive from it (per-step keys by
      fold_in with the step index), so a fixed key gives a fixed result.
    shape: (B, H, W, C) of the output.
    logsnr_fn: the schedule, t -> logsnr (schedules.get_logsnr_fn).
    parameterization: 'eps' | 'v' | 'x0', what model_fn predicts.
    sampler: 'ddpm' (ancestral; eta is forced to 1), 'ddim' (uses eta; 0 = deterministic) or
      'dpmpp_2m' (deterministic, second-order multistep; eta is ignored).
    steps: number of model evaluations; static (a Python int).
    eta: DDIM stochasticity in [0, 1]; may be a traced scalar.
    t_start: in (0, 1]; static. Below 1, sampling starts from x_start noised to
      logsnr(t_start) with fresh noise (the fidelity knob: smaller keeps more of the input).
    x_start: (B, H, W, C) float in [-1, 1], e.g. the upsampled LQ image. Required if t_start < 1.
    clip_x0: clip each x0 estimate to [-1, 1] (and recompute eps from the clipped estimate,
      keeping the two consistent with x_t).
    x0_bounds: (low, high), arrays broadcastable to `shape`, that replace [-1, 1] as the clip
      range: a model of the residual HQ - LQ clips to [-1 - LQ, 1 - LQ], which keeps the
      image it implies in [-1, 1].
  """
  objectives.check_parameterization(parameterization)
  if sampler not in SAMPLERS:
    raise ValueError(f'sample.sampler: unknown sampler {sampler!r}; choose one of {SAMPLERS}')
  if int(steps) != steps or steps < 1:
    raise ValueError(f'sample.steps: {steps} must be an integer >= 1')
  t_start = float(t_start)
  if not 0.0 < t_start <= 1.0:
    raise ValueError(f'sample.t_start: {t_start} must be in (0, 1]')
  shape = tuple(int(s) for s in shape)
  if x_start is None and t_start < 1.0:
    raise ValueError(f'sample: t_start={t_start} < 1 needs x_start (the image to start from)')
  if x_start is not None and tuple(x_start.shape) != shape:
    raise ValueError(f'sample: x_start has shape {tuple(x_start.shape)}, expected {shape}')
  steps = int(steps)
  if sampler == 'ddpm':
    eta = 1.0
  batch = shape[0]

  init_rng, step_rng = jax.random.split(rng)
  noise = jax.random.normal(init_rng, shape, jnp.float32)
  if x_start is None:
    x = noise
  else:
    x = objectives.q_sample(
      x_start.astype(jnp.float32), noise, jnp.full((batch,), logsnr_fn(jnp.float32(t_start)))
    )

  def logsnr_at(i):
    t = t_start * (1.0 - jnp.asarray(i, jnp.float32) / steps)
    return jnp.asarray(logsnr_fn(t), jnp.float32)

  def body(i, carry):
    x, x0_prev, logsnr_prev, _ = carry
    logsnr_t, logsnr_s = logsnr_at(i), logsnr_at(i + 1)
    logsnr_b = jnp.full((batch,), logsnr_t)
    pred = model_fn(x, logsnr_b)
    if pred.shape != x.shape:
      raise ValueError(f'sample: model output shape {pred.shape} != sample shape {x.shape}')
    x0_hat, eps_hat = objectives.pred_to_x0_eps(pred, x, logsnr_b, parameterization)
    if clip_x0:
      x0_hat = jnp.clip(x0_hat, lo, hi)
      eps_hat = objectives.x0_to_pred(x0_hat, x, logsnr_b, 'eps')
    if sampler == 'dpmpp_2m':
      x_next = _dpmpp_2m_update(x, x0_hat, x0_prev, logsnr_prev, logsnr_t, logsnr_s, i == 0)
    else:
      x_next = _ddim_update(
        x0_hat, eps_hat, logsnr_t, logsnr_s, eta, jax.random.fold_in(step_rng, i)
      )
    return x_next, x0_hat, logsnr_t, x0_hat

  zeros = jnp.zeros(shape, jnp.float32)
  lo, hi = (-1.0, 1.0) if x0_bounds is None else x0_bounds
  init = (x, zeros, logsnr_at(jnp.int32(0)), zeros)
  _, _, _, x0 = jax.lax.fori_loop(0, steps, body, init)
  return x0


def sample_batch(
  model,
  params,
  lq,
  rng,
  *,
  shape,
  logsnr_fn,
  parameterization: str,
  sampler: str,
  steps: int,
  eta,
  t_start: float,
  guidance_scale=None,
  residual: bool = False,
):
  """The whole sampler loop for one batch of a denoiser: float32 x0 in [-1, 1] of `shape`.

  model: a flax module called as model.apply({'params': params}, x_t, logsnr, lq, train=False,
  [drop_cond=mask]) -> the parameterization's prediction (models/unet.py's UNet).

  lq: float [-1, 1] at the model resolution, or None for an unconditional model. t_start < 1
  starts from lq noised to that level (the fidelity knob). guidance_scale (None = off, may be
  traced) mixes in the model's null-condition prediction (classifier-free guidance).
  residual: the model denoises the residual HQ - LQ (config.diffusion.residual); the sampler
  runs in residual space, where t_start < 1 starts from a noised zero residual (the LQ itself),
  and the LQ is added back at the end.
  Pure and jit-able; shared by the Restorer and the trainer's sample grids.
  """

  def cond_fn(x_t, logsnr):
    return model.apply({'params': params}, x_t, logsnr, lq, train=False)

  model_fn = cond_fn
  if guidance_scale is not None:

    def uncond_fn(x_t, logsnr):
      drop = jnp.ones((x_t.shape[0],), bool)
      return model.apply({'params': params}, x_t, logsnr, lq, train=False, drop_cond=drop)

    model_fn = guided(cond_fn, uncond_fn, guidance_scale)
  # Residual: from a noised zero residual, x0 bounded so that LQ + x0 stays in [-1, 1].
  x_start, x0_bounds = lq, None
  if residual:
    if lq is None:
      raise ValueError('config.diffusion.residual: a residual model needs an LQ input')
    lq = jnp.asarray(lq, jnp.float32)
    x_start, x0_bounds = jnp.zeros(shape, jnp.float32), (-1.0 - lq, 1.0 - lq)
  out = sample(
    model_fn,
    rng,
    shape,
    logsnr_fn=logsnr_fn,
    parameterization=parameterization,
    sampler=sampler,
    steps=steps,
    eta=eta,
    t_start=t_start,
    x_start=x_start if t_start < 1.0 else None,
    clip_x0=True,
    x0_bounds=x0_bounds,
  )
  return jnp.clip(lq + out, -1.0, 1.0) if residual else out
