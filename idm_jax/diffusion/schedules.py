"""Noise schedules as continuous-time log-SNR functions.

Conventions (shared by objectives.py and samplers.py):
  * time t in [0, 1]; t = 0 is clean data, t = 1 is (almost) pure noise;
  * logsnr(t) = log(alpha^2 / sigma^2) is strictly decreasing in t;
  * variance preserving: x_t = alpha * x0 + sigma * eps with alpha^2 + sigma^2 = 1, so
    alpha = sqrt(sigmoid(logsnr)) and sigma = sqrt(sigmoid(-logsnr)).

The network is conditioned on logsnr rather than on t, so a model trained with any schedule can
be sampled with any number of steps. All functions are pure and jit-able; schedule constants
(limits, resolutions) are Python floats/ints fixed at trace time.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

LogSnrFn = Callable[[jnp.ndarray], jnp.ndarray]
SCHEDULES = ('cosine', 'shifted_cosine', 'linear')


def alpha_sigma(logsnr: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Signal and noise scales of a variance-preserving process at `logsnr`.

  sigmoid keeps both well defined at extreme log-SNRs, where exp(logsnr) would overflow.
  """
  logsnr = jnp.asarray(logsnr, jnp.float32)
  return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))


def cosine_logsnr(
  t: jnp.ndarray, logsnr_min: float = -20.0, logsnr_max: float = 20.0
) -> jnp.ndarray:
  """The cosine schedule (Nichol & Dhariwal) as a log-SNR: -2 log tan(pi t / 2).

  t is first mapped affinely into [t_min, t_max] (the "t-range trick" of VDM / simple
  diffusion), so that logsnr(0) = logsnr_max and logsnr(1) = logsnr_min exactly, instead of
  clipping and leaving flat, untrainable ends.

  Why two branches: near t = 1 the argument of tan sits within ~3e-5 of pi/2, where float32
  cannot resolve it (the result would be off by ~5e-3). For t >= 0.5 we therefore use the
  reflection -2 log tan(pi t'/2) = 2 log tan(pi (1 - t')/2) and compute 1 - t' from 1 - t
  (exact in float32 for t in [0.5, 1]) and a constant precomputed in float64.
  """
  logsnr_min, logsnr_max = float(logsnr_min), float(logsnr_max)
  if not logsnr_min < logsnr_max:
    raise ValueError(f'cosine_logsnr: logsnr_min={logsnr_min} must be < logsnr_max={logsnr_max}')
  t = jnp.asarray(t, jnp.float32)
  t_min = 2.0 / math.pi * math.atan(math.exp(-0.5 * logsnr_max))
  t_max = 2.0 / math.pi * math.atan(math.exp(-0.5 * logsnr_min))
  span = t_max - t_min
  lo = t_min + t * span  # t'
  hi = (1.0 - t) * span + (1.0 - t_max)  # 1 - t', accurate near t = 1
  half_pi = 0.5 * math.pi
  return jnp.where(
    t < 0.5, -2.0 * jnp.log(jnp.tan(half_pi * lo)), 2.0 * jnp.log(jnp.tan(half_pi * hi))
  )


def shifted_cosine_logsnr(
  t: jnp.ndarray,
  resolution: int,
  base_resolution: int,
  logsnr_min: float = -20.0,
  logsnr_max: float = 20.0,
) -> jnp.ndarray:
  """Cosine log-SNR shifted for resolution (simple diffusion, Hoogeboom et al. 2023).

  A larger image has more pixels averaging out the same per-pixel noise, so it needs more noise
  for the same visual corruption: logsnr += 2 log(base_resolution / resolution). The shift moves
  the end points too (to logsnr_min/max + shift), as in the paper.
  """
  if resolution <= 0 or base_resolution <= 0:
    raise ValueError(
      f'shifted_cosine_logsnr: resolution={resolution} and '
      f'base_resolution={base_resolution} must be positive'
    )
  shift = 2.0 * math.log(base_resolution / resolution)
  return cosine_logsnr(t, logsnr_min, logsnr_max) + shift


def linear_beta_logsnr(
  t: jnp.ndarray,
  beta_start: float = 1e-4,
  beta_end: float = 0.02,
  num_steps: int = 1000,
  logsnr_min: float = -20.0,
  logsnr_max: float = 20.0,
) -> jnp.ndarray:
  """DDPM's linear beta schedule as a continuous-time log-SNR.

  Discrete DDPM has beta_j = linspace(beta_start, beta_end, N)[j - 1] for j = 1..N and
  alpha_bar_i = prod_{j <= i} (1 - beta_j). We read t = i / N, make beta(u) the linear
  interpolation of beta_j in the step index u, and replace the sum of log(1 - beta_j) by the
  integral of log(1 - beta(u)) over [1/2, i + 1/2] (a midpoint rule per step, exact up to
  ~1e-11 here because log(1 - beta(u)) is nearly linear). So at t = i/N this reproduces the
  discrete alpha_bar_i, and it is smooth and strictly decreasing in between.

  The antiderivative is G(x) = (1 - x) log(1 - x) + x, evaluated as a series for small x (see
  _big_g) so that float32 keeps its digits.
  The result is clipped to [logsnr_min, logsnr_max]: at t = 0 it is +inf.
  """
  if num_steps < 2:
    raise ValueError(f'linear_beta_logsnr: num_steps={num_steps} must be >= 2')
  if not 0.0 < beta_start <= beta_end < 1.0:
    raise ValueError(
      f'linear_beta_logsnr: need 0 < beta_start={beta_start} <= beta_end={beta_end} < 1'
    )
  t = jnp.asarray(t, jnp.float32)
  n = float(num_steps)
  slope = (beta_end - beta_start) / (n - 1.0)  # d beta / d u

  def beta(u):  # beta(j) = beta_j
    return beta_start + slope * (u - 1.0)

  u0, u1 = jnp.float32(0.5), t * n + 0.5
  if slope > 0.0:
    # d/dx G(x) = -log(1 - x), so the integral of log(1 - beta(u)) du is -(G(b1) - G(b0)) / slope.
    log_alpha_bar = -(_big_g(beta(u1)) - _big_g(beta(u0))) / slope
  else:  # constant beta
    log_alpha_bar = (u1 - u0) * math.log1p(-beta_start)
  # Rounding can push the integral a hair above 0 near t = 0 (alpha_bar > 1, NaN below).
  log_alpha_bar = jnp.minimum(log_alpha_bar, 0.0)
  # logsnr = log(alpha_bar / (1 - alpha_bar)); expm1 keeps 1 - alpha_bar accurate near t = 0.
  logsnr = log_alpha_bar - jnp.log(-jnp.expm1(log_alpha_bar))
  return jnp.clip(logsnr, logsnr_min, logsnr_max)


def _big_g(x: jnp.ndarray) -> jnp.ndarray:
  """G(x) = (1 - x) log(1 - x) + x = sum_{k>=2} x^k / (k (k - 1)), accurate in float32.

  The closed form loses all digits for small x ((1 - x) log1p(-x) ~ -x cancels the + x), so
  below 0.1 we sum the series (8 terms reach float32 precision there).
  """
  series = jnp.zeros_like(x)
  for k in range(9, 1, -1):  # Horner: x^2 (1/2 + x (1/6 + x (1/12 + ...)))
    series = series * x + 1.0 / (k * (k - 1))
  series = series * x * x
  closed = (1.0 - x) * jnp.log1p(-x) + x
  return jnp.where(x < 0.1, series, closed)


def get_logsnr_fn(
  name: str,
  resolution: int,
  *,
  logsnr_min: float,
  logsnr_max: float,
  shift_base_resolution: int = 64,
) -> LogSnrFn:
  """The t -> logsnr function of schedule `name` (SCHEDULES) at image size `resolution`;
  `shift_base_resolution` is the size a 'shifted_cosine' schedule equals 'cosine' at."""
  lmin, lmax = float(logsnr_min), float(logsnr_max)
  if not lmin < lmax:
    raise ValueError(f'config.diffusion.logsnr_min={lmin} must be < logsnr_max={lmax}')
  if name == 'cosine':
    return lambda t: cosine_logsnr(t, lmin, lmax)
  if name == 'shifted_cosine':
    base = int(shift_base_resolution)
    return lambda t: shifted_cosine_logsnr(t, resolution, base, lmin, lmax)
  if name == 'linear':
    return lambda t: linear_beta_logsnr(t, logsnr_min=lmin, logsnr_max=lmax)
  raise ValueError(
    f'config.diffusion.schedule: unknown schedule {name!r}; choose one of {SCHEDULES}'
  )


def logsnr_to_t(logsnr_fn: LogSnrFn, logsnr: jnp.ndarray, num_iters: int = 40) -> jnp.ndarray:
  """Inverts a decreasing schedule by bisection: the t in [0, 1] with logsnr_fn(t) = logsnr.

  Values outside the schedule's range map to the nearest end (0 or 1). 40 halvings exceed
  float32 resolution of t. Jit-able; elementwise over any shape.
  """
  target = jnp.asarray(logsnr, jnp.float32)
  lo = jnp.zeros_like(target)
  hi = jnp.ones_like(target)

  def body(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    # logsnr is decreasing: still above the target means the answer lies at larger t.
    above = logsnr_fn(mid) > target
    return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

  lo, hi = jax.lax.fori_loop(0, num_iters, body, (lo, hi))
  return 0.5 * (lo + hi)
