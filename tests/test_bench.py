"""The benchmark tools: kernel counting from HLO, and bench.train_step's step decomposition."""

import json
import os
import subprocess
import sys

from conftest import REPO
import jax
import jax.numpy as jnp
import pytest

from bench import cpu_parity
from bench import kernels
from idm_jax.models import platform_ops
from idm_jax.runtime import configlib

ROOT = str(REPO)


def _count(fn, *args):
  return kernels.launch_count(jax.jit(fn).lower(*args).compile().as_text())


def test_one_fused_chain_is_one_kernel():
  x = jnp.ones((256,))
  assert _count(lambda a: jnp.tanh(a * 2.0 + 1.0), x)['kernels'] == 1


def test_per_leaf_update_costs_a_kernel_per_leaf():
  tree = [jnp.ones((i + 3,)) for i in range(40)]
  counts = _count(lambda t: jax.tree.map(lambda a: a * 0.9 + 1.0, t), tree)
  assert counts['kernels'] >= 40, counts
  flat = jnp.ones((sum(i + 3 for i in range(40)),))
  assert _count(lambda a: a * 0.9 + 1.0, flat)['kernels'] == 1


def test_loop_bodies_are_counted():
  x = jnp.ones((8, 8))
  once = _count(lambda a: jnp.sin(a) @ a, x)['kernels']
  loop = _count(lambda a: jax.lax.fori_loop(0, 5, lambda i, v: jnp.sin(v) @ v, a), x)['kernels']
  assert loop >= once  # the body's kernels are counted (once: the count is static)


def test_no_entry_is_an_error():
  with pytest.raises(ValueError, match='ENTRY'):
    kernels.launch_count('HloModule m\n')


def _bench(part):
  out = subprocess.run(
    [
      sys.executable,
      '-m',
      'bench.train_step',
      '--config=' + os.path.join(ROOT, 'configs', 'test.py'),
      '--steps',
      '2',
      '--warmup',
      '1',
      '--part',
      part,
    ],
    capture_output=True,
    text=True,
    timeout=600,
    cwd=ROOT,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads([line for line in out.stdout.splitlines() if line.startswith('{')][-1])


def test_step_splits_into_grads_and_update():
  step, grads, update = _bench('step'), _bench('grads'), _bench('update')
  assert [r['part'] for r in (step, grads, update)] == ['step', 'grads', 'update']
  # All the matmul work is in the gradient half; the update has none.
  assert grads['gflop_per_image_arch'] == step['gflop_per_image_arch'] > 0
  assert update['gflop_per_image_arch'] == 0
  # The halves' kernels add up to about the whole step's (XLA fuses a little across the seam).
  total = grads['kernels'] + update['kernels']
  assert 0.8 * total <= step['kernels'] <= 1.1 * total, (step, grads, update)
  # Times are reported, not compared: under -n 2 a wall-clock order is chance (docs/ has them).
  assert all(r['step_ms'] > 0 for r in (step, grads, update))


def _update_inputs():
  from bench import update_variants as uv

  config = configlib.load(os.path.join(ROOT, 'configs', 'test.py'))
  return (uv,) + tuple(uv.make_inputs(config)) + (config,)


def test_update_variants_compute_the_same_update():
  from jax.flatten_util import ravel_pytree

  from idm_jax.training import optim

  uv, base, grads, tx, config = _update_inputs()
  results = {}
  for variant in uv.VARIANTS:
    state = uv.flatten_state(base, tx) if variant == 'flat' else base
    state = jax.tree.map(jnp.copy, state)
    for _ in range(2):
      state, _ = uv.program(variant, tx, config)(state, grads)
    adam = optim.adam_state(state.opt_state)  # pylint: disable=protected-access
    counts = [
      int(x.count)
      for x in jax.tree.leaves(state.opt_state, is_leaf=optim.has_count)
      if optim.has_count(x)
    ]  # pylint: disable=protected-access
    results[variant] = [ravel_pytree(x)[0] for x in (state.params, state.ema, adam.mu, adam.nu)]
    assert int(state.step) == 2 and counts and set(counts) == {2}, (variant, counts)
  before = ravel_pytree(base.params)[0]
  assert float(jnp.abs(results['optax'][0] - before).max()) > 1e-4  # the update did something
  # Equal up to float32 rounding (the forms order a few operations differently): an error in
  # the arithmetic, e.g. a bias correction one step off, moves params by ~1e-5 here.
  for variant in uv.VARIANTS[1:]:
    for got, want in zip(results[variant], results['optax']):
      scale = float(jnp.abs(want).max())
      assert jnp.allclose(got, want, rtol=1e-5, atol=1e-6 * scale), variant


def _parity(tmp_path, *args):
  out = subprocess.run(
    [
      sys.executable,
      '-m',
      'bench.cpu_parity',
      '--config=' + os.path.join('configs', 'test.py'),
      '--steps',
      '1',
      '--json',
      str(tmp_path / 'parity.jsonl'),
      *args,
    ],
    capture_output=True,
    text=True,
    timeout=600,
    cwd=ROOT,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout, json.loads((tmp_path / 'parity.jsonl').read_text().splitlines()[-1])


def test_cpu_parity_without_the_anchor_says_so_and_times_ours(tmp_path):
  # Only the package is missing: the check must not depend on this machine's PyTorch venv.
  stdout, summary = _parity(
    tmp_path, '--torch_python', sys.executable, '--anchor_path', str(tmp_path / 'nowhere')
  )
  assert 'anchor not found (no guided_diffusion package at' in stdout
  assert summary['jax_step_s'] > 0 and 'ratio' not in summary
  assert summary['anchor'].startswith('not found')
  # The row names the machine it timed: CPU model and the CPUs the process may use.
  assert summary['host_cpu'].endswith(f' {len(os.sched_getaffinity(0))} CPUs')


def test_cpu_parity_runs_the_anchor_with_the_configs_layout_and_reports_the_ratio(tmp_path):
  # A stand-in anchor that echoes the layout it was asked for, with a step time of 2.5 s.
  (tmp_path / 'anchor' / 'guided_diffusion').mkdir(parents=True)
  script = tmp_path / 'fake_anchor.py'
  script.write_text(
    'import json, sys\n'
    'print(json.dumps(dict(torch="fake", res=int(sys.argv[1]), '
    'batch=int(sys.argv[2]), step_s=2.5)))\n'
  )
  stdout, summary = _parity(
    tmp_path,
    '--torch_python',
    sys.executable,
    '--anchor_path',
    str(tmp_path / 'anchor'),
    '--anchor_script',
    str(script),
  )
  config = configlib.load(os.path.join(ROOT, 'configs', 'test.py'))
  torch_line = json.loads([l for l in stdout.splitlines() if '"fake"' in l][0])
  assert (torch_line['res'], torch_line['batch']) == (
    config.data.resolution,
    config.train.batch_size,
  )
  assert summary['torch_step_s'] == 2.5
  assert summary['ratio'] == pytest.approx(2.5 / summary['jax_step_s'], rel=1e-2)
  assert summary['ratio_rounds'] == [pytest.approx(summary['ratio'], abs=2e-3)]
  assert 'ratio_rounds_mean_95' not in summary  # one round: no interval


def test_cpu_parity_interval_is_over_the_rounds_ratios():
  mean, low, high = cpu_parity.mean_interval([0.99, 1.11, 1.04, 1.02, 1.06])
  assert mean == pytest.approx(1.044)
  assert 0.99 <= low < mean < high <= 1.11
  assert cpu_parity.mean_interval([1.0, 1.0, 1.0]) == [1.0, 1.0, 1.0]
  # A wider spread of the same mean gives a wider interval.
  _, low2, high2 = cpu_parity.mean_interval([0.84, 1.26, 1.04, 0.92, 1.16])
  assert high2 - low2 > high - low


def test_step_profile_attributes_kernel_time_to_layers(tmp_path):
  out = subprocess.run(
    [
      sys.executable,
      '-m',
      'bench.step_profile',
      '--config=' + os.path.join('configs', 'test.py'),
      '--json',
      str(tmp_path / 'profile.jsonl'),
    ],
    capture_output=True,
    text=True,
    timeout=600,
    cwd=ROOT,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads((tmp_path / 'profile.jsonl').read_text())
  layers = result['by_layer']
  # The test UNet has convolutions and attention, and the grads part runs both passes of each.
  for kind in ('convolution', 'attention', 'groupnorm'):
    assert layers.get(f'{kind} forward', 0) > 0 and layers.get(f'{kind} backward', 0) > 0, layers
  assert result['kernel_ms'] == pytest.approx(sum(layers.values()), rel=1e-2)


def test_conv_forms_times_every_pass_of_every_form(tmp_path):
  out = subprocess.run(
    [
      sys.executable,
      '-m',
      'bench.conv_forms',
      '--shapes',
      '2,4,8,8',
      '--reps',
      '1',
      '--json',
      str(tmp_path / 'forms.jsonl'),
    ],
    capture_output=True,
    text=True,
    timeout=600,
    cwd=ROOT,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  row = json.loads((tmp_path / 'forms.jsonl').read_text())
  assert row['cpu_conv'] == 'patches'  # a 4x4 map
  for form in ('xla', 'patches'):
    assert set(row[form]) == {'forward', 'input_grad', 'kernel_grad'}
    assert all(v > 0 for v in row[form].values())
  assert row['compiler_options'] == platform_ops.compiler_options('cpu')


def test_step_profile_calls_a_fusion_a_transpose_only_when_it_only_moves_data():
  from bench import step_profile

  text = """
%moves (p: f32[4,8]) -> f32[8,4] {
  %p = f32[4,8]{1,0} parameter(0)
  %t = f32[8,4]{0,1} transpose(%p), dimensions={1,0}
  ROOT %c = f32[8,4]{1,0} copy(%t)
}

%computes (p: f32[4,8], q: f32[8,4]) -> f32[8,4] {
  %p = f32[4,8]{1,0} parameter(0)
  %q = f32[8,4]{1,0} parameter(1)
  %t = f32[8,4]{1,0} transpose(%p), dimensions={1,0}
  ROOT %m = f32[8,4]{1,0} multiply(%t, %q)
}

ENTRY %main (a: f32[4,8], b: f32[8,4]) -> f32[8,4] {
  %a = f32[4,8]{1,0} parameter(0)
  %b = f32[8,4]{1,0} parameter(1)
  %transpose_copy_fusion = f32[8,4]{1,0} fusion(%a), kind=kLoop, calls=%moves
  ROOT %multiply_fusion = f32[8,4]{1,0} fusion(%a, %transpose_copy_fusion), kind=kLoop, calls=%computes
}
"""
  instructions = step_profile.parse_hlo(text)
  kind = lambda name: step_profile.kernel_kind(text, name, instructions)
  assert kind('transpose_copy_fusion') == 'copy/transpose'
  assert kind('multiply_fusion') == 'elementwise'
