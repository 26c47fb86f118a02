"""Compile the real train step and sampler for a Cloud TPU topology on a CPU host: no TPU needed.

  python -m idm_jax.aot --config=configs/ffhq.py --topology=v5e:16x16 [--num_slices=2]
      [--max_batch] [--config.x=y ...]

libtpu (pip install -e ".[tpu]") describes a TPU slice as abstract devices; the mesh over them
goes through the same `parallel.make_mesh` and logical-axis rules as training, and the programs
are the ones config.mode runs: the Trainer's own jitted step and training-grid sampler, lowered
with its abstract state and batch layout (train, extrinsic), and the program `inference.Restorer`
runs over every host's chips, the hosts in lockstep (sample, evaluate, clean, extrinsic,
generate).
XLA's TPU compiler then gives the executable a real run would get: its per-chip HBM, FLOPs and
collectives. A config that cannot run on the slice (a batch that does not divide the mesh, an
op or attention kind TPUs lack, a program that does not fit in HBM) fails here as it would
there, with the field to change. Measured numbers live in docs/TPU.md.
"""
from __future__ import annotations

import os

# Before jax loads (MaxText and AXLearn do the same): compile on the CPU host without touching
# any local accelerator, and let libtpu skip the GCE metadata query it makes off a TPU VM.
# Compiling needs no TPU, so several compiles (tests, a preflight beside a job) may share libtpu
# instead of queueing on its one-process lock file.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import ml_collections  # noqa: E402

GiB = 2 ** 30

# Per chip, from Google's published Cloud TPU specifications: HBM and peak bf16 FLOP/s.
# v4 and v5p run as one "megacore" device per chip, so a device is a chip on every kind here.
@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  hbm_bytes: int
  peak_bf16_flops: float


CHIPS = {
    'TPU v4': Chip('v4', 32 * GiB, 275e12),
    'TPU v5 lite': Chip('v5e', 16 * GiB, 197e12),
    'TPU v5': Chip('v5p', 95 * GiB, 459e12),
    'TPU v6 lite': Chip('v6e', 32 * GiB, 918e12),
}

# Chips of the standard slice shapes, by the TensorCore or chip count of the accelerator type.
_SHAPES_2D = {1: '1x1', 4: '2x2', 8: '2x4', 16: '4x4', 32: '4x8', 64: '8x8', 128: '8x16',
              256: '16x16'}
_SHAPES_3D = {4: '2x2x1', 8: '2x2x2', 16: '2x2x4', 32: '2x4x4', 64: '4x4x4', 128: '4x4x8',
              256: '4x8x8', 512: '8x8x8', 1024: '8x8x16', 2048: '8x16x16', 4096: '16x16x16'}
# accelerator-type prefix -> (libtpu's name, type number counts TensorCores (2 per chip))
_ACCELERATORS = {'v5litepod': ('v5e', False), 'v5e': ('v5e', False), 'v6e': ('v6e', False),
                 'v4': ('v4', True), 'v5p': ('v5p', True)}

COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute',
               'collective-broadcast', 'ragged-all-to-all')

_DTYPE_BYTES = {'pred': 1, 's4': 0.5, 'u4': 0.5, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1,
                's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4,
                's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16}
_ARRAY = re.compile(r'\b(' + '|'.join(sorted(_DTYPE_BYTES, key=len, reverse=True)) +
                    r')\[([0-9,]*)\]')
_OPCODE = re.compile(r' (' + '|'.join(COLLECTIVES) + r')(-start)?\(')  # not -done
_COMMENT = re.compile(r'/\*.*?\*/')  # HLO's /*index=5*/ inside long tuples


def topology_name(topology: str) -> str:
  """libtpu's topology name ('v5e:4x4', 'v4:2x2x4', ...) for itself or for a Cloud TPU
  accelerator type ('v5litepod-16', 'v4-32', 'v5p-128', 'v6e-16')."""
  if ':' in topology:
    return topology
  m = re.fullmatch(r'([a-z0-9]+)-([0-9]+)', topology)
  if not m or m.group(1) not in _ACCELERATORS:
    raise ValueError(f'--topology: {topology!r} is neither a libtpu topology (v5e:4x4, '
                     'v4:2x2x4, v5p:4x4x4) nor an accelerator type (v5litepod-16, v4-32, '
                     'v5p-128, v6e-16)')
  kind, per_core = _ACCELERATORS[m.group(1)]
  n = int(m.group(2))
  chips = n // 2 if per_core else n
  shapes = _SHAPES_3D if per_core else _SHAPES_2D
  if chips not in shapes:
    raise ValueError(f'--topology: no standard slice shape for {topology} ({chips} chips); '
                     f'give it as {kind}:AxBxC')
  return f'{kind}:{shapes[chips]}'


def topology_devices(topology: str, num_slices: int = 1):
  """The abstract devices of `num_slices` slices of `topology` (needs libtpu)."""
  from jax.experimental import topologies
  name = topology_name(topology)
  kwargs = {}
  if num_slices > 1:
    kwargs['num_slices'] = num_slices
  if name.startswith('v4:'):
    # A Cloud TPU v4 VM runs one device per chip (megacore); libtpu's default is one per core.
    kwargs['chip_config_name'] = 'megacore'
  dims = [int(d) for d in name.split(':')[1].split('x')]
  if len(dims) == 2 and math.prod(dims) < 4:
    # Slices smaller than libtpu's default 2x2 host (v5e-1, v6e-1) are one host of that shape.
    kwargs['chips_per_host_bounds'] = (*dims, 1)
  if importlib.util.find_spec('libtpu') is None:
    raise RuntimeError('AOT compiles for TPU topologies need libtpu: pip install -e ".[tpu]"')
  try:
    return list(topologies.get_topology_desc(topology_name=name, platform='tpu',
                                             **kwargs).devices)
  except Exception as e:  # e.g. a shape libtpu does not know
    raise ValueError(f'--topology={topology}: libtpu has no topology {name!r}: {e}') from e


def collectives(hlo_text: str) -> dict:
  """{kind: (count, bytes)} of the collective ops in an optimized HLO module's text.

  Each op is counted once where it is defined (an async -start/-done pair at its start; an op
  inside a loop body once, not per iteration). Bytes are its result's, per device: the gathered
  array of an all-gather, the reduced buffer of an all-reduce, the shard of a reduce-scatter.
  TPU's compiler writes a reduce-scatter as an all-reduce inside an `all-reduce-scatter`
  fusion; those are counted as reduce-scatter (with the all-reduce's bytes).
  """
  out = {}
  computation = ''
  for line in hlo_text.splitlines():
    if line[:1] not in ('', ' ') and '{' in line:  # a computation's header line
      computation = line.split()[1] if line.startswith('ENTRY') else line.split()[0]
      continue
    if ' = ' not in line:
      continue
    rhs = _COMMENT.sub('', line.split(' = ', 1)[1])
    m = _OPCODE.search(' ' + rhs)
    if not m or not _result_before(rhs, m.start()):
      continue
    kind, start = m.group(1), bool(m.group(2))  # rhs[:m.start()]: the result type
    if kind == 'all-reduce' and computation.lstrip('%').startswith('all-reduce-scatter'):
      kind = 'reduce-scatter'
    arrays = _arrays(rhs[:m.start()])
    if start and kind != 'all-reduce' and rhs.startswith('('):
      # (operands..., results..., u32[] contexts): keep the results
      arrays = [a for a in arrays if a[1]]
      arrays = arrays[len(arrays) // 2:]
    count, nbytes = out.get(kind, (0, 0))
    out[kind] = (count + 1, nbytes + sum(_bytes(a) for a in arrays))
  return out


def _result_before(rhs: str, at: int) -> bool:
  """Whether the opcode at `at` is the instruction's own (only its result type precedes it),
  not a name inside its attributes."""
  head = rhs[:at]
  return '=' not in head and '%' not in head


def _arrays(text: str):
  return [(dtype, tuple(int(d) for d in dims.split(',') if d))
          for dtype, dims in _ARRAY.findall(text)]


def _bytes(array) -> int:
  dtype, dims = array
  return int(math.prod(dims) * _DTYPE_BYTES[dtype])


def shard_bytes(abstract_tree) -> int:
  """Bytes of one device's shards of a tree of ShapeDtypeStructs with shardings, from the
  shardings alone (no compile; TPU layouts pad small dimensions, so a compile reports a bit
  more). Every device holds the same amount under the rules (even splits only)."""
  import jax
  total = 0
  for leaf in jax.tree.leaves(abstract_tree):
    shape = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shape) * leaf.dtype.itemsize
  return int(total)


def memory(compiled) -> dict:
  """Per-device bytes of a compiled program: arguments, temporaries, outputs that do not
  reuse a donated argument's buffer, generated code, and their total (the HBM it needs)."""
  m = compiled.memory_analysis()
  out = dict(arguments=m.argument_size_in_bytes, temporaries=m.temp_size_in_bytes,
             outputs=m.output_size_in_bytes - m.alias_size_in_bytes,
             code=m.generated_code_size_in_bytes)
  out['total'] = sum(out.values())
  return out


@dataclasses.dataclass
class Program:
  """One compiled program's numbers (per device unless named otherwise)."""
  name: str
  batch: int                 # global batch
  compile_s: float
  memory: dict
  flops: float               # XLA's estimate for one device's program
  collectives: dict
  error: str = ''            # why it failed to compile (then the numbers are empty)
  cannot_run: bool = False   # the error is not memory: no batch or fsdp setting makes it fit
  state_bytes: int = 0       # the train state's shards (params, EMA, Adam), from the shardings


def _out_of_memory(e: Exception) -> bool:
  text = str(e)
  return 'RESOURCE_EXHAUSTED' in text or 'Ran out of memory' in text


# XLA's TPU compiler on slices whose chips route over "limited ICI" (v5e beyond 16 chips, as of
# libtpu 0.0.42) takes a program over one chip or over the whole slice, not over a subset such as
# one host's chips: why the Restorer's program spans the slice (parallel.sampling_mesh).
_SUBSET_OF_SLICE = 'limited ICI routing'


def _cannot_run(e: Exception) -> str:
  if _SUBSET_OF_SLICE in str(e):
    return ('a program over a subset of this slice\'s chips does not compile: on this slice a '
            'program spans one chip or every chip (docs/TPU.md, "Sampling on a pod")')
  return ''


def _compile(name, batch, lower_fn) -> Program:
  from absl import logging
  from idm_jax import train
  logging.info('compiling %s (global batch %d)', name, batch)
  t0 = time.perf_counter()
  try:
    compiled = lower_fn().compile()
  except Exception as e:  # pylint: disable=broad-except
    why = _cannot_run(e)
    if why:
      return Program(name, batch, time.perf_counter() - t0, {}, 0.0, {}, error=why,
                     cannot_run=True)
    if not _out_of_memory(e):
      raise
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return Program(name, batch, time.perf_counter() - t0, {}, 0.0, {}, error=first[:400])
  seconds = time.perf_counter() - t0
  used = memory(compiled)
  # Logged as each compile ends, so an interrupted --max_batch search still leaves its numbers.
  logging.info('compiled %s in %.0f s: %s per device', name, seconds, _gib(used['total']))
  return Program(name, batch, seconds, used, train.xla_flops(compiled),
                 collectives(compiled.as_text()))


def with_batch(config: ml_collections.ConfigDict, batch_size: int) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(config.to_dict())
  config.train.batch_size = int(batch_size)
  return config


def compile_train_step(config, mesh) -> Program:
  """The Trainer's own jitted step (AdamW, EMA, finite guard, donation), lowered as
  Trainer.compile_step lowers it: with its abstract state and batch layout."""
  from idm_jax import parallel
  from idm_jax import train
  trainer = train.Trainer(config, mesh)

  def lower():
    with parallel.mesh_rules(mesh):
      return trainer.step.lower(trainer.abstract_state,
                                trainer.batch_spec(trainer.local_batch_size()))
  program = _compile('train step', config.train.batch_size, lower)
  program.state_bytes = shard_bytes(trainer.abstract_state)
  return program


def compile_sampler(config, mesh, settings, batch_size: int, name: str) -> Program:
  """The Trainer's EMA sampler (the whole lax loop) for one batch, on the training mesh."""
  import jax
  import jax.numpy as jnp
  from idm_jax import parallel
  from idm_jax import train
  trainer = train.Trainer(config, mesh)
  jitted = trainer.sampler_jit(settings, batch_size)
  res = config.data.resolution
  rep = parallel.replicated(mesh)
  lq = (jax.ShapeDtypeStruct((batch_size, res, res, 3), jnp.uint8, sharding=rep)
        if config.model.conditional else None)
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep)

  def lower():
    with parallel.mesh_rules(mesh):
      return jitted.lower(trainer.abstract_state.ema, lq, rng)
  return _compile(name, batch_size, lower)


def compile_restorer(config, devices, settings, batch_size: int, name: str) -> Program:
  """The program `inference.Restorer` runs (sample, clean, evaluate, generate) over `devices`
  (a pod's: every host's chips): each host's `batch_size` examples padded to its chips, the
  hosts' blocks making one global batch split over all devices, params replicated."""
  import jax
  import jax.numpy as jnp
  from flax.linen import meta
  from idm_jax import configlib
  from idm_jax import inference
  from idm_jax import parallel
  from idm_jax.models import unet
  res = int(config.data.resolution)
  model = unet.build_model(config.model, res)
  mesh = parallel.sampling_mesh(devices)
  hosts = parallel.process_count_of(mesh)
  batch = inference.padded_batch(batch_size, mesh.size // hosts) * hosts
  jitted = inference.sampling_jit(model, config, configlib.logsnr_fn(config.diffusion, res), mesh,
                                  batch, settings)
  rep, split = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                        meta.unbox(unet.param_shapes(model)))
  lq = (jax.ShapeDtypeStruct((batch, res, res, 3), jnp.float32, sharding=split)
        if config.model.conditional else None)
  seed = jax.ShapeDtypeStruct((), jnp.uint32, sharding=rep)
  indices = jax.ShapeDtypeStruct((batch,), jnp.uint32, sharding=split)
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
  return _compile(name, batch, lambda: jitted.lower(params, lq, seed, indices, scalar, scalar))


# The programs each config.mode runs: the Trainer's step and grid sampler, the Restorer's.
TRAINS = ('train', 'extrinsic')
RESTORES = ('sample', 'evaluate', 'clean', 'extrinsic', 'generate')


def restorer_job(config):
  """(the config section whose batch_size the mode samples at, the sampler settings) for the
  Restorer program of config.mode. The sampler is one loop, so its memory does not depend on
  the number of steps: evaluate's first steps value stands for all of them."""
  from idm_jax import configlib
  mode = config.get('mode', 'train')
  if mode in ('clean', 'extrinsic'):
    c = config.clean
    return 'clean', configlib.sample_settings(config.sample, steps=int(c.steps),
                                              sampler=c.sampler, t_start=float(c.t_start))
  if mode == 'evaluate':
    return 'eval', configlib.sample_settings(config.sample, steps=int(config.eval.steps[0]))
  return ('generate' if mode == 'generate' else 'sample'), configlib.sample_settings(config.sample)


def fits(program: Program, chip: Chip) -> bool:
  return not program.error and program.memory['total'] <= chip.hbm_bytes


# XLA lays a TPU array out in tiles of 8 rows by 128 lanes. Under 8 images per chip it chooses
# layouts that plan two to three times the memory per image of those it uses from 8, so memory is
# not monotone in the batch: libtpu 0.0.42 refuses ffhq.py's step at 6 images per chip on v4 and
# fits 8. At multiples of 128 it puts the batch on the lanes and plans less per image again than
# at the multiples of 8 beside them: the generation config fits 128 per chip on v5e and is
# refused at 136 (docs/TPU.md, "Per-chip batch").
TILE_ROWS = 8
TILE_LANES = 128


def largest_fitting(measure, capacity: int, limit: int = 1024, start: int = 1):
  """(the largest per-chip batch up to `limit` that fits, searched on the grids XLA's TPU layouts
  favour; the batches tried in order), 0 if none fits.
  measure(n) is one compile: (whether it fits, its memory in bytes, or for one that ran out of
  memory what XLA said it needed; None when unknown). The search finds the edge among multiples
  of TILE_LANES, then among multiples of TILE_ROWS from that edge up, and only when no multiple
  of TILE_ROWS fits, among 1 to TILE_ROWS - 1. Batches off those grids are not tried: they seem
  to pad to the next multiple (on v4, ffhq.py at 12 per chip plans as much as at 16). On each
  grid it assumes memory grows, which held wherever the verdicts were compiled (docs/TPU.md).
  `start` is a batch already compiled: where it lies on a grid the search there starts from it."""
  tried, results = [], {}

  def record(n):
    if n not in results:
      tried.append(n)
      results[n] = measure(n)
    return results[n]

  best = 0
  for grid in (TILE_LANES, TILE_ROWS):
    if limit < grid:
      continue
    first = best // grid if best else start // grid if start % grid == 0 else 1
    k = _edge(lambda k, grid=grid: record(k * grid), capacity, limit // grid,
              min(first, limit // grid))
    best = max(best, k * grid)
  if best:
    return best, tried
  below = min(limit, TILE_ROWS - 1)
  return _edge(record, capacity, below, min(start, below)), tried


def _edge(measure, capacity: int, limit: int, start: int) -> int:
  """The largest n in [1, limit] that fits, 0 if none, for memory that grows with n; the first
  compile at `start`.

  A compile that fits usually costs about ten that do not: XLA mostly refuses a batch at buffer
  assignment, before its slow code generation (docs/TPU.md). So while no n is known not to fit,
  each probe aims at twice where the line through the largest fits crosses the capacity (at
  least twice the largest fit): where memory is linear it fails, cheaply, and reports the memory
  that brackets the edge; where memory saturates (XLA packs larger batches into nearly the same
  buffers when HBM runs short) it reaches the edge in fewer fits than following the line.
  Inside the bracket it aims where the chord between its ends crosses the capacity, and bisects
  when an end has no memory. Every probe narrows the bracket, so any growing memory curve gets
  the exact edge."""
  seen, ok = {}, {}

  def fits_at(n):
    ok[n], seen[n] = measure(n)
    return ok[n]

  lo, hi = (start, None) if fits_at(start) else (0, start)
  while lo < limit and (hi is None or hi - lo > 1):
    if hi is None:
      fit = sorted(n for n in seen if ok[n] and seen[n])
      aim = (_crossing(seen, fit[-2], fit[-1], capacity) if len(fit) > 1 else
             fit[-1] * capacity / seen[fit[-1]] if fit else lo)
      n = min(int(max(2 * lo, 2 * aim)), limit)
    elif lo and seen[lo] is not None and seen[hi] is not None:
      n = min(max(_crossing(seen, lo, hi, capacity), lo + 1), hi - 1)
    else:
      n = (lo + hi) // 2
    lo, hi = (n, hi) if fits_at(n) else (lo, n)
  return lo


def _crossing(seen, a: int, b: int, capacity: int) -> int:
  """The largest n at or under the capacity on the line through (a, seen[a]), (b, seen[b])."""
  per_image = (seen[b] - seen[a]) / (b - a)
  if per_image <= 0:
    return 2 * max(a, b)
  return a + int((capacity - seen[a]) // per_image)


# How XLA's TPU compiler words a batch that does not fit (libtpu 0.0.42). Most are refused at
# buffer assignment, early, naming the temporaries they needed; one that misses by a little can
# be refused only at the end of the compile, naming the HBM it used in all.
_NEEDED_TEMPORARIES = re.compile(r'HLO temporaries \(([0-9.]+)([KMGT])\)')
_NEEDED_TOTAL = re.compile(r'Used ([0-9.]+)([KMGT]) of [0-9.]+[KMGT] hbm')


def needed_bytes(program: Program, other_bytes: float = 0.) -> float | None:
  """The HBM an out-of-memory compile said it needed in all; None if it did not say. Where XLA
  names only the temporaries, `other_bytes` (arguments, outputs, code: about the same at every
  batch) completes the total."""
  def size(m):
    return float(m.group(1)) * 1024 ** ('KMGT'.index(m.group(2)) + 1)
  if m := _NEEDED_TOTAL.search(program.error):
    return size(m)
  if m := _NEEDED_TEMPORARIES.search(program.error):
    return size(m) + other_bytes
  return None


def _beside_temporaries(programs) -> float:
  """The first compiled program's bytes other than its temporaries (arguments, outputs, code):
  give it train steps only, as a sampler's arguments are not a step's."""
  m = next((p.memory for p in programs if not p.error), {})
  return sum(v for k, v in m.items() if k not in ('temporaries', 'total'))


def max_batch_per_chip(config, mesh, chip: Chip, known: Program = None, limit: int = 1024):
  """(largest per-chip batch whose train step compiles and fits, among the batches
  `largest_fitting` searches; the Programs compiled for it). `known`, a train step already
  compiled on this mesh, is reused rather than compiled again."""
  if known is not None and known.cannot_run:
    return 0, []  # not memory: no batch runs there
  cache = {known.batch // mesh.size: known} if known is not None else {}

  def measure(per_chip):
    if per_chip not in cache:
      cache[per_chip] = compile_train_step(with_batch(config, per_chip * mesh.size), mesh)
    program = cache[per_chip]
    if not program.error:
      return fits(program, chip), program.memory['total']
    return False, needed_bytes(program, _beside_temporaries(cache.values()))

  best, _ = largest_fitting(measure, chip.hbm_bytes, limit, start=min(cache, default=1))
  return best, [p for p in cache.values() if p is not known]


def images_per_second(program: Program, chip: Chip, mfu: float) -> float:
  """A projection, not a measurement: every chip runs its program's XLA FLOPs at `mfu` of its
  peak, so a step takes flops / (mfu * peak) and moves the global batch."""
  if not program.flops:
    return 0.0
  return program.batch * mfu * chip.peak_bf16_flops / program.flops


def _gib(b) -> str:
  return f'{b / GiB:.2f} GiB'


def _collectives_text(c: dict) -> str:
  if not c:
    return 'none'
  return ', '.join(f'{k} {n} ({v / 2 ** 20:.1f} MiB)' for k, (n, v) in sorted(c.items()))


def report(topology: str, num_slices: int, mesh, chip: Chip, programs, max_batch=None) -> str:
  """The table aot prints (markdown, so docs/TPU.md can take it as it is)."""
  lines = [f'topology {topology_name(topology)} x {num_slices} slice(s): {mesh.size} x {chip.name}'
           f' ({_gib(chip.hbm_bytes)} HBM, {chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16 peak'
           f' per chip); mesh data={mesh.shape["data"]} x fsdp={mesh.shape["fsdp"]}', '',
           '| program | global batch | arguments | temporaries | outputs | total / HBM | '
           'fits | TFLOP per chip | collectives (count, bytes per chip) | compile |',
           '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  for p in programs:
    if p.error:
      mark = '**cannot run**' if p.cannot_run else '**no**'
      lines.append(f'| {p.name} | {p.batch} | | | | | {mark}: {p.error} | | | '
                   f'{p.compile_s:.0f} s |')
      continue
    m = p.memory
    lines.append(
        f'| {p.name} | {p.batch} | {_gib(m["arguments"])} | {_gib(m["temporaries"])} | '
        f'{_gib(m["outputs"])} | {_gib(m["total"])} / {_gib(chip.hbm_bytes)} '
        f'({100 * m["total"] / chip.hbm_bytes:.0f}%) | {"yes" if fits(p, chip) else "**no**"} | '
        f'{p.flops / 1e12:.3g} | {_collectives_text(p.collectives)} | {p.compile_s:.0f} s |')
  step = next((p for p in programs if p.name == 'train step' and not p.error), None)
  if step is not None:
    lines.append('')
    lines.append(f'train state per chip (params, EMA, Adam moments; from the shardings): '
                 f'{_gib(step.state_bytes)}')
    lines.append('projected training throughput (XLA FLOPs of one step at a given MFU of the '
                 'bf16 peak; a projection, not a measurement): ' + ', '.join(
                     f'{mfu:.0%} MFU {images_per_second(step, chip, mfu):.1f} img/s'
                     for mfu in (0.4, 0.6)))
  if max_batch is not None:
    best, seconds, tried = max_batch
    steps = [p for p in programs + tried if p.name == 'train step']
    beside = _beside_temporaries(steps)

    def projected(p):
      return f'{images_per_second(p, chip, 0.4):.0f} img/s at 40% MFU'

    def outcome(p):
      if fits(p, chip):
        return f'{_gib(p.memory["total"])}, {projected(p)}'
      if not p.error:
        return f'{_gib(p.memory["total"])}, over HBM'
      needed = needed_bytes(p, beside)
      return 'out of memory' + (f' (needs {_gib(needed)})' if needed is not None else '')
    probes = ', '.join(f'{p.batch // mesh.size}: {outcome(p)}' for p in tried)
    lines.append(f'largest per-chip batch that fits (of multiples of {TILE_LANES}, then of '
                 f'{TILE_ROWS}, then 1 to {TILE_ROWS - 1} when none fits): {best} (global '
                 f'{best * mesh.size}); the '
                 f'search compiled {len(tried)} more train steps in {seconds:.0f} s (per chip: '
                 f'{probes or "none"})')
    # Near the limit XLA rematerialises, so each image can cost more FLOPs than at a smaller
    # batch that fits: the fastest batch by the projection need not be the largest.
    fitting = [p for p in steps if fits(p, chip)]
    if fitting:
      fastest = max(fitting, key=lambda p: images_per_second(p, chip, 0.4))
      lines.append(f'fastest per-chip batch compiled, by the projection: '
                   f'{fastest.batch // mesh.size} ({projected(fastest)} on these '
                   f'{mesh.size} chips)')
  return '\n'.join(lines)


def chip_of(devices) -> Chip:
  kind = devices[0].device_kind
  if kind not in CHIPS:
    raise ValueError(f'no HBM and peak figures for {kind!r}; add it to aot.CHIPS')
  return CHIPS[kind]


def run(config, topology: str, num_slices: int = 1, *, sample: bool = True,
        max_batch: bool = False):
  """Compiles for the topology; returns (report, `verdict`'s line and exit status). Raises naming
  the field that cannot work there (the Trainer's or the mesh's ValueError, as a real run
  would raise it)."""
  from idm_jax import configlib
  from idm_jax import parallel
  configlib.validate(config)
  mode = config.get('mode', 'train')
  if max_batch and mode not in TRAINS:
    raise ValueError(f'--max_batch searches train.batch_size, and config.mode={mode} runs no '
                     f'train step; its batch is {restorer_job(config)[0]}.batch_size per host')
  devices = topology_devices(topology, num_slices)
  chip = chip_of(devices)
  mesh = parallel.make_mesh(config.mesh, devices)
  programs = []
  if mode in TRAINS:
    programs.append(compile_train_step(config, mesh))
    if sample:
      grid = configlib.sample_settings(config.sample, steps=config.train.vis_steps)
      programs.append(compile_sampler(config, mesh, grid, config.train.num_vis,
                                      'sampler (training grid)'))
  if mode in RESTORES and (sample or mode not in TRAINS):
    batch_field, settings = restorer_job(config)
    hosts = parallel.process_count_of(mesh)
    programs.append(compile_restorer(config, list(mesh.devices.flat), settings,
                                     config[batch_field].batch_size,
                                     f'restorer ({batch_field}.batch_size per host, '
                                     f'{hosts} hosts)'))
  best = None
  if max_batch:
    t0 = time.perf_counter()
    found, tried = max_batch_per_chip(config, mesh, chip, known=programs[0])
    best = (found, time.perf_counter() - t0, tried)
  return report(topology, num_slices, mesh, chip, programs, best), verdict(programs, chip)


def verdict(programs, chip: Chip) -> tuple[str, int]:
  """(the verdict line, the exit status): 0 fits, 1 does not fit in HBM, 2 cannot run."""
  blocked = [p for p in programs if p.cannot_run]
  if blocked:
    return 'does not run: ' + '; '.join(f'{p.name}: {p.error}' for p in blocked), 2
  if all(fits(p, chip) for p in programs):
    return 'fits', 0
  return ('does not fit (lower train.batch_size or sample sizes, raise mesh.fsdp, or set '
          f'model.remat=True; a train batch of {TILE_ROWS} or a multiple of it per chip can fit '
          'where a smaller one does not: --max_batch searches those)'), 1


def main(argv):
  from absl import app
  from absl import flags
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  try:
    text, (line, status) = run(f.config, f.topology, f.num_slices, sample=f.sample,
                               max_batch=f.max_batch)
  except ValueError as e:  # a field the slice cannot take (ConfigError is one): no traceback
    print(f'aot: cannot run on {f.topology}: {e}', file=sys.stderr)
    print('verdict: does not run', file=sys.stderr)
    raise SystemExit(2) from None
  print(text)
  print('verdict:', line)
  if status:
    raise SystemExit(status)


def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).', lock_config=True)
  flags.DEFINE_string('topology', None, 'libtpu topology (v5e:4x4, v4:2x2x4, v5p:4x4x4) or '
                      'accelerator type (v5litepod-16, v4-32, v5p-128).')
  flags.DEFINE_integer('num_slices', 1, 'Slices joined over the data-centre network.')
  flags.DEFINE_bool('sample', True, "With a training config.mode, also compile its samplers "
                    "(the training grid's; extrinsic's cleaning Restorer).")
  flags.DEFINE_bool('max_batch', False, 'Also search the largest per-chip batch that fits.')
  flags.mark_flags_as_required(['config', 'topology'])


if __name__ == '__main__':
  from absl import app as _app
  _define_flags()
  _app.run(main)
