"""Forward process, parameterisations and the training loss.

x_t = alpha * x0 + sigma * eps with (alpha, sigma) = schedules.alpha_sigma(logsnr). The network
predicts one of three equivalent quantities (`LossSpec.parameterization`):
  'eps': the noise eps;
  'x0':  the clean image x0;
  'v':   v = alpha * eps - sigma * x0 (Salimans & Ho 2022), well conditioned at both ends.
Given x_t and logsnr each determines the other two; pred_to_x0_eps and x0_to_pred convert.

`logsnr` is always per example, shape (B,), and broadcasts over the remaining (H, W, C) axes.
Everything is pure and jit-able; the network is passed in as `model_fn(x_t, logsnr) -> pred`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from idm_jax.diffusion import schedules

PARAMETERIZATIONS = ('eps', 'v', 'x0')
LOSSES = ('mse', 'l1')
LOSS_WEIGHTINGS = ('none', 'min_snr')
ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def check_parameterization(parameterization: str):
  """Raises ValueError naming the config field if `parameterization` is unknown."""
  if parameterization not in PARAMETERIZATIONS:
    raise ValueError(
      f'config.diffusion.parameterization: unknown {parameterization!r}; '
      f'choose one of {PARAMETERIZATIONS}'
    )


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """What the training loss compares and how it weights it (configlib.loss_spec binds it to
  config.diffusion, whose field names the errors use)."""

  parameterization: str = 'v'  # what the network predicts: PARAMETERIZATIONS
  loss: str = 'mse'  # LOSSES
  loss_weighting: str = 'none'  # LOSS_WEIGHTINGS
  min_snr_gamma: float = 5.0

  def __post_init__(self):
    check_parameterization(self.parameterization)
    if self.loss not in LOSSES:
      raise ValueError(f'config.diffusion.loss: unknown {self.loss!r}; choose one of {LOSSES}')
    if self.loss_weighting not in LOSS_WEIGHTINGS:
      raise ValueError(
        f'config.diffusion.loss_weighting: unknown {self.loss_weighting!r}; '
        f'choose one of {LOSS_WEIGHTINGS}'
      )
    if not self.min_snr_gamma > 0:
      raise ValueError(f'config.diffusion.min_snr_gamma={self.min_snr_gamma} must be > 0')


def _bcast(a: jnp.ndarray, like: jnp.ndarray) -> jnp.ndarray:
  """Reshapes a per-example (B,) array to (B, 1, ..., 1) so it broadcasts against `like`."""
  a = jnp.asarray(a, jnp.float32)
  if a.ndim == 0:
    return a
  if a.ndim != 1 or a.shape[0] != like.shape[0]:
    raise ValueError(
      f'logsnr must be a scalar or have shape ({like.shape[0]},) to match a batch '
      f'of shape {like.shape}; got {a.shape}'
    )
  return a.reshape(a.shape + (1,) * (like.ndim - 1))


def _alpha_sigma_like(logsnr, like):
  alpha, sigma = schedules.alpha_sigma(logsnr)
  return _bcast(alpha, like), _bcast(sigma, like)


def q_sample(x0: jnp.ndarray, eps: jnp.ndarray, logsnr: jnp.ndarray) -> jnp.ndarray:
  """Draws x_t ~ q(x_t | x0) given the noise: alpha * x0 + sigma * eps."""
  alpha, sigma = _alpha_sigma_like(logsnr, x0)
  return alpha * x0 + sigma * eps


def target_for(
  x0: jnp.ndarray, eps: jnp.ndarray, logsnr: jnp.ndarray, parameterization: str
) -> jnp.ndarray:
  """What a perfect network would output for this (x0, eps, logsnr)."""
  check_parameterization(parameterization)
  if parameterization == 'eps':
    return eps
  if parameterization == 'x0':
    return x0
  alpha, sigma = _alpha_sigma_like(logsnr, x0)
  return alpha * eps - sigma * x0


def pred_to_x0_eps(
  pred: jnp.ndarray, x_t: jnp.ndarray, logsnr: jnp.ndarray, parameterization: str
) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Converts a network output to (x0_hat, eps_hat), exactly (no clipping).

  Note the conditioning: from 'eps' the x0 estimate divides by alpha (large error amplification
  near pure noise), from 'x0' the eps estimate divides by sigma (near clean data). 'v' needs no
  division because alpha^2 + sigma^2 = 1.
  """
  check_parameterization(parameterization)
  pred = pred.astype(jnp.float32)
  x_t = x_t.astype(jnp.float32)
  alpha, sigma = _alpha_sigma_like(logsnr, x_t)
  if parameterization == 'eps':
    return (x_t - sigma * pred) / alpha, pred
  if parameterization == 'x0':
    return pred, (x_t - alpha * pred) / sigma
  return alpha * x_t - sigma * pred, sigma * x_t + alpha * pred


def x0_to_pred(
  x0: jnp.ndarray, x_t: jnp.ndarray, logsnr: jnp.ndarray, parameterization: str
) -> jnp.ndarray:
  """The network output that pred_to_x0_eps maps to x0_hat = x0 at (x_t, logsnr).

  Used by samplers to recompute eps after clipping x0, and by tests to build oracle denoisers.
  """
  check_parameterization(parameterization)
  x0 = x0.astype(jnp.float32)
  x_t = x_t.astype(jnp.float32)
  if parameterization == 'x0':
    return x0
  alpha, sigma = _alpha_sigma_like(logsnr, x_t)
  if parameterization == 'eps':
    return (x_t - alpha * x0) / sigma
  # v = alpha eps - sigma x0 with eps = (x_t - alpha x0) / sigma simplifies, using
  # alpha^2 + sigma^2 = 1, to (alpha x_t - x0) / sigma.
  return (alpha * x_t - x0) / sigma


def loss_weight(logsnr: jnp.ndarray, spec: LossSpec) -> jnp.ndarray:
  """Per-example loss weight, shape like logsnr.

  'min_snr' is min-SNR-gamma (Hang et al. 2023): weight min(SNR, gamma) on the x0-space MSE.
  Since ||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2 and ||v - v_hat||^2 = (SNR + 1)
  ||x0 - x0_hat||^2, the same weighting in the network's own target space is
    x0:  min(SNR, gamma)
    eps: min(SNR, gamma) / SNR       = min(1, gamma / SNR)
    v:   min(SNR, gamma) / (SNR + 1) = sigmoid(logsnr) * min(1, gamma / SNR)
  written with exp(-logsnr) so nothing overflows. For the l1 loss the same weights are used.
  """
  logsnr = jnp.asarray(logsnr, jnp.float32)
  if spec.loss_weighting == 'none':
    return jnp.ones_like(logsnr)
  gamma, param = float(spec.min_snr_gamma), spec.parameterization
  if param == 'x0':
    return jnp.minimum(jnp.exp(logsnr), gamma)
  capped = jnp.minimum(1.0, gamma * jnp.exp(-logsnr))  # min(SNR, gamma) / SNR
  if param == 'eps':
    return capped
  return jax.nn.sigmoid(logsnr) * capped


def loss_per_example(
  pred: jnp.ndarray, x0: jnp.ndarray, eps: jnp.ndarray, logsnr: jnp.ndarray, spec: LossSpec
) -> jnp.ndarray:
  """Weighted mse or l1 between pred and the parameterisation's target; (B,) float32."""
  target = target_for(
    x0.astype(jnp.float32), eps.astype(jnp.float32), logsnr, spec.parameterization
  )
  err = pred.astype(jnp.float32) - target
  err = jnp.square(err) if spec.loss == 'mse' else jnp.abs(err)
  per_example = jnp.mean(err, axis=tuple(range(1, err.ndim)))
  return per_example * loss_weight(logsnr, spec)


def sample_t(rng: jax.Array, batch_size: int) -> jnp.ndarray:
  """Times in [0, 1) for a batch: low-discrepancy (stratified with one shared random offset).

  t_i = (u + i / B) mod 1 covers [0, 1) evenly within every batch (VDM), which lowers the
  variance of the batch loss; each t_i is still marginally uniform.
  """
  u = jax.random.uniform(rng, (), jnp.float32)
  t = jnp.mod(u + jnp.arange(batch_size, dtype=jnp.float32) / batch_size, 1.0)
  # A guard only: keeps the documented half-open range even if float rounding ever gave 1.0.
  return jnp.minimum(t, jnp.float32(1.0 - 2.0**-24))


def training_loss(
  model_fn: ModelFn, x0: jnp.ndarray, rng: jax.Array, logsnr_fn, spec: LossSpec
) -> tuple[jnp.ndarray, dict[str, Any]]:
  """Mean diffusion loss over a batch of clean images x0 (float, [-1, 1], NHWC).

  Draws t (stratified) and eps, builds x_t, calls model_fn(x_t, logsnr) and returns
  (mean loss float32, {'loss_per_example': (B,), 'logsnr': (B,)}).
  """
  if not jnp.issubdtype(x0.dtype, jnp.floating):
    raise ValueError(
      f'training_loss: x0 must be float in [-1, 1], got dtype {x0.dtype} '
      '(convert uint8 images with x / 127.5 - 1 first)'
    )
  t_rng, eps_rng = jax.random.split(rng)
  x0 = x0.astype(jnp.float32)
  t = sample_t(t_rng, x0.shape[0])
  logsnr = logsnr_fn(t)
  eps = jax.random.normal(eps_rng, x0.shape, jnp.float32)
  x_t = q_sample(x0, eps, logsnr)
  pred = model_fn(x_t, logsnr)
  if pred.shape != x0.shape:
    raise ValueError(f'training_loss: model output shape {pred.shape} != image shape {x0.shape}')
  per_example = loss_per_example(pred, x0, eps, logsnr, spec)
  return jnp.mean(per_example), {'loss_per_example': per_example, 'logsnr': logsnr}
