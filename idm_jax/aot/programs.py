"""The programs config.mode runs, compiled for TPU devices: the Trainer's own jitted step and
training-grid sampler, lowered with its abstract state and batch layout (train, extrinsic), and
the program `inference.Restorer` runs over every host's chips, the hosts in lockstep (sample,
evaluate, clean, extrinsic, generate). Each compile gives its per-chip memory, FLOPs and
collectives; a program that does not fit in HBM, or that XLA cannot place on the slice, comes
back as a Program with its error, not as an exception.
"""

from __future__ import annotations

import dataclasses
import math
import time

from absl import logging
from flax.linen import meta
import jax
import jax.numpy as jnp

from idm_jax.aot import hlo
from idm_jax.aot.chips import Chip
from idm_jax.aot.chips import GiB
from idm_jax.inference import engine
from idm_jax.models import unet
from idm_jax.runtime import configlib
from idm_jax.runtime import parallel
from idm_jax.training import train

# The programs each config.mode runs: the Trainer's step and grid sampler, the Restorer's.
TRAINS = ('train', 'extrinsic')
RESTORES = ('sample', 'evaluate', 'clean', 'extrinsic', 'generate')


@dataclasses.dataclass
class Program:
  """One compiled program's numbers (per device unless named otherwise)."""

  name: str
  batch: int  # global batch
  compile_s: float
  memory: dict
  flops: float  # XLA's estimate for one device's program
  collectives: dict
  error: str = ''  # why it failed to compile (then the numbers are empty)
  cannot_run: bool = False  # the error is not memory: no batch or fsdp setting makes it fit
  state_bytes: int = 0  # the train state's shards (params, EMA, Adam), from the shardings


def fits(program: Program, chip: Chip) -> bool:
  return not program.error and program.memory['total'] <= chip.hbm_bytes


def images_per_second(program: Program, chip: Chip, mfu: float) -> float:
  """A projection, not a measurement: every chip runs its program's XLA FLOPs at `mfu` of its
  peak, so a step takes flops / (mfu * peak) and moves the global batch."""
  if not program.flops:
    return 0.0
  return program.batch * mfu * chip.peak_bf16_flops / program.flops


def gib(nbytes) -> str:
  return f'{nbytes / GiB:.2f} GiB'


def compile_train_step(config, mesh) -> Program:
  """The Trainer's own jitted step (AdamW, EMA, finite guard, donation), lowered as
  Trainer.compile_step lowers it: with its abstract state and batch layout."""
  trainer = train.Trainer(config, mesh)

  def lower():
    with parallel.mesh_rules(mesh):
      return trainer.step.lower(
        trainer.abstract_state, trainer.batch_spec(trainer.local_batch_size())
      )

  program = _compile('train step', config.train.batch_size, lower)
  program.state_bytes = shard_bytes(trainer.abstract_state)
  return program


def compile_sampler(config, mesh, settings, batch_size: int, name: str) -> Program:
  """The Trainer's EMA sampler (the whole lax loop) for one batch, on the training mesh."""
  trainer = train.Trainer(config, mesh)
  jitted = trainer.sampler_jit(settings, batch_size)
  res = config.data.resolution
  rep = parallel.replicated(mesh)
  lq = (
    jax.ShapeDtypeStruct((batch_size, res, res, 3), jnp.uint8, sharding=rep)
    if config.model.conditional
    else None
  )
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep)

  def lower():
    with parallel.mesh_rules(mesh):
      return jitted.lower(trainer.abstract_state.ema, lq, rng)

  return _compile(name, batch_size, lower)


def compile_restorer(config, devices, settings, batch_size: int, name: str) -> Program:
  """The program `inference.Restorer` runs (sample, clean, evaluate, generate) over `devices`
  (a pod's: every host's chips): each host's `batch_size` examples padded to its chips, the
  hosts' blocks making one global batch split over all devices, params replicated."""
  res = int(config.data.resolution)
  model = configlib.build_model(config.model, res)
  mesh = parallel.sampling_mesh(devices)
  hosts = parallel.process_count_of(mesh)
  batch = engine.padded_batch(batch_size, mesh.size // hosts) * hosts
  jitted = engine.sampling_jit(
    model, config, configlib.logsnr_fn(config.diffusion, res), mesh, batch, settings
  )
  rep, split = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  params = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
    meta.unbox(unet.param_shapes(model)),
  )
  lq = (
    jax.ShapeDtypeStruct((batch, res, res, 3), jnp.float32, sharding=split)
    if config.model.conditional
    else None
  )
  seed = jax.ShapeDtypeStruct((), jnp.uint32, sharding=rep)
  indices = jax.ShapeDtypeStruct((batch,), jnp.uint32, sharding=split)
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
  return _compile(name, batch, lambda: jitted.lower(params, lq, seed, indices, scalar, scalar))


def restorer_job(config):
  """(the config section whose batch_size the mode samples at, the sampler settings) for the
  Restorer program of config.mode. The sampler is one loop, so its memory does not depend on
  the number of steps: evaluate's first steps value stands for all of them."""
  mode = config.get('mode', 'train')
  if mode in ('clean', 'extrinsic'):
    c = config.clean
    return 'clean', configlib.sample_settings(
      config.sample, steps=int(c.steps), sampler=c.sampler, t_start=float(c.t_start)
    )
  if mode == 'evaluate':
    return 'eval', configlib.sample_settings(config.sample, steps=int(config.eval.steps[0]))
  return ('generate' if mode == 'generate' else 'sample'), configlib.sample_settings(config.sample)


def _compile(name, batch, lower_fn) -> Program:
  logging.info('compiling %s (global batch %d)', name, batch)
  t0 = time.perf_counter()
  try:
    compiled = lower_fn().compile()
  except Exception as e:  # pylint: disable=broad-except
    why = _cannot_run(e)
    if why:
      return Program(name, batch, time.perf_counter() - t0, {}, 0.0, {}, error=why, cannot_run=True)
    if not _out_of_memory(e):
      raise
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return Program(name, batch, time.perf_counter() - t0, {}, 0.0, {}, error=first[:400])
  seconds = time.perf_counter() - t0
  used = memory(compiled)
  # Logged as each compile ends, so an interrupted --max_batch search still leaves its numbers.
  logging.info('compiled %s in %.0f s: %s per device', name, seconds, gib(used['total']))
  return Program(
    name, batch, seconds, used, train.xla_flops(compiled), hlo.collectives(compiled.as_text())
  )


def memory(compiled) -> dict:
  """Per-device bytes of a compiled program: arguments, temporaries, outputs that do not
  reuse a donated argument's buffer, generated code, and their total (the HBM it needs)."""
  m = compiled.memory_analysis()
  out = dict(
    arguments=m.argument_size_in_bytes,
    temporaries=m.temp_size_in_bytes,
    outputs=m.output_size_in_bytes - m.alias_size_in_bytes,
    code=m.generated_code_size_in_bytes,
  )
  out['total'] = sum(out.values())
  return out


def shard_bytes(abstract_tree) -> int:
  """Bytes of one device's shards of a tree of ShapeDtypeStructs with shardings, from the
  shardings alone (no compile; TPU layouts pad small dimensions, so a compile reports a bit
  more). Every device holds the same amount under the rules (even splits only)."""
  total = 0
  for leaf in jax.tree.leaves(abstract_tree):
    shape = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shape) * leaf.dtype.itemsize
  return int(total)


def _out_of_memory(e: Exception) -> bool:
  text = str(e)
  return 'RESOURCE_EXHAUSTED' in text or 'Ran out of memory' in text


# XLA's TPU compiler on slices whose chips route over "limited ICI" takes a program over one chip
# or over the whole slice, not over a subset such as one host's chips: why the Restorer's program
# spans the slice (parallel.sampling_mesh). Which slices those are: docs/TPU.md.
_SUBSET_OF_SLICE = 'limited ICI routing'


def _cannot_run(e: Exception) -> str:
  if _SUBSET_OF_SLICE in str(e):
    return (
      "a program over a subset of this slice's chips does not compile: on this slice a "
      'program spans one chip or every chip (docs/TPU.md, "Sampling on a pod")'
    )
  return ''
