"""The two forms of a convolution on this backend, pass by pass: XLA's convolution and patches @
kernel (`platform_ops.conv_as_matmul`), compiled with the options the trainer compiles with
(`platform_ops.compiler_options`). The table behind `platform_ops.cpu_conv`'s choice.

python -m bench.conv_forms [--shapes B,HW,CIN,COUT ...] [--reps 10] [--json F]

Each line: the shape, then forward / input gradient / kernel gradient in ms (median of --reps
calls, jitted, blocking on each) for each form, and the form `cpu_conv` picks.
"""

import argparse
import statistics
import time

import jax
from jax import lax

from bench import train_step
from idm_jax.models import platform_ops

# The parity layout's levels (batch 4) and the CPU recipes' (batch 16, 32-64 channels).
DEFAULT_SHAPES = (
  '4,64,128,128',
  '4,64,384,128',
  '4,32,256,256',
  '4,16,512,256',
  '4,4,512,512',
  '4,2,1024,512',
  '16,64,32,32',
  '16,32,128,64',
  '16,8,64,64',
)
SAME = ((1, 1), (1, 1))


def _ms(fn, *args, reps: int) -> float:
  fn = jax.jit(fn, compiler_options=platform_ops.compiler_options(jax.devices()[0].platform))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return round(statistics.median(times) * 1e3, 2)


def _passes(conv, x, w, dy, reps):
  fwd = _ms(conv, x, w, reps=reps)
  dx = _ms(lambda x_, w_, d: jax.vjp(lambda a: conv(a, w_), x_)[1](d)[0], x, w, dy, reps=reps)
  dw = _ms(lambda x_, w_, d: jax.vjp(lambda k: conv(x_, k), w_)[1](d)[0], x, w, dy, reps=reps)
  return dict(forward=fwd, input_grad=dx, kernel_grad=dw)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--shapes', nargs='*', default=DEFAULT_SHAPES)
  p.add_argument('--reps', type=int, default=10)
  p.add_argument('--json', default='')
  a = p.parse_args()
  native = lambda x, w: lax.conv_general_dilated(
    x, w, (1, 1), SAME, dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )
  patches = lambda x, w: platform_ops.conv_as_matmul(x, w, (1, 1), SAME)
  for spec in a.shapes:
    b, hw, cin, cout = (int(v) for v in spec.split(','))
    kx, kw, kd = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (b, hw, hw, cin))
    w = jax.random.normal(kw, (3, 3, cin, cout)) / (3 * cin**0.5)
    dy = jax.random.normal(kd, (b, hw, hw, cout))
    train_step.emit(
      dict(
        shape=spec,
        xla=_passes(native, x, w, dy, a.reps),
        patches=_passes(patches, x, w, dy, a.reps),
        cpu_conv=platform_ops.cpu_conv_form(x.shape, w.shape),
        compiler_options=platform_ops.compiler_options(jax.devices()[0].platform),
        device=jax.devices()[0].device_kind,
        date=time.strftime('%Y-%m-%d'),
      ),
      a.json,
    )


if __name__ == '__main__':
  main()
