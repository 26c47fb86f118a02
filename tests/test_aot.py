"""idm_jax.aot's check: its report, verdict and the programs each config.mode compiles (always),
and, with libtpu installed, real TPU compiles of configs/test.py's train step and samplers for
v5e:2x2 and larger slices on the CPU (CI runs this file again after installing libtpu)."""

import importlib.util
import os
import subprocess
import sys

from conftest import REPO
from conftest import load_config
import pytest

from idm_jax.aot import check
from idm_jax.aot import chips
from idm_jax.aot import programs
from idm_jax.runtime import configlib

HAS_LIBTPU = importlib.util.find_spec('libtpu') is not None
needs_libtpu = pytest.mark.skipif(
  not HAS_LIBTPU,
  reason='AOT TPU compiles need libtpu: pip install -e ".[tpu]" (see README, '
  '"Checking a TPU pod before launching")',
)

TOPOLOGY = 'v5e:2x2'


def test_projection_is_batch_times_achieved_flops_over_step_flops():
  chip = chips.Chip('x', 16 * chips.GiB, 100e12)
  step = programs.Program('train step', 32, 1.0, {}, 2e12, {})
  # 2 TFLOP per chip per step at 40% of 100 TFLOP/s: 0.05 s per step of 32 images.
  assert programs.images_per_second(step, chip, 0.4) == pytest.approx(640.0)


def test_report_names_the_fastest_fitting_batch_when_the_limit_recomputes_more():
  # As the generation config on v4 (docs/TPU.md): 256 per chip fits, but XLA rematerialises there
  # and spends 0.186 TFLOP per image against 0.179 at 128, so 128 projects faster.
  class Mesh:
    size = 16
    shape = {'data': 16, 'fsdp': 1}

  G = chips.GiB
  chip = chips.Chip('v4', 32 * G, 275e12)

  def step(per_chip, total_gib, tflop_per_image, error=''):
    memory = (
      {}
      if error
      else {
        'arguments': 0.5 * G,
        'temporaries': (total_gib - 0.5) * G,
        'outputs': 0,
        'total': total_gib * G,
      }
    )
    return programs.Program(
      'train step',
      per_chip * 16,
      1.0,
      memory,
      0.0 if error else tflop_per_image * per_chip * 1e12,
      {},
      error=error,
    )

  known = step(128, 19.94, 0.179)
  tried = [
    step(384, 0, 0, error='Ran out of memory in memory space hbm. Used 39.46G of 30.75G'),
    step(256, 29.81, 0.186),
    step(264, 33.0, 0.19),
  ]  # 264: compiled, over HBM
  text = check.report('v4:2x2x4', 1, Mesh(), chip, [known], (256, 1.0, tried))
  assert ': 256 (global 4096)' in text and '264: 33.00 GiB, over HBM' in text
  assert 'fastest per-chip batch compiled, by the projection: 128 (9832 img/s at 40% MFU' in text


def test_verdict_tells_memory_from_cannot_run():
  chip = chips.Chip('x', 100, 1e12)
  fits = programs.Program('train step', 8, 1.0, {'total': 90}, 1.0, {})
  over = programs.Program('train step', 8, 1.0, {'total': 110}, 1.0, {})
  oom = programs.Program('sampler', 8, 1.0, {}, 0.0, {}, error='RESOURCE_EXHAUSTED: ...')
  blocked = programs.Program('restorer', 8, 1.0, {}, 0.0, {}, error='spans', cannot_run=True)
  assert check.verdict([fits], chip) == ('fits', 0)
  assert check.verdict([fits, over], chip)[1] == 1 and check.verdict([oom], chip)[1] == 1
  assert check.verdict([fits, oom, blocked], chip) == ('does not run: restorer: spans', 2)


@pytest.mark.parametrize(
  'mode, expected',
  [
    ('train', ['train step', 'sampler (training grid)']),
    ('extrinsic', ['train step', 'sampler (training grid)', 'restorer (clean.batch_size']),
    ('clean', ['restorer (clean.batch_size']),
    ('evaluate', ['restorer (eval.batch_size']),
    ('generate', ['restorer (generate.batch_size']),
    ('sample', ['restorer (sample.batch_size']),
  ],
)
def test_run_compiles_the_programs_of_the_configs_mode(monkeypatch, mode, expected):
  import jax

  compiled = []

  def fake(name_of):
    def compile_fn(config, where, *args):
      name = name_of(args)
      compiled.append((name, args))
      memory = dict(arguments=1, temporaries=1, outputs=0, code=0, total=2)
      return programs.Program(name, 4, 1.0, memory, 1.0, {})

    return compile_fn

  monkeypatch.setattr(chips, 'topology_devices', lambda topology, num_slices=1: jax.devices()[:1])
  monkeypatch.setattr(chips, 'chip_of', lambda devices: chips.Chip('x', 100, 1e12))
  monkeypatch.setattr(programs, 'compile_train_step', fake(lambda args: 'train step'))
  monkeypatch.setattr(programs, 'compile_sampler', fake(lambda args: args[-1]))
  monkeypatch.setattr(programs, 'compile_restorer', fake(lambda args: args[-1]))
  config = load_config('test')
  config.mode = mode
  _, (line, status) = check.run(config, 'v5e:1x1')
  assert [n for n, _ in compiled if not n.startswith(tuple(expected))] == []
  assert len(compiled) == len(expected) and (line, status) == ('fits', 0)
  if mode in ('clean', 'extrinsic'):  # the cleaning sampler: clean.steps from clean.t_start
    settings, batch = compiled[-1][1][0], compiled[-1][1][1]
    assert settings.t_start == config.clean.t_start and settings.steps == config.clean.steps
    assert batch == config.clean.batch_size
  # --nosample drops a training mode's samplers, never the only program of a sampling mode.
  compiled.clear()
  check.run(config, 'v5e:1x1', sample=False)
  assert len(compiled) == (1 if mode in programs.TRAINS else len(expected))
  if mode not in programs.TRAINS:  # --max_batch has no train step to search: said, not ignored
    with pytest.raises(ValueError, match=r'--max_batch .* config\.mode=' + mode):
      check.run(config, 'v5e:1x1', max_batch=True)


def _config(**mesh):
  config = load_config('test')
  # The test model's kernels are small; shard every one of more than 1024 elements.
  config.mesh.update(fsdp_min_size=1024, **mesh)
  return config


@pytest.fixture(scope='module')
def mesh_devices():
  if not HAS_LIBTPU:
    pytest.skip('AOT TPU compiles need libtpu: pip install -e ".[tpu]"')
  return chips.topology_devices(TOPOLOGY)


@pytest.fixture(scope='module')
def data_parallel_step(mesh_devices):
  from idm_jax.runtime import parallel

  config = _config(data=-1, fsdp=1)
  mesh = parallel.make_mesh(config.mesh, mesh_devices)
  return programs.compile_train_step(config, mesh), mesh


@needs_libtpu
def test_train_step_and_sampler_compile_for_a_tpu_topology(mesh_devices, data_parallel_step):
  from idm_jax.runtime import parallel

  step, mesh = data_parallel_step
  chip = chips.chip_of(mesh_devices)
  assert chip.name == 'v5e' and mesh.devices.flat[0].platform == 'tpu'
  assert mesh.shape == {'data': 4, 'fsdp': 1}
  assert not step.error and programs.fits(step, chip)
  # AdamW state (m, v), params and EMA are arguments: more than 4 x the params' f32 bytes.
  config = _config(data=-1, fsdp=1)
  from idm_jax.models import unet

  n = unet.count_params(configlib.build_model(config.model, config.data.resolution))
  assert step.memory['arguments'] >= 4 * 4 * n
  assert step.flops > 0
  # Pure data parallelism: the gradients are all-reduced and no parameter is gathered.
  assert step.collectives.get('all-reduce', (0, 0))[0] >= 1
  assert 'all-gather' not in step.collectives
  sampler = programs.compile_sampler(
    config, mesh, configlib.sample_settings(config.sample), config.sample.batch_size, 'sampler'
  )
  assert not sampler.error and sampler.flops > 0
  # The sampler has no optimiser state: far fewer argument bytes than the step.
  assert sampler.memory['arguments'] < step.memory['arguments'] / 3
  # The Restorer's program (sample, clean, evaluate): 3 examples padded to the host's 4 chips.
  restorer = programs.compile_restorer(
    config, list(mesh.devices.flat), configlib.sample_settings(config.sample), 3, 'restorer'
  )
  assert not restorer.error and restorer.batch == 4 and restorer.flops > 0
  assert restorer.memory['arguments'] < step.memory['arguments'] / 3
  text = check.report(TOPOLOGY, 1, mesh, chip, [step, sampler, restorer])
  assert '| train step | 4 |' in text and 'projection' in text
  assert parallel.num_slices(mesh_devices) == 1


@needs_libtpu
def test_fsdp_shrinks_the_per_device_argument_bytes(mesh_devices, data_parallel_step):
  from idm_jax.runtime import parallel

  dp, _ = data_parallel_step
  config = _config(data=1, fsdp=4)
  fsdp = programs.compile_train_step(config, parallel.make_mesh(config.mesh, mesh_devices))
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

  from idm_jax.runtime import parallel
  from idm_jax.training import train

  config = _config(data=1, fsdp=4)
  trainer = train.Trainer(config, parallel.make_mesh(config.mesh, mesh_devices))
  key = jax.ShapeDtypeStruct((2,), jax.numpy.uint32)
  with jax.threefry_partitionable(True):
    sharded = trainer.init_jit.lower(key).compile()
  whole = jax.jit(
    functools.partial(train.init_state, model=trainer.model, tx=trainer.tx),
    out_shardings=trainer.shardings,
  )
  with jax.threefry_partitionable(False):
    replicated = whole.lower(key).compile()
  assert train.xla_flops(sharded) < 0.6 * train.xla_flops(replicated)


@needs_libtpu
def test_batch_that_does_not_divide_the_mesh_fails_naming_the_field():
  config = _config()
  config.train.batch_size = 6
  with pytest.raises(ValueError, match=r'config\.train\.batch_size: 6 .* 4 devices'):
    check.run(config, TOPOLOGY, sample=False)


@needs_libtpu
def test_gpu_only_attention_fails_naming_the_field():
  config = _config()
  config.model.attention_impl = 'cudnn'
  with pytest.raises(ValueError, match=r'config\.model\.attention_impl: .*tpu'):
    check.run(config, TOPOLOGY, sample=False)


@needs_libtpu
def test_multi_slice_mesh_puts_the_data_axis_across_slices():
  from idm_jax.runtime import parallel

  devices = chips.topology_devices(TOPOLOGY, num_slices=2)
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
  r = subprocess.run(
    [
      sys.executable,
      '-m',
      'idm_jax.aot',
      '--config=configs/test.py',
      f'--topology={TOPOLOGY}',
      '--nosample',
      '--config.train.batch_size=6',
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert r.returncode == 2, r.stderr[-2000:]
  assert 'config.train.batch_size: 6 is not divisible' in r.stderr
  assert 'Traceback' not in r.stderr


@needs_libtpu
@pytest.mark.parametrize(
  'name, count', [('v5e:1x1', 1), ('v6e:1x1', 1), ('v4-32', 16), ('v5litepod-16', 16)]
)
def test_topology_devices_one_device_per_chip(name, count):
  """Colab's single-chip runtimes, and v4 as Cloud TPU VMs run it (megacore: one device a
  chip, where libtpu's default is one a TensorCore)."""
  devices = chips.topology_devices(name)
  assert len(devices) == count and devices[0].device_kind in chips.CHIPS


def _one_host(mesh):
  first = mesh.devices.flat[0].process_index
  return [d for d in mesh.devices.flat if d.process_index == first]


@needs_libtpu
def test_restorer_spans_every_host_of_a_pod_without_communicating():
  """v5e-16 is 4 hosts of 4 chips: each host's 3 examples are padded to its 4 chips and the
  hosts' blocks make one batch of 16 over the slice. Examples are independent and the params
  replicated, so the program has no collective: the hosts only have to launch it together."""
  from idm_jax.runtime import parallel

  config = _config(data=-1, fsdp=1)
  mesh = parallel.make_mesh(config.mesh, chips.topology_devices('v5e:4x4'))
  restorer = programs.compile_restorer(
    config, list(mesh.devices.flat), configlib.sample_settings(config.sample), 3, 'restorer'
  )
  assert not restorer.error and restorer.batch == 16
  assert restorer.collectives == {}


@needs_libtpu
def test_restorer_runs_on_a_large_v5e_slice_which_one_host_cannot():
  """v5e beyond 16 chips routes over limited ICI: XLA compiles a program over one chip or the
  whole slice, not one host's 4 chips. The Restorer's program spans the slice, so it compiles;
  a one-host program is reported as unable to run (exit status 2), not as a traceback."""
  from idm_jax.runtime import parallel

  config = _config(data=-1, fsdp=1)
  mesh = parallel.make_mesh(config.mesh, chips.topology_devices('v5e:8x8'))
  settings = configlib.sample_settings(config.sample)
  whole = programs.compile_restorer(config, list(mesh.devices.flat), settings, 4, 'restorer')
  assert not whole.error and whole.batch == 64
  chip = chips.chip_of(mesh.devices.flat)
  assert check.verdict([whole], chip)[1] == 0
  host = programs.compile_restorer(config, _one_host(mesh), settings, 4, 'one host')
  assert host.cannot_run and 'subset' in host.error
  line, status = check.verdict([host], chip)
  assert status == 2 and line.startswith('does not run: one host')
