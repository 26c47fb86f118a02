"""Train-step throughput: images/s, step ms, FLOPs per image and MFU.

python -m bench.train_step --config=configs/adm_sr_256.py [--batch 16] [--steps 30] [--json F]
                           [--part step|grads|update]

Compiles the real train step (AdamW, EMA, bf16 compute, donated state) once ahead of time, runs
warm-up steps, then times `--steps` steps one by one, blocking on each result, and reports the
median. FLOPs per image come from the compiled program's cost analysis and, independently, from
the architecture (every conv and matmul in the traced step). MFU is against a bf16 matmul peak
measured in the same run on the same device. It also reports the program's kernel launches,
counted from its optimized HLO (bench/kernels.py).

--part splits the step to find where its time goes: `grads` is the forward and backward pass
(loss, gradients and their norm, state passed through untouched), `update` is the rest of the
real step (AdamW, EMA, the finite guard) applied to fixed gradients. grads + update ~ step.
"""

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench import flops as flops_lib
from bench import kernels
from idm_jax.runtime import allocator
from idm_jax.runtime import configlib
from idm_jax.runtime import parallel
from idm_jax.training import optim
from idm_jax.training import train

PARTS = ('step', 'grads', 'update')


def host_cpu() -> str:
  """The host's CPU model and how many CPUs this process may use ('AMD EPYC, 2 CPUs'): the
  machines behind this project's numbers change between sessions, and a row must say which
  one it timed."""
  model = 'unknown CPU'
  try:
    with open('/proc/cpuinfo') as f:
      model = next(
        (line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), model
      )
  except OSError:
    pass
  cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  return f'{model}, {cpus} CPUs'


def emit(result: dict, json_path: str = '') -> None:
  """Prints a result as one JSON line, with the host's CPU (`host_cpu`), and appends it to
  json_path if given."""
  result = {**result, 'host_cpu': result.get('host_cpu', host_cpu())}
  print(json.dumps(result), flush=True)
  if json_path:
    with open(json_path, 'a') as f:
      f.write(json.dumps(result) + '\n')


def matmul_peak_tflops(n: int = 8192, reps: int = 10) -> float:
  """bf16 matmul TFLOP/s on the first device (n=8192 on accelerators, smaller on a CPU)."""
  if jax.default_backend() == 'cpu':
    n, reps = 1024, 3
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.bfloat16)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  t = time.perf_counter()
  for _ in range(reps):
    out = f(a)
  out.block_until_ready()
  return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def time_steps(step, state, arg, warmup: int, steps: int):
  """Runs state, metrics = step(state, arg) warmup times, then times `steps` calls one by one,
  blocking on each result. Returns (state, metrics, median seconds)."""
  for _ in range(warmup):
    state, metrics = step(state, arg)
  jax.block_until_ready((state, metrics))
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = step(state, arg)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t)
  return state, metrics, statistics.median(times)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--config', required=True)
  p.add_argument('--batch', type=int, default=0, help="global batch (default: the config's)")
  p.add_argument('--steps', type=int, default=30)
  p.add_argument('--warmup', type=int, default=3)
  p.add_argument('--attention', default='', help='override model.attention_impl')
  p.add_argument('--json', default='', help='append the result as a JSON line to this file')
  p.add_argument(
    '--part',
    default='step',
    choices=PARTS,
    help='time the whole step, or only its gradient or update half',
  )
  a = p.parse_args()

  config = configlib.load(a.config)
  if a.batch:
    config.train.batch_size = a.batch
  if a.attention:
    config.model.attention_impl = a.attention
  bs = config.train.batch_size
  trainer, state, batch = setup(config)

  fn, arg, arg_spec = part_program(a.part, trainer, batch, trainer.batch_spec(bs))
  t0 = time.perf_counter()
  if a.part == 'step':
    step = trainer.compile_step(bs // jax.process_count())
  else:
    step = compile_part(fn, trainer, arg_spec)
    trainer.step_flops = train.xla_flops(step)
  compile_s = time.perf_counter() - t0
  launches = kernels.launch_count(step.as_text())

  arch = flops_lib.count_flops(fn, state, arg)
  state, metrics, med = time_steps(step, state, arg, a.warmup, a.steps)
  loss = float(metrics['loss'])
  peak = matmul_peak_tflops()
  xla_per_image = trainer.step_flops / bs
  achieved = arch / med / 1e12
  result = dict(
    config=os.path.basename(a.config),
    part=a.part,
    device=jax.devices()[0].device_kind,
    num_devices=jax.device_count(),
    batch=bs,
    attention=config.model.attention_impl,
    step_ms=round(med * 1e3, 2),
    images_per_sec=round(bs / med, 1),
    gflop_per_image_arch=round(arch / bs / 1e9, 1),
    gflop_per_image_xla=round(xla_per_image / 1e9, 1),
    tflops=round(achieved, 1),
    matmul_peak_tflops=round(peak, 1),
    mfu=round(achieved / peak, 3),
    compile_s=round(compile_s, 1),
    loss=round(loss, 4),
    kernels=launches['kernels'],
    kernel_ops=dict(list(launches['by_op'].items())[:6]),
    jax=jax.__version__,
    malloc=allocator.in_use(),
    date=time.strftime('%Y-%m-%d'),
  )
  emit(result, a.json)


def setup(config):
  """(trainer over all devices, its initial state, a random global uint8 batch) for `config`."""
  bs, res = config.train.batch_size, config.data.resolution
  mesh = parallel.make_mesh(config.mesh)
  trainer = train.Trainer(config, mesh)
  state = trainer.init(jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  batch = {
    k: rng.integers(0, 256, (bs, res, res, 3), dtype=np.uint8) for k in trainer.batch_spec(bs)
  }
  return trainer, state, parallel.local_batch_to_global(batch, mesh)


def compile_part(fn, trainer, arg_spec):
  """`fn(state, arg) -> (state, metrics)` compiled with the trainer's shardings, state donated."""
  jitted = jax.jit(
    fn,
    in_shardings=(trainer.shardings, _shardings(arg_spec)),
    out_shardings=(trainer.shardings, parallel.replicated(trainer.mesh)),
    donate_argnums=0,
    compiler_options=trainer.compiler_options,
  )
  with parallel.mesh_rules(trainer.mesh):
    return jitted.lower(trainer.abstract_state, arg_spec).compile()


def part_program(part, trainer, batch, batch_spec):
  """(fn(state, arg) -> (state, metrics), arg, arg's abstract spec) for one part of the step."""
  config, model, logsnr_fn = trainer.config, trainer.model, trainer.logsnr_fn
  if part == 'step':
    fn = lambda s, b: train.train_step(s, b, model=model, config=config, logsnr_fn=logsnr_fn)
    return fn, batch, batch_spec
  if part == 'grads':

    def grads_only(state, b):
      loss, grads = train.loss_and_grads(state, b, model=model, config=config, logsnr_fn=logsnr_fn)
      return state, dict(loss=loss, grad_norm=optax.tree.norm(grads))

    return grads_only, batch, batch_spec
  # update: the real step's second half on fixed, finite gradients with the params' shardings
  params = trainer.abstract_state.params
  grads = jax.tree.map(
    lambda p: jax.device_put(jnp.full(p.shape, 1e-3, p.dtype), p.sharding), params
  )
  fn = lambda s, g: optim.apply_gradients(s, jnp.float32(1.0), g, train_cfg=config.train)
  return fn, grads, params


def _shardings(spec):
  return jax.tree.map(lambda x: x.sharding, spec)


if __name__ == '__main__':
  allocator.use_tcmalloc()  # the driver's allocator (idm_jax/runtime/allocator.py)
  main()
