"""The training driver: sharding invariance, multi-host, exact resume, preemption, NaN safety."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from idm_jax.training import checkpoints
from idm_jax.training import optim
from idm_jax.training import train

WORKER = pathlib.Path(__file__).with_name('train_worker.py')
REPO = WORKER.parents[1]


def run_worker(
  workdir, steps, *, devices=1, overrides=None, params_out='', extra=(), timeout=600, wait=True
):
  cmd = [
    sys.executable,
    str(WORKER),
    '--workdir',
    str(workdir),
    '--steps',
    str(steps),
    '--devices',
    str(devices),
    '--overrides',
    json.dumps(overrides or {}),
  ]
  if params_out:
    cmd += ['--params-out', str(params_out)]
  cmd += list(extra)
  env = dict(os.environ, PYTHONPATH=str(REPO))
  if not wait:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
  assert out.returncode == 0, out.stderr[-4000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def load_params(path):
  with np.load(path) as f:
    return [f[k] for k in sorted(f.files, key=lambda k: int(k.split('_')[1]))]


def free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


# Eight examples per step so the batch splits over 8 devices; no checkpoint until the end.
BASE = {'train.batch_size': 8, 'train.ckpt_every': 100, 'train.sample_every': 100}


def assert_losses_close(a, b, rtol):
  steps_a, la = zip(*a)
  steps_b, lb = zip(*b)
  assert steps_a == steps_b
  np.testing.assert_allclose(la, lb, rtol=rtol)


def test_sharded_8_devices_matches_1_device(tmp_path):
  """Data-parallel + FSDP on 8 simulated devices computes the same losses and params as 1.

  Random draws are sharding-invariant (threefry partitionable), so the only differences are
  reduction orders of float32 sums: relative 1e-5 on losses, 1e-4 on params after 3 Adam steps
  (Adam divides by sqrt(nu), which amplifies rounding on near-zero gradients).
  """
  one = run_worker(tmp_path / 'one', 3, devices=1, overrides=BASE, params_out=tmp_path / 'p1.npz')
  eight = run_worker(
    tmp_path / 'eight',
    3,
    devices=8,
    overrides={**BASE, 'mesh.data': 4, 'mesh.fsdp': 2, 'mesh.fsdp_min_size': 64},
    params_out=tmp_path / 'p8.npz',
  )
  assert len(one['losses']) == 3
  assert_losses_close(one['losses'], eight['losses'], rtol=1e-5)
  for a, b in zip(load_params(tmp_path / 'p1.npz'), load_params(tmp_path / 'p8.npz')):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_two_processes_match_one_process(tmp_path):
  """Two local processes (4 CPU devices each, gloo collectives) == one process with 8 devices.

  Process 1 compiles the step 35 s late, like a slow or busy host: gloo abandons setting up
  the first collective after 30 s, so this passes only because the trainer waits at a barrier
  between compiling and running the step."""
  port = free_port()
  procs = [
    run_worker(
      tmp_path / 'multi',
      3,
      devices=4,
      overrides=BASE,
      wait=False,
      params_out=tmp_path / 'multi.npz' if i == 0 else '',
      extra=[
        '--process-id',
        str(i),
        '--num-processes',
        '2',
        '--port',
        str(port),
        '--compile-delay',
        str(35 * i),
      ],
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-4000:]
  multi = json.loads(outs[0][0].strip().splitlines()[-1])
  single = run_worker(
    tmp_path / 'single', 3, devices=8, overrides=BASE, params_out=tmp_path / 'single.npz'
  )
  assert_losses_close(single['losses'], multi['losses'], rtol=1e-5)
  # The parameters both hosts trained (gathered from both processes' shards), not only the loss.
  for a, b in zip(load_params(tmp_path / 'single.npz'), load_params(tmp_path / 'multi.npz')):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_resume_is_exact_and_half_written_checkpoint_is_ignored(tmp_path):
  """4 steps in one run == 2 steps, stop, (a killed save left behind), resume, 2 more steps."""
  ov = {'train.ckpt_every': 2, 'train.sample_every': 100}
  whole = run_worker(tmp_path / 'whole', 4, overrides=ov, params_out=tmp_path / 'whole.npz')
  first = run_worker(tmp_path / 'split', 2, overrides=ov)
  assert first['step'] == 2
  # A save killed part-way leaves orbax's temporary folder; it must not count as a checkpoint.
  junk = tmp_path / 'split' / 'checkpoints' / '3.orbax-checkpoint-tmp-1234567'
  (junk / 'train').mkdir(parents=True)
  (junk / 'train' / 'garbage').write_bytes(b'\0' * 10)
  assert checkpoints.Checkpointer(str(tmp_path / 'split')).latest_step() == 2
  second = run_worker(tmp_path / 'split', 2, overrides=ov, params_out=tmp_path / 'split.npz')
  assert second['step'] == 4
  for a, b in zip(load_params(tmp_path / 'whole.npz'), load_params(tmp_path / 'split.npz')):
    np.testing.assert_array_equal(a, b)  # bit-identical on the CPU
  assert whole['losses'][-2:] == second['losses'][-2:]


def test_checkpoint_from_8_devices_restores_on_1(tmp_path):
  """2 steps sharded over 8 devices, then 1 more on 1 device == 3 steps on 1 device: the
  restored parameters and optimiser state are the ones saved, whatever the mesh (tolerances as
  in the sharding test: reduction order only)."""
  ov = {**BASE, 'train.ckpt_every': 2}
  run_worker(
    tmp_path / 'w',
    2,
    devices=8,
    overrides={**ov, 'mesh.data': 4, 'mesh.fsdp': 2, 'mesh.fsdp_min_size': 64},
  )
  out = run_worker(tmp_path / 'w', 1, devices=1, overrides=ov, params_out=tmp_path / 'r.npz')
  assert out['step'] == 3
  run_worker(tmp_path / 'one', 3, devices=1, overrides=ov, params_out=tmp_path / 'one.npz')
  for a, b in zip(load_params(tmp_path / 'one.npz'), load_params(tmp_path / 'r.npz')):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  workdir = tmp_path / 'w'
  proc = run_worker(
    workdir,
    10_000,
    overrides={'train.ckpt_every': 10_000, 'train.sample_every': 10_000, 'train.num_steps': 10_000},
    wait=False,
  )
  metrics = workdir / 'metrics.jsonl'
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
      break
    time.sleep(0.5)
  assert proc.poll() is None, proc.communicate()[1][-3000:]
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  stopped = json.loads(out.strip().splitlines()[-1])['step']
  assert 3 <= stopped < 10_000
  assert checkpoints.Checkpointer(str(workdir)).latest_step() == stopped


def test_nonfinite_step_is_skipped_and_named(test_config):
  """A NaN loss leaves the state untouched and check_finite names the step."""
  from idm_jax.runtime import parallel

  mesh = parallel.make_mesh(test_config.mesh)
  trainer = train.Trainer(test_config, mesh)
  state = trainer.init(jax.random.PRNGKey(0))
  r = test_config.data.resolution
  batch = {'hq': jnp.zeros((4, r, r, 3), jnp.uint8), 'lq': jnp.zeros((4, r, r, 3), jnp.uint8)}
  state, _ = trainer.step(state, batch)
  train.check_finite(state)
  poisoned = state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))
  after, metrics = trainer.step(poisoned, batch)
  assert not np.isfinite(float(metrics['loss']))
  assert int(after.step) == 1 and int(after.bad_step) == 1
  with pytest.raises(FloatingPointError, match='step 1'):
    train.check_finite(after)


def test_nan_run_stops_without_saving(tmp_path, monkeypatch, test_config):
  """The loop raises on a non-finite step and the last good checkpoint stays the latest."""
  test_config.train.update(ckpt_every=2, sample_every=100, num_steps=6)
  train.train_and_evaluate(test_config, str(tmp_path), max_steps=2)
  from idm_jax.diffusion import objectives

  real = objectives.training_loss
  monkeypatch.setattr(objectives, 'training_loss', lambda *a, **k: (real(*a, **k)[0] * jnp.nan, {}))
  with pytest.raises(FloatingPointError, match='step 2'):
    train.train_and_evaluate(test_config, str(tmp_path))
  ckpt = checkpoints.Checkpointer(str(tmp_path))
  assert ckpt.latest_step() == 2
  _, ema, _ = checkpoints.load_for_inference(str(tmp_path))
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(ema))


def test_the_progress_bar_counts_finished_steps(tmp_path, monkeypatch, test_config):
  """Each time the bar moves, every step it counts has finished (its metrics are ready), and it
  ends at the last step: the bar shows progress, not how far dispatch has run ahead."""
  from idm_jax.training import run_log

  test_config.train.update(num_steps=12, log_every=5, ckpt_every=100, sample_every=100)
  dispatched, unfinished_when_counted = [], []
  compile_step = train.Trainer.compile_step

  def recording_compile_step(self, *args, **kwargs):
    step_fn = compile_step(self, *args, **kwargs)

    def step(state, batch):
      state, metrics = step_fn(state, batch)
      dispatched.append(metrics)
      return state, metrics

    return step

  class Bar:
    def __init__(self, start, end, **_):
      self.n, self.total, self.disable, self.format_dict = start, end, True, {}

    def update(self, k):
      self.n += k
      counted = dispatched[: self.n]
      unfinished_when_counted.extend(
        i for i, m in enumerate(counted) if not all(x.is_ready() for x in jax.tree.leaves(m))
      )

    def set_postfix(self, **_):
      pass

    def close(self):
      pass

  monkeypatch.setattr(train.Trainer, 'compile_step', recording_compile_step)
  monkeypatch.setattr(
    run_log, 'progress', lambda start, end, **kw: bars.append(Bar(start, end)) or bars[-1]
  )
  bars = []
  train.train_and_evaluate(test_config, str(tmp_path))
  assert len(dispatched) == 12 and bars[0].n == 12
  assert unfinished_when_counted == []


def test_grad_accumulation_averages_the_strided_micro_batches(test_config):
  """accum=2 applies the mean gradient of micro-batches [0::2] and [1::2] (key fold_in(rng, i))."""
  import functools

  from idm_jax.runtime import configlib

  c = test_config
  c.train.update(batch_size=4, grad_accum_steps=2, grad_clip=0.0)
  r = c.data.resolution
  model = configlib.build_model(c.model, r)
  tx = optim.make_optimizer(c.train)
  logsnr_fn = configlib.logsnr_fn(c.diffusion, r)
  state = train.init_state(jax.random.PRNGKey(0), model, tx)
  rng = np.random.default_rng(0)
  batch = {k: jnp.asarray(rng.integers(0, 256, (4, r, r, 3), dtype=np.uint8)) for k in ('hq', 'lq')}
  after, metrics = jax.jit(
    functools.partial(train.train_step, model=model, config=c, logsnr_fn=logsnr_fn)
  )(state, batch)
  step_rng = jax.random.fold_in(state.rng, state.step)
  losses, grads = zip(
    *[
      jax.value_and_grad(train.loss_fn)(
        state.params,
        model,
        {k: v[i::2] for k, v in batch.items()},
        jax.random.fold_in(step_rng, i),
        c,
        logsnr_fn,
      )
      for i in range(2)
    ]
  )
  mean_grads = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
  updates, _ = tx.update(mean_grads, state.opt_state, state.params)
  want = optax.apply_updates(state.params, updates)
  np.testing.assert_allclose(float(metrics['loss']), np.mean(losses), rtol=1e-5)
  np.testing.assert_allclose(
    float(metrics['grad_norm']), float(optax.tree.norm(mean_grads)), rtol=1e-4
  )
  for got, exp in zip(jax.tree.leaves(after.params), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(exp), rtol=1e-4, atol=1e-6)


def test_time_budget_stops_saves_and_counts_across_resumes(tmp_path):
  """max_seconds: the run stops at the budget with a checkpoint and a grid, exits normally; a
  rerun finds the budget spent and trains nothing; lifting the budget resumes from there."""
  workdir = tmp_path / 'w'
  ov = {
    'train.max_seconds': 1e-3,
    'train.num_steps': 1000,
    'train.ckpt_every': 1000,
    'train.sample_every': 1000,
  }
  first = run_worker(workdir, 1000, overrides=ov)
  assert first['step'] == 1  # the budget is spent by compilation: one step, then stop
  ckpt = checkpoints.Checkpointer(str(workdir))
  assert ckpt.latest_step() == 1 and ckpt.train_seconds(1) > 0
  assert (workdir / 'samples_0000001.png').exists()
  again = run_worker(workdir, 1000, overrides=ov)
  assert again['step'] == 1
  lifted = run_worker(workdir, 2, overrides={**ov, 'train.max_seconds': 0.0})
  assert lifted['step'] == 3
  ckpt = checkpoints.Checkpointer(str(workdir))
  assert ckpt.train_seconds(3) > ckpt.train_seconds(1)


# --- A workdir in a gs:// bucket (the local GCS server), as every host of a pod shares one.


def test_preempted_in_a_bucket_and_rerun_equals_an_uninterrupted_run(tmp_path, gcs_bucket):
  """SIGTERM after step 2 of 4: the run saves step 2 to the bucket and exits 0; the rerun
  resumes from the bucket and ends bit-identical to 4 uninterrupted steps on local disk."""
  from idm_jax.storage import files

  ov = {'train.ckpt_every': 100, 'train.sample_every': 100}
  whole = run_worker(tmp_path / 'whole', 4, overrides=ov, params_out=tmp_path / 'whole.npz')
  workdir = f'{gcs_bucket}/run'
  first = run_worker(workdir, 4, overrides=ov, extra=['--sigterm-at-step', '2'])
  assert first['step'] == 2
  assert files.listdir(f'{workdir}/checkpoints') == ['2']
  second = run_worker(workdir, 4, overrides=ov, params_out=tmp_path / 'split.npz')
  assert second['step'] == 4
  for a, b in zip(load_params(tmp_path / 'whole.npz'), load_params(tmp_path / 'split.npz')):
    np.testing.assert_array_equal(a, b)
  assert whole['losses'] == second['losses']  # one metrics stream across the two runs
  assert not (tmp_path / 'gs:').exists() and not (REPO / 'gs:').exists()


def test_two_hosts_preempted_at_different_steps_save_one_step_to_the_bucket(gcs_bucket):
  """Two processes (jax.distributed) share one gs:// workdir. SIGTERM reaches process 0 during
  step 2 and process 1 during step 3 (if it is still running by then): JAX's preemption service
  makes both stop after the same step, save it once and exit 0; both then resume from it."""
  from idm_jax.storage import files

  workdir = f'{gcs_bucket}/run'
  ov = {**BASE, 'train.num_steps': 1000}

  def two(steps, signals=(0, 0)):
    port = free_port()
    procs = [
      run_worker(
        workdir,
        steps,
        devices=4,
        overrides=ov,
        wait=False,
        extra=['--process-id', str(i), '--num-processes', '2', '--port', str(port)]
        + (['--sigterm-at-step', str(signals[i])] if signals[i] else []),
      )
      for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
      assert p.returncode == 0, err[-4000:]
    return json.loads(outs[0][0].strip().splitlines()[-1]), [err for _, err in outs]

  (out, errs) = two(20, signals=(2, 3))
  stopped = out['step']
  assert 2 <= stopped < 20
  for err in errs:  # each process names the step they agreed on
    assert f'all hosts stop at step {stopped}' in err
  assert files.listdir(f'{workdir}/checkpoints') == [str(stopped)]
  logged = [json.loads(line)['step'] for line in files.iter_lines(f'{workdir}/metrics.jsonl')]
  assert logged == list(range(1, stopped + 1))  # process 0 alone writes the metrics
  assert two(2)[0]['step'] == stopped + 2
