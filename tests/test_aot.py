"""aot.py: the HLO collectives parser and topology names (always), and, with libtpu installed,
real TPU compiles of configs/test.py's train step and sampler for v5e:2x2 on the CPU."""
import dataclasses
import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import REPO, load_config

from idm_jax import aot
from idm_jax import configlib

HAS_LIBTPU = importlib.util.find_spec('libtpu') is not None
needs_libtpu = pytest.mark.skipif(
    not HAS_LIBTPU, reason='AOT TPU compiles need libtpu: pip install -e ".[tpu]" (see README, '
    '"Checking a TPU pod before launching")')

TOPOLOGY = 'v5e:2x2'

# A hand-written module in the optimized-HLO form XLA's TPU compiler prints.
HLO = """\
HloModule jit_train_step, entry_computation_layout={(f32[8]{0})->f32[8]{0}}

%all-reduce-scatter.3 (input_0: f32[32,96], input_1: f32[64]) -> (f32[32,32], f32[16]) {
  %input_0 = f32[32,96]{0,1:T(8,128)} parameter(0)
  %all-reduce.9 = (f32[32,128]{0,1:T(8,128)}, f32[64]{0:T(128)}) all-reduce(%pad.1, %input_1), channel_id=4, replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %tuple.2 = (f32[32,32]{0,1}, f32[16]{0}) tuple(%a, %b)
}

%body.1 (p: (s32[], bf16[4,4])) -> (s32[], bf16[4,4]) {
  %ag = bf16[4,4]{1,0:T(4,128)(2,1)} all-gather(%x), channel_id=1, dimensions={0}, metadata={op_name="jit(f)/all-gather(x)"}
  ROOT %t = (s32[], bf16[4,4]) tuple(%i, %ag)
}

ENTRY %main.5 (param: f32[8]) -> f32[8] {
  %all-gather-start.2 = (bf16[2,1024]{1,0}, bf16[8,1024]{1,0}) all-gather-start(%param.1), channel_id=2, dimensions={0}
  %all-gather-done.2 = bf16[8,1024]{1,0} all-gather-done(%all-gather-start.2)
  %cp-start = (f32[8]{0}, f32[8]{0}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%param), channel_id=3, source_target_pairs={{0,1},{1,0}}
  %cp-done = f32[8]{0} collective-permute-done(%cp-start)
  %ar = (f32[8]{0}, /*index=1*/f32[8]{0}) all-reduce(%param, %param), channel_id=5, to_apply=%add
  %fusion.7 = f32[8]{0} fusion(%ar), kind=kLoop, calls=%all-reduce-scatter.3, metadata={op_name="all-reduce(x)"}
  %not = f32[8]{0} add(%all-reduce.1, %param)
  ROOT %w = (s32[], bf16[4,4]) while(%init), condition=%cond, body=%body.1
}
"""


def test_collectives_counts_each_op_once_with_its_result_bytes():
  c = aot.collectives(HLO)
  # The async all-gather once (its gathered result: 8 x 1024 bf16) plus the one in the loop body.
  assert c['all-gather'] == (2, 8 * 1024 * 2 + 4 * 4 * 2)
  # collective-permute-start's tuple is (operand, result, contexts): the result only.
  assert c['collective-permute'] == (1, 8 * 4)
  # A combined all-reduce: the sum of its results, through a /*index=1*/ comment.
  assert c['all-reduce'] == (1, 2 * 8 * 4)
  # The all-reduce inside an all-reduce-scatter fusion is TPU's reduce-scatter.
  assert c['reduce-scatter'] == (1, (32 * 128 + 64) * 4)
  # Names in operands, calls= and metadata are not ops; nothing else is a collective.
  assert set(c) == {'all-gather', 'collective-permute', 'all-reduce', 'reduce-scatter'}


def test_collectives_of_a_module_without_any_is_empty():
  assert aot.collectives('ENTRY %m (p: f32[2]) -> f32[2] {\n  ROOT %a = f32[2]{0} add(%p, %p)\n}') == {}


@pytest.mark.parametrize('name, expected', [
    ('v5e:4x4', 'v5e:4x4'), ('v5litepod-16', 'v5e:4x4'), ('v5litepod-256', 'v5e:16x16'),
    ('v4-32', 'v4:2x2x4'), ('v5p-128', 'v5p:4x4x4'), ('v6e-8', 'v6e:2x4')])
def test_topology_name(name, expected):
  assert aot.topology_name(name) == expected


@pytest.mark.parametrize('name', ['v4-12', 'tpu-16', 'v5e'])
def test_topology_name_rejects_unknown_shapes(name):
  with pytest.raises(ValueError, match='--topology'):
    aot.topology_name(name)


def test_projection_is_batch_times_achieved_flops_over_step_flops():
  chip = aot.Chip('x', 16 * aot.GiB, 100e12)
  step = aot.Program('train step', 32, 1.0, {}, 2e12, {})
  # 2 TFLOP per chip per step at 40% of 100 TFLOP/s: 0.05 s per step of 32 images.
  assert aot.images_per_second(step, chip, 0.4) == pytest.approx(640.0)


def _measure(base, per_image, capacity, oom_above=None, reports=True):
  """A fake compile: (fits, memory) for a batch. Above oom_above it fails without saying what it
  needed; otherwise a compile over the capacity reports its need when `reports`, as XLA does."""
  def measure(n):
    if oom_above is not None and n > oom_above:
      return False, None
    m = base + per_image(n)
    return m <= capacity, m if (m <= capacity or reports) else None
  return measure


def _searched_best(measure, limit):
  """What largest_fitting should return, straight from its definition."""
  fitting = lambda ns: max([n for n in ns if measure(n)[0]], default=0)
  return fitting(range(8, limit + 1, 8)) or fitting(range(1, min(limit, 7) + 1))


@pytest.mark.parametrize('per_image, oom_above', [
    (lambda n: 7 * n, None),                    # linear
    (lambda n: 3 * n + n * n // 4, None),       # convex
    (lambda n: 7 * n, 20),                      # overshoots into compiles that report no memory
    (lambda n: 40 * (n // 5 + 1), None),        # steps (layout padding): flat, then jumps
    (lambda n: int(300 * (1 - 0.8 ** n)), None),  # saturating, as XLA packs under pressure
])
@pytest.mark.parametrize('capacity', [11, 40, 100, 161, 1000])
@pytest.mark.parametrize('reports', [True, False])
@pytest.mark.parametrize('start', [1, 3, 16])
def test_largest_fitting_finds_the_exact_edge(per_image, oom_above, capacity, reports, start):
  measure = _measure(4, per_image, capacity, oom_above, reports)
  best, tried = aot.largest_fitting(measure, capacity, limit=64, start=start)
  assert best == _searched_best(measure, 64)
  assert len(tried) == len(set(tried))  # no compile twice
  assert all(n % 8 == 0 or n < 8 for n in tried)
  assert tried[0] == (start if start % 8 == 0 else 8)  # a multiple of 8 first
  if best:  # the edge was compiled on both sides
    above = best + 8 if best >= 8 else best + 1
    assert best in tried and (above > 64 or above in tried)


def _fits_compiled(measure, tried):
  return sum(measure(n)[0] for n in tried)


def test_largest_fitting_compiles_two_fits_when_memory_is_linear():
  measure = _measure(1000, lambda n: 700 * n, 16_000)
  best, tried = aot.largest_fitting(measure, 16_000, limit=1024)
  # 21 images fit; of the batches searched, 16. Compiled: 128 (refused: no multiple of 128 fits),
  # then 8, 32 (refused), 16, 24 (refused).
  assert best == 16 and tried == [128, 8, 32, 16, 24] and _fits_compiled(measure, tried) == 2


def test_largest_fitting_finds_a_multiple_of_128_past_refused_multiples_of_8():
  # As XLA plans the generation config on v5p (docs/TPU.md): at multiples of 128 the batch goes
  # on the tiles' lanes and costs less per image than at the multiples of 8 around them.
  measure = lambda n: (lambda m: (m <= 100, m))(1 + (0.10 if n % 128 == 0 else 0.16) * n)
  best, tried = aot.largest_fitting(measure, 100, limit=1024)
  assert best == 896 and measure(896)[0] and not measure(904)[0] and not measure(1024)[0]
  assert not measure(624)[0]  # where a search over the multiples of 8 alone would have stopped
  assert len(tried) == len(set(tried)) and all(n % 8 == 0 for n in tried)
  assert tried[:3] == [128, 1024, 896] and 904 in tried
  # The multiple of 128 it starts from counts: a known 256 is not compiled again.
  assert aot.largest_fitting(measure, 100, limit=1024, start=256)[1][0] == 256


def test_largest_fitting_on_v5es_measured_memory_finds_8_above_refused_3_and_4():
  # ffhq.py's train step on v5e-16 (docs/TPU.md, libtpu 0.0.42): per chip, whether it fit and its
  # GiB in all, or what the refusal needed. A search over every batch would stop at 2.
  v5e = {2: (True, 15.69), 3: (False, 17.52), 4: (False, 19.20), 8: (True, 14.20),
         16: (False, 29.30), 128: (False, 110.68)}
  best, tried = aot.largest_fitting(lambda n: v5e[n], 16, limit=1024, start=2)
  assert best == 8 and tried == [128, 8, 16]


def test_largest_fitting_on_v4s_measured_generation_memory_finds_256_in_two_fits():
  # The generation config's train step on v4 (docs/TPU.md, libtpu 0.0.42), started from the
  # compiled 128 per chip: any other batch would raise KeyError.
  v4 = {128: (True, 19.94), 384: (False, 40.28), 256: (True, 29.81), 544: (False, 78.82),
        264: (False, 34.24)}
  best, tried = aot.largest_fitting(lambda n: v4[n], 32, limit=1024, start=128)
  assert best == 256 and tried == [128, 384, 256, 544, 264]


def test_largest_fitting_is_zero_when_one_image_does_not_fit_and_stops_at_the_limit():
  assert aot.largest_fitting(_measure(0, lambda n: 10 * n, 5), 5) == (0, [128, 8, 1])
  best, tried = aot.largest_fitting(_measure(0, lambda n: n, 10 ** 9), 10 ** 9, limit=8)
  assert best == 8 and tried == [8]
  assert aot.largest_fitting(_measure(0, lambda n: n, 10 ** 9), 10 ** 9, limit=5) == (5, [1, 5])


def test_needed_bytes_reads_xlas_out_of_memory_message():
  # Verbatim from libtpu 0.0.42 (ffhq.py, 3 images per chip on v5e).
  error = ('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO '
           'temporaries (16.26G) exceeds available HBM (15.75G).')
  p = aot.Program('train step', 48, 1.0, {}, 0.0, {}, error=error)
  # It names the temporaries only: the arguments and outputs complete the total.
  assert aot.needed_bytes(p, 1.26 * aot.GiB) == pytest.approx(17.52 * aot.GiB)
  # Refused at the end of the compile (ffhq_256.py at fsdp = 4 on v5e), it names the total.
  late = ('RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent error. Ran out '
          'of memory in memory space hbm. Used 15.82G of 15.75G hbm. Exceeded hbm capacity by '
          '73.09M.')
  assert aot.needed_bytes(dataclasses.replace(p, error=late), 1.26 * aot.GiB) == pytest.approx(
      15.82 * aot.GiB)
  assert aot.needed_bytes(dataclasses.replace(p, error='RESOURCE_EXHAUSTED: other')) is None


def test_max_batch_search_starts_from_the_step_already_compiled(monkeypatch):
  class Mesh:
    size = 4
    shape = {'data': 4, 'fsdp': 1}
  G = aot.GiB
  chip = aot.Chip('x', 60 * G, 1e12)
  compiled = []

  def compile_train_step(config, mesh):
    compiled.append(config.train.batch_size)
    per_chip = config.train.batch_size // mesh.size
    temporaries = 10 * per_chip * G
    if temporaries > 59 * G:  # as XLA refuses it, saying what it needed
      return aot.Program('train step', config.train.batch_size, 1.0, {}, 0.0, {}, error=(
          f'RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO '
          f'temporaries ({temporaries / G:.2f}G) exceeds available HBM (59.00G).'))
    memory = {'arguments': 1 * G, 'temporaries': temporaries, 'outputs': 0,
              'total': temporaries + 1 * G}
    return aot.Program('train step', config.train.batch_size, 1.0, memory, 1.0, {})
  monkeypatch.setattr(aot, 'compile_train_step', compile_train_step)
  known = compile_train_step(aot.with_batch(load_config('test'), 8), Mesh())
  compiled.clear()
  best, programs = aot.max_batch_per_chip(load_config('test'), Mesh(), chip, known=known)
  assert best == 5 and 8 not in compiled and compiled == [p.batch for p in programs]
  assert all(b % Mesh.size == 0 for b in compiled)
  # Per chip: 128 and 8 first (refused), then from the known 2 along the line the refusals
  # drew: 7 (refused, needing 71 GiB) -> 5 -> 6 (refused).
  assert compiled == [512, 32, 28, 20, 24]
  cannot = dataclasses.replace(known, error='no', cannot_run=True)
  assert aot.max_batch_per_chip(load_config('test'), Mesh(), chip, known=cannot) == (0, [])
  # A sampler beside the step (its arguments are not the step's) must not enter the estimate.
  sampler = aot.Program('sampler', 8, 1.0, {'arguments': 50 * G, 'temporaries': 0, 'outputs': 0,
                                            'total': 50 * G}, 1.0, {})
  text = aot.report('v5e:2x2', 1, Mesh(), chip, [sampler, known], (best, 5.0, programs))
  assert ('largest per-chip batch that fits (of multiples of 128, then of 8, then 1 to 7 when '
          'none fits): 5 (global 20)') in text
  assert '8: out of memory (needs 81.00 GiB)' in text and '6: out of memory (needs 61.00 GiB)' in text
  # Each fitting probe carries its projection (flops 1.0 per chip: batch x 0.4 x 1e12 img/s).
  assert '5: 51.00 GiB, 8000000000000 img/s at 40% MFU' in text
  assert 'fastest per-chip batch compiled, by the projection: 5 (' in text


def test_report_names_the_fastest_fitting_batch_when_the_limit_recomputes_more():
  # As the generation config on v4 (docs/TPU.md): 256 per chip fits, but XLA rematerialises there
  # and spends 0.186 TFLOP per image against 0.179 at 128, so 128 projects faster.
  class Mesh:
    size = 16
    shape = {'data': 16, 'fsdp': 1}
  G = aot.GiB
  chip = aot.Chip('v4', 32 * G, 275e12)

  def step(per_chip, total_gib, tflop_per_image, error=''):
    memory = {} if error else {'arguments': 0.5 * G, 'temporaries': (total_gib - 0.5) * G,
                               'outputs': 0, 'total': total_gib * G}
    return aot.Program('train step', per_chip * 16, 1.0, memory,
                       0.0 if error else tflop_per_image * per_chip * 1e12, {}, error=error)
  known = step(128, 19.94, 0.179)
  tried = [step(384, 0, 0, error='Ran out of memory in memory space hbm. Used 39.46G of 30.75G'),
           step(256, 29.81, 0.186), step(264, 33.0, 0.19)]  # 264: compiled, over HBM
  text = aot.report('v4:2x2x4', 1, Mesh(), chip, [known], (256, 1.0, tried))
  assert ': 256 (global 4096)' in text and '264: 33.00 GiB, over HBM' in text
  assert 'fastest per-chip batch compiled, by the projection: 128 (9832 img/s at 40% MFU' in text


def test_verdict_tells_memory_from_cannot_run():
  chip = aot.Chip('x', 100, 1e12)
  fits = aot.Program('train step', 8, 1.0, {'total': 90}, 1.0, {})
  over = aot.Program('train step', 8, 1.0, {'total': 110}, 1.0, {})
  oom = aot.Program('sampler', 8, 1.0, {}, 0.0, {}, error='RESOURCE_EXHAUSTED: ...')
  blocked = aot.Program('restorer', 8, 1.0, {}, 0.0, {}, error='spans', cannot_run=True)
  assert aot.verdict([fits], chip) == ('fits', 0)
  assert aot.verdict([fits, over], chip)[1] == 1 and aot.verdict([oom], chip)[1] == 1
  assert aot.verdict([fits, oom, blocked], chip) == ('does not run: restorer: spans', 2)


@pytest.mark.parametrize('mode, expected', [
    ('train', ['train step', 'sampler (training grid)']),
    ('extrinsic', ['train step', 'sampler (training grid)', 'restorer (clean.batch_size']),
    ('clean', ['restorer (clean.batch_size']),
    ('evaluate', ['restorer (eval.batch_size']),
    ('generate', ['restorer (generate.batch_size']),
    ('sample', ['restorer (sample.batch_size']),
])
def test_run_compiles_the_programs_of_the_configs_mode(monkeypatch, mode, expected):
  import jax
  compiled = []

  def fake(name_of):
    def compile_fn(config, where, *args):
      name = name_of(args)
      compiled.append((name, args))
      memory = dict(arguments=1, temporaries=1, outputs=0, code=0, total=2)
      return aot.Program(name, 4, 1.0, memory, 1.0, {})
    return compile_fn
  monkeypatch.setattr(aot, 'topology_devices', lambda topology, num_slices=1: jax.devices()[:1])
  monkeypatch.setattr(aot, 'chip_of', lambda devices: aot.Chip('x', 100, 1e12))
  monkeypatch.setattr(aot, 'compile_train_step', fake(lambda args: 'train step'))
  monkeypatch.setattr(aot, 'compile_sampler', fake(lambda args: args[-1]))
  monkeypatch.setattr(aot, 'compile_restorer', fake(lambda args: args[-1]))
  config = load_config('test')
  config.mode = mode
  _, (line, status) = aot.run(config, 'v5e:1x1')
  assert [n for n, _ in compiled if not n.startswith(tuple(expected))] == []
  assert len(compiled) == len(expected) and (line, status) == ('fits', 0)
  if mode in ('clean', 'extrinsic'):  # the cleaning sampler: clean.steps from clean.t_start
    settings, batch = compiled[-1][1][0], compiled[-1][1][1]
    assert settings.t_start == config.clean.t_start and settings.steps == config.clean.steps
    assert batch == config.clean.batch_size
  # --nosample drops a training mode's samplers, never the only program of a sampling mode.
  compiled.clear()
  aot.run(config, 'v5e:1x1', sample=False)
  assert len(compiled) == (1 if mode in aot.TRAINS else len(expected))
  if mode not in aot.TRAINS:   # --max_batch has no train step to search: said, not ignored
    with pytest.raises(ValueError, match=r'--max_batch .* config\.mode=' + mode):
      aot.run(config, 'v5e:1x1', max_batch=True)


def _config(**mesh):
  config = load_config('test')
  # The test model's kernels are small; shard every one of more than 1024 elements.
  config.mesh.update(fsdp_min_size=1024, **mesh)
  return config


@pytest.fixture(scope='module')
def mesh_devices():
  if not HAS_LIBTPU:
    pytest.skip('AOT TPU compiles need libtpu: pip install -e ".[tpu]"')
  return aot.topology_devices(TOPOLOGY)


@pytest.fixture(scope='module')
def data_parallel_step(mesh_devices):
  from idm_jax import parallel
  config = _config(data=-1, fsdp=1)
  mesh = parallel.make_mesh(config.mesh, mesh_devices)
  return aot.compile_train_step(config, mesh), mesh


@needs_libtpu
def test_train_step_and_sampler_compile_for_a_tpu_topology(mesh_devices, data_parallel_step):
  from idm_jax import parallel
  step, mesh = data_parallel_step
  chip = aot.chip_of(mesh_devices)
  assert chip.name == 'v5e' and mesh.devices.flat[0].platform == 'tpu'
  assert mesh.shape == {'data': 4, 'fsdp': 1}
  assert not step.error and aot.fits(step, chip)
  # AdamW state (m, v), params and EMA are arguments: more than 4 x the params' f32 bytes.
  config = _config(data=-1, fsdp=1)
  from idm_jax.models import unet
  n = unet.count_params(config.model, config.data.resolution)
  assert step.memory['arguments'] >= 4 * 4 * n
  assert step.flops > 0
  # Pure data parallelism: the gradients are all-reduced and no parameter is gathered.
  assert step.collectives.get('all-reduce', (0, 0))[0] >= 1
  assert 'all-gather' not in step.collectives
  sampler = aot.compile_sampler(config, mesh, configlib.sample_settings(config.sample),
                                config.sample.batch_size, 'sampler')
  assert not sampler.error and sampler.flops > 0
  # The sampler has no optimiser state: far fewer argument bytes than the step.
  assert sampler.memory['arguments'] < step.memory['arguments'] / 3
  # The Restorer's program (sample, clean, evaluate): 3 examples padded to the host's 4 chips.
  restorer = aot.compile_restorer(config, list(mesh.devices.flat),
                                  configlib.sample_settings(config.sample), 3, 'restorer')
  assert not restorer.error and restorer.batch == 4 and restorer.flops > 0
  assert restorer.memory['arguments'] < step.memory['arguments'] / 3
  text = aot.report(TOPOLOGY, 1, mesh, chip, [step, sampler, restorer])
  assert '| train step | 4 |' in text and 'projection' in text
  assert parallel.num_slices(mesh_devices) == 1


@needs_libtpu
def test_fsdp_shrinks_the_per_device_argument_bytes(mesh_devices, data_parallel_step):
  from idm_jax import parallel
  dp, _ = data_parallel_step
  config = _config(data=1, fsdp=4)
  fsdp = aot.compile_train_step(config, parallel.make_mesh(config.mesh, mesh_devices))
  assert not fsdp.error
  # Params, EMA and both Adam moments are split 4 ways (small tensors stay replicated).
  assert fsdp.memory['arguments'] < 0.5 * dp.memory['arguments']
  # ... and the step gathers the sharded kernels before using them.
  assert fsdp.collectives.get('all-gather', (0, 0))[0] >= 1
  # The shardings say the same before any compile.
  assert 0 < fsdp.state_bytes < 0.5 * dp.state_bytes


@needs_libtpu
def test_sharded_init_draws_only_each_devices_shard(mesh_devices):
  """Partitionable threefry in the Trainer's init: each device generates its shard's bits, so
  the per-device program does far fewer FLOPs than one that draws whole tensors."""
  import functools
  import jax
  from idm_jax import parallel
  from idm_jax import train
  config = _config(data=1, fsdp=4)
  trainer = train.Trainer(config, parallel.make_mesh(config.mesh, mesh_devices))
  key = jax.ShapeDtypeStruct((2,), jax.numpy.uint32)
  with jax.threefry_partitionable(True):
    sharded = trainer.init_jit.lower(key).compile()
  whole = jax.jit(functools.partial(train.init_state, model=trainer.model, tx=trainer.tx),
                  out_shardings=trainer.shardings)
  with jax.threefry_partitionable(False):
    replicated = whole.lower(key).compile()
  assert train.xla_flops(sharded) < 0.6 * train.xla_flops(replicated)


@needs_libtpu
def test_batch_that_does_not_divide_the_mesh_fails_naming_the_field():
  config = _config()
  config.train.batch_size = 6
  with pytest.raises(ValueError, match=r'config\.train\.batch_size: 6 .* 4 devices'):
    aot.run(config, TOPOLOGY, sample=False)


@needs_libtpu
def test_gpu_only_attention_fails_naming_the_field():
  config = _config()
  config.model.attention_impl = 'cudnn'
  with pytest.raises(ValueError, match=r'config\.model\.attention_impl: .*tpu'):
    aot.run(config, TOPOLOGY, sample=False)


@needs_libtpu
def test_multi_slice_mesh_puts_the_data_axis_across_slices():
  from idm_jax import parallel
  devices = aot.topology_devices(TOPOLOGY, num_slices=2)
  assert parallel.num_slices(devices) == 2
  mesh = parallel.make_mesh(_config(data=2, fsdp=4).mesh, devices)
  # Each fsdp group (a row) lies within one slice, and the rows cover both slices.
  rows = [{d.slice_index for d in row} for row in mesh.devices]
  assert all(len(r) == 1 for r in rows) and set.union(*rows) == {0, 1}
  with pytest.raises(ValueError, match=r'config\.mesh\.data'):
    parallel.make_mesh(_config(data=1, fsdp=8).mesh, devices)


@needs_libtpu
def test_cli_fails_with_the_field_and_exit_status():
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  r = subprocess.run([sys.executable, '-m', 'idm_jax.aot', '--config=configs/test.py',
                      f'--topology={TOPOLOGY}', '--nosample', '--config.train.batch_size=6'],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 2, r.stderr[-2000:]
  assert 'config.train.batch_size: 6 is not divisible' in r.stderr
  assert 'Traceback' not in r.stderr


@needs_libtpu
@pytest.mark.parametrize('name, count', [('v5e:1x1', 1), ('v6e:1x1', 1), ('v4-32', 16),
                                         ('v5litepod-16', 16)])
def test_topology_devices_one_device_per_chip(name, count):
  """Colab's single-chip runtimes, and v4 as Cloud TPU VMs run it (megacore: one device a
  chip, where libtpu's default is one a TensorCore)."""
  devices = aot.topology_devices(name)
  assert len(devices) == count and devices[0].device_kind in aot.CHIPS


def _one_host(mesh):
  first = mesh.devices.flat[0].process_index
  return [d for d in mesh.devices.flat if d.process_index == first]


@needs_libtpu
def test_restorer_spans_every_host_of_a_pod_without_communicating():
  """v5e-16 is 4 hosts of 4 chips: each host's 3 examples are padded to its 4 chips and the
  hosts' blocks make one batch of 16 over the slice. Examples are independent and the params
  replicated, so the program has no collective: the hosts only have to launch it together."""
  from idm_jax import parallel
  config = _config(data=-1, fsdp=1)
  mesh = parallel.make_mesh(config.mesh, aot.topology_devices('v5e:4x4'))
  restorer = aot.compile_restorer(config, list(mesh.devices.flat),
                                  configlib.sample_settings(config.sample), 3, 'restorer')
  assert not restorer.error and restorer.batch == 16
  assert restorer.collectives == {}


@needs_libtpu
def test_restorer_runs_on_a_large_v5e_slice_which_one_host_cannot():
  """v5e beyond 16 chips routes over limited ICI: XLA compiles a program over one chip or the
  whole slice, not one host's 4 chips. The Restorer's program spans the slice, so it compiles;
  a one-host program is reported as unable to run (exit status 2), not as a traceback."""
  from idm_jax import parallel
  config = _config(data=-1, fsdp=1)
  mesh = parallel.make_mesh(config.mesh, aot.topology_devices('v5e:8x8'))
  settings = configlib.sample_settings(config.sample)
  whole = aot.compile_restorer(config, list(mesh.devices.flat), settings, 4, 'restorer')
  assert not whole.error and whole.batch == 64
  chip = aot.chip_of(mesh.devices.flat)
  assert aot.verdict([whole], chip)[1] == 0
  host = aot.compile_restorer(config, _one_host(mesh), settings, 4, 'one host')
  assert host.cannot_run and 'subset' in host.error
  line, status = aot.verdict([host], chip)
  assert status == 2 and line.startswith('does not run: one host')
