"""launch/: the TPU pod script, the SLURM script and the Colab notebook.

Nothing here touches the network or a cloud: gcloud, srun, scontrol and the training interpreter
are replaced by fakes on PATH. tests/fake_gcloud.py simulates a slice on this machine (a folder
per worker as its $HOME, `ssh --command` run there in bash), so the pod script's detached jobs
really run; tests/fake_trainer.py stands in for the training interpreter where the trainer's
own behaviour is not the point, and the real trainer (configs/test.py, a bucket on the local GCS
server) runs the exact remote command where it is.
"""

import json
import os
import pathlib
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / 'launch'
TPU_POD = LAUNCH / 'tpu_pod.sh'
SBATCH = LAUNCH / 'gpu_slurm.sbatch'
NOTEBOOK = LAUNCH / 'colab_tpu.ipynb'
FAKE_GCLOUD = pathlib.Path(__file__).with_name('fake_gcloud.py')
FAKE_TRAINER = pathlib.Path(__file__).with_name('fake_trainer.py')
NO_REAPER = pathlib.Path(__file__).with_name('no_reaper.py')

# Modules of the package that the launchers may run with python -m.
CLI_MODULES = {'main', 'aot', 'data.prepare', 'data.make_testset', 'restore'}

TRICKY = "--config.data.dir=/tmp/my faces/it's $(touch PWNED)"
BASE_ARGS = [
  '--name',
  'idm-test-pod',
  '--zone',
  'us-central2-b',
  '--accelerator-type',
  'v4-32',
  '--repo',
  'https://example.com/idm_jax.git',
  '--workdir',
  'gs://bucket/runs/ffhq',
  '--project',
  'my-proj',
]
OVERRIDES = ['--config.train.batch_size=64', TRICKY]
FAST = ['--poll-seconds', '1', '--log-copy-seconds', '1']


def _write_exe(path: pathlib.Path, text: str) -> pathlib.Path:
  path.write_text(text)
  path.chmod(0o755)
  return path


class Pod:
  """The fake slice's folders and the environment that puts the fake gcloud on PATH."""

  def __init__(self, tmp_path):
    self.root = tmp_path
    self.state = tmp_path / 'gcloud_state'  # calls.jsonl, slice.json, slice-N/worker-I
    self.bucket = tmp_path / 'bucket'  # gs://B/P is bucket/B/P (fake_trainer.py)
    self.logs = tmp_path / 'logs'
    bindir = tmp_path / 'bin'
    venv = tmp_path / 'venv'
    repo = tmp_path / 'repo'
    for d in (self.state, self.bucket, bindir, venv / 'bin', repo):
      d.mkdir(parents=True)
    _write_exe(
      bindir / 'gcloud',
      f'#!/usr/bin/env bash\nexec {shlex.quote(sys.executable)} '
      f'{shlex.quote(str(FAKE_GCLOUD))} "$@"\n',
    )
    _write_exe(
      venv / 'bin' / 'python',
      f'#!/usr/bin/env bash\nexec {shlex.quote(sys.executable)} '
      f'{shlex.quote(str(FAKE_TRAINER))} "$@"\n',
    )
    self.env = dict(
      os.environ,
      PATH=f'{bindir}{os.pathsep}{os.environ["PATH"]}',
      FAKE_GCLOUD_DIR=str(self.state),
      FAKE_GCLOUD_REPO=str(repo),
      FAKE_GCLOUD_VENV=str(venv),
      FAKE_BUCKET=str(self.bucket),
    )
    for k in list(self.env):
      if k.startswith(
        (
          'FAKE_GCLOUD_PREEMPT',
          'FAKE_GCLOUD_MAINTENANCE',
          'FAKE_GCLOUD_FAIL',
          'FAKE_TRAIN_',
          'FAKE_GCLOUD_WORKERS',
          'IDM_JAX_WORKER',
        )
      ):
        del self.env[k]

  def run(self, args, timeout=120, reaper=True, **env):
    """The script to its end. reaper=False: under a parent that adopts the runners when their
    ssh ends and never reaps them (tests/no_reaper.py), as PID 1 of some containers."""
    prefix = [] if reaper else [sys.executable, str(NO_REAPER)]
    return subprocess.run(
      [*prefix, 'bash', str(TPU_POD), *args],
      env=dict(self.env, **env),
      cwd=self.root,
      capture_output=True,
      text=True,
      timeout=timeout,
    )

  def start(self, args, **env):
    """The script in the background, its output in files (a laptop's terminal). It starts with
    SIGHUP's default action, as from a terminal, even when the tests themselves run under
    `nohup` (bash cannot trap a signal ignored when it started: the lost-laptop tests' hang-up
    would go unseen). A fresh interpreter sets that up and execs bash: a preexec_fn would run
    Python between fork and exec in this multithreaded process (JAX, TensorStore's gRPC), which
    can deadlock the child before bash starts."""
    out = open(self.root / 'script.out', 'w')
    return subprocess.Popen(
      [sys.executable, '-c', _FROM_A_TERMINAL, 'bash', str(TPU_POD), *args],
      env=dict(self.env, **env),
      cwd=self.root,
      stdout=out,
      stderr=subprocess.STDOUT,
      text=True,
    )

  def script_out(self):
    f = self.root / 'script.out'
    return f.read_text() if f.exists() else '(no script.out)'

  def calls(self):
    log = self.state / 'calls.jsonl'
    return [json.loads(l) for l in log.read_text().splitlines()] if log.exists() else []

  def kinds(self):
    return [_kind(a) for a in self.calls()]

  def trainer_runs(self):
    f = self.bucket / 'argv.jsonl'
    return [json.loads(l) for l in f.read_text().splitlines()] if f.exists() else []

  def saved_step(self, workdir='bucket/runs/ffhq'):
    f = self.bucket / workdir / 'step'
    return int(f.read_text()) if f.exists() else None

  def homes(self):
    return sorted(self.state.glob('slice-*/worker-*'))

  def kill_leftovers(self):
    for pid_file in self.state.glob('slice-*/worker-*/idm_jax_run/runner_pid'):
      _kill_group(pid_file)


# SIGHUP's default action and nothing blocked, then exec argv[1:].
_FROM_A_TERMINAL = (
  'import os, signal, sys; '
  'signal.signal(signal.SIGHUP, signal.SIG_DFL); '
  'signal.pthread_sigmask(signal.SIG_SETMASK, []); '
  'os.execvp(sys.argv[1], sys.argv[1:])'
)


def _kill_group(pid_file):
  try:
    os.killpg(int(pid_file.read_text()), signal.SIGKILL)
  except (OSError, ValueError):
    pass


@pytest.fixture
def pod(tmp_path):
  p = Pod(tmp_path)
  yield p
  p.kill_leftovers()  # a failed test must not leave a detached job behind


def _kind(argv):
  """create / install / preflight / start / status / stop / follow / describe / scp / delete."""
  if argv[:1] == ['alpha']:
    argv = argv[1:]
  assert argv[:3] == ['compute', 'tpus', 'tpu-vm'], argv
  verb = argv[3]
  if verb == 'ssh':
    command = _option(argv, '--command')
    if 'idm_jax.aot' in command:
      return 'preflight'
    if 'uv venv' in command:
      return 'install'
    if 'setsid' in command:
      return 'start'
    if 'kill -TERM' in command:
      return 'stop'
    if 'idm_jax_status' in command:
      return 'status'
    assert 'idm_jax_train.log' in command, command
    return 'follow'
  return verb


def _option(argv, name):
  """Value of `name VALUE` or `name=VALUE` in argv."""
  for i, a in enumerate(argv):
    if a == name:
      return argv[i + 1]
    if a.startswith(name + '='):
      return a[len(name) + 1 :]
  raise AssertionError(f'{name} not in {argv}')


def _check_common(argv):
  if argv[:1] == ['alpha']:
    argv = argv[1:]
  assert argv[4] == 'idm-test-pod' or argv[4].startswith('idm-test-pod:'), argv
  assert _option(argv, '--zone') == 'us-central2-b'
  assert _option(argv, '--project') == 'my-proj'


def _printed(stdout):
  """The gcloud commands a --dry-run printed, as argv lists without 'gcloud'."""
  out = [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith('+ ')]
  return [a[1:] for a in out if a[0] == 'gcloud']


def _dry_run_command(kind, args, env=None):
  r = subprocess.run(
    ['bash', str(TPU_POD), '--dry-run', *args],
    env=env or dict(os.environ),
    capture_output=True,
    text=True,
    timeout=30,
  )
  assert r.returncode == 0, r.stderr
  return next(_option(a, '--command') for a in _printed(r.stdout) if _kind(a) == kind)


def _wait_for(predicate, timeout, what, explain=lambda: ''):
  """explain: what to print when the wait times out (the script's output, its calls so far)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    time.sleep(0.2)
  raise AssertionError(f'timed out after {timeout} s waiting for {what}\n{explain()}')


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  # A zombie (exited, not yet reaped by a parent that is gone) is not alive either.
  try:
    return pathlib.Path(f'/proc/{pid}/stat').read_text().split(') ')[1][0] != 'Z'
  except OSError:
    return False


# ------------------------------------------------------------------------------------------------
# Syntax.


@pytest.mark.parametrize('script', [TPU_POD, SBATCH], ids=lambda p: p.name)
def test_bash_syntax(script):
  r = subprocess.run(['bash', '-n', str(script)], capture_output=True, text=True, timeout=30)
  assert r.returncode == 0, r.stderr
  assert script.read_text().startswith('#!/usr/bin/env bash\n')


SHELL_SCRIPTS = sorted(
  [
    *LAUNCH.parent.glob('launch/*.sh'),
    *LAUNCH.parent.glob('bench/*.sh'),
    *LAUNCH.parent.glob('experiments/*.sh'),
    SBATCH,
    LAUNCH.parent / '.ci' / 'run',
  ]
)


@pytest.mark.parametrize('script', SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(LAUNCH.parent)))
def test_shellcheck(script):
  if shutil.which('shellcheck') is None:
    pytest.skip('shellcheck not installed')
  r = subprocess.run(
    ['shellcheck', '--shell=bash', '--severity=warning', str(script)],
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------------------------------------
# tpu_pod.sh: commands, arguments, defaults (--dry-run and the fake slice)


def test_tpu_pod_dry_run_prints_steps_in_order_without_calling_gcloud(pod):
  r = pod.run(
    [*BASE_ARGS, '--spot', '--data-dir', 'gs://bucket/tfds', '--dry-run', '--', *OVERRIDES]
  )
  assert r.returncode == 0, r.stderr
  assert pod.calls() == []
  printed = _printed(r.stdout)
  assert [_kind(a) for a in printed] == [
    'create',
    'install',
    'preflight',
    'start',
    'describe',
    'follow',
    'status',
    'scp',
    'delete',
  ]
  for argv in printed:
    _check_common(argv)
  create, install, preflight, start, *_, scp, delete = printed
  # v4: the documented runtime, and SIGTERM before host maintenance (alpha track only).
  assert create[0] == 'alpha' and '--autocheckpoint-enabled' in create
  assert _option(create, '--accelerator-type') == 'v4-32'
  assert _option(create, '--version') == 'tpu-ubuntu2204-base'
  assert '--spot' in create
  for ssh in (install, start):
    assert _option(ssh, '--worker') == 'all'

  install_words = shlex.split(_option(install, '--command'))
  assert 'https://example.com/idm_jax.git' in install_words
  assert 'jax[tpu]' in install_words
  # gs:// workdirs and data need the [gcs] extra
  assert any(w.startswith('$HOME/idm_jax[gcs]') for w in install_words)

  # The remote command, as the workers' shell splits it, starts a detached runner whose
  # arguments carry every override unchanged.
  start_words = shlex.split(_option(start, '--command'))
  assert start_words[start_words.index('setsid') + 1] == 'nohup'
  i = start_words.index('idm_jax.main')
  assert start_words[i - 1] == '-m'
  args = start_words[i + 1 : start_words.index('<', i)]
  assert args == [
    '--config=configs/ffhq.py',
    '--workdir=gs://bucket/runs/ffhq',
    '--config.data.source=tfds',
    '--config.data.tfds_data_dir=gs://bucket/tfds',
    *OVERRIDES,
  ]

  # The preflight: worker 0 compiles for the accelerator type with the config's overrides.
  assert _option(preflight, '--worker') == '0'
  words = shlex.split(_option(preflight, '--command'))
  i = words.index('idm_jax.aot')
  assert words[i + 1 : words.index('2>&1')] == [
    '--config=configs/ffhq.py',
    '--topology=v4-32',
    '--config.data.source=tfds',
    '--config.data.tfds_data_dir=gs://bucket/tfds',
    *OVERRIDES,
  ]

  assert _option(scp, '--worker') == '0'
  assert scp[4] == 'idm-test-pod:idm_jax_train.log'
  assert '--quiet' in delete


@pytest.mark.parametrize(
  'accelerator, version, autocheckpoint',
  [
    ('v4-8', 'tpu-ubuntu2204-base', True),
    ('v4-32', 'tpu-ubuntu2204-base', True),
    ('v3-8', 'tpu-ubuntu2204-base', True),
    ('v5litepod-16', 'v2-alpha-tpuv5-lite', True),
    ('v5p-8', 'v2-alpha-tpuv5', False),
    ('v6e-8', 'v2-alpha-tpuv6e', False),
  ],
)
def test_tpu_pod_version_defaults_per_accelerator_type(pod, accelerator, version, autocheckpoint):
  """The runtime Google documents for the generation (cloud.google.com/tpu/docs/runtimes); the
  maintenance SIGTERM (Autocheckpoint) where it exists (v2-v4, v5e)."""
  args = [*BASE_ARGS, '--accelerator-type', accelerator, '--dry-run']
  create = next(a for a in _printed(pod.run(args).stdout) if _kind(a) == 'create')
  assert _option(create, '--version') == version
  assert ('--autocheckpoint-enabled' in create) == autocheckpoint
  assert (create[0] == 'alpha') == autocheckpoint
  # An explicit --version wins; --no-autocheckpoint leaves the GA command.
  create = next(
    a
    for a in _printed(pod.run([*args, '--version', 'my-runtime', '--no-autocheckpoint']).stdout)
    if _kind(a) == 'create'
  )
  assert _option(create, '--version') == 'my-runtime'
  assert create[:3] == ['compute', 'tpus', 'tpu-vm'] and '--autocheckpoint-enabled' not in create


def test_tpu_pod_unknown_accelerator_type_needs_a_version(pod):
  r = pod.run([*BASE_ARGS, '--accelerator-type', 'x9-8', '--dry-run'])
  assert r.returncode == 2
  assert "no default --version for accelerator type 'x9-8'" in r.stderr
  assert (
    pod.run([*BASE_ARGS, '--accelerator-type', 'x9-8', '--version', 'v', '--dry-run']).returncode
    == 0
  )


@pytest.mark.parametrize(
  'missing', ['--name', '--zone', '--accelerator-type', '--repo', '--workdir']
)
def test_tpu_pod_requires_arguments(pod, missing):
  i = BASE_ARGS.index(missing)
  args = BASE_ARGS[:i] + BASE_ARGS[i + 2 :]
  r = pod.run([*args, '--dry-run'])
  assert r.returncode != 0
  assert 'usage:' in r.stderr and f'{missing} is required' in r.stderr
  assert r.stdout == ''
  assert pod.calls() == []


@pytest.mark.parametrize(
  'args, message',
  [
    (['--workdir', '/local/dir'], 'gs://'),
    (['--bogus'], 'unknown option'),
    (['--zone'], '--zone needs a value'),
    (['--max-restarts', 'many'], '--max-restarts must be a whole number'),
  ],
)
def test_tpu_pod_rejects_bad_arguments(pod, args, message):
  r = pod.run([*BASE_ARGS, '--dry-run', *args])
  assert r.returncode != 0
  assert message in r.stderr and 'usage:' in r.stderr
  assert pod.calls() == []


def test_tpu_pod_help():
  r = subprocess.run(['bash', str(TPU_POD), '--help'], capture_output=True, text=True, timeout=30)
  assert r.returncode == 0
  for option in (
    '--name',
    '--zone',
    '--accelerator-type',
    '--version',
    '--project',
    '--repo',
    '--config',
    '--workdir',
    '--data-dir',
    '--spot',
    '--keep',
    '--dry-run',
    '--skip-preflight',
    '--attach',
    '--stop',
    '--max-restarts',
    '--no-autocheckpoint',
  ):
    assert option in r.stdout


def test_tpu_pod_stop_needs_only_the_slice(pod):
  r = pod.run(
    [
      '--stop',
      '--name',
      'idm-test-pod',
      '--zone',
      'us-central2-b',
      '--project',
      'my-proj',
      '--dry-run',
    ]
  )
  assert r.returncode == 0, r.stderr
  printed = _printed(r.stdout)
  assert [_kind(a) for a in printed] == ['stop', 'status', 'scp', 'delete']
  for argv in printed:
    _check_common(argv)
  assert _option(printed[0], '--worker') == 'all'


# ------------------------------------------------------------------------------------------------
# tpu_pod.sh: the detached job on the fake slice


def test_tpu_pod_start_command_detaches_with_exact_args(pod):
  """The printed start command, run in bash in a worker's home: it returns at once while the
  trainer runs on in its own session with exactly the intended argv (no word splitting, no
  command substitution); a SIGTERM to the trainer ends in a saved step, recorded as such, and
  the log lands in the bucket."""
  command = _dry_run_command(
    'start', [*BASE_ARGS, '--log-copy-seconds', '1', '--', *OVERRIDES], pod.env
  )
  home = pod.root / 'home'
  home.mkdir()
  (home / 'idm_jax').symlink_to(pod.root / 'repo')
  (home / 'idm_venv').symlink_to(pod.root / 'venv')
  env = dict(
    pod.env,
    HOME=str(home),
    IDM_JAX_WORKER='0',
    FAKE_TRAIN_STEPS='100000',
    FAKE_TRAIN_STEP_SECONDS='0.05',
  )
  try:
    t0 = time.time()
    r = subprocess.run(
      ['bash', '-c', command], env=env, cwd=pod.root, capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0, r.stderr
    assert 'idm_jax: started on worker 0' in r.stdout
    assert time.time() - t0 < 10  # it only starts the job
    run_dir = home / 'idm_jax_run'
    _wait_for(lambda: (run_dir / 'pid').exists() and pod.trainer_runs(), 30, 'the trainer')
    trainer = int((run_dir / 'pid').read_text())
    runner = int((run_dir / 'runner_pid').read_text())
    assert _alive(trainer) and os.getsid(runner) == runner != os.getsid(0)  # its own session
    got = pod.trainer_runs()[0]
    assert got['argv'] == [
      '-m',
      'idm_jax.main',
      '--config=configs/ffhq.py',
      '--workdir=gs://bucket/runs/ffhq',
      *OVERRIDES,
    ]
    assert pathlib.Path(got['cwd']).resolve() == (pod.root / 'repo').resolve()
    assert not list(pod.root.rglob('PWNED'))
    assert (run_dir / 'state').read_text().split() == ['running', '-', '-']
    # A second start while it runs starts nothing.
    r = subprocess.run(
      ['bash', '-c', command], env=env, cwd=pod.root, capture_output=True, text=True, timeout=30
    )
    assert 'already running' in r.stdout and len(pod.trainer_runs()) == 1

    _wait_for(lambda: 'step 3' in (home / 'idm_jax_train.log').read_text(), 30, 'step 3')
    os.kill(trainer, signal.SIGTERM)
    _wait_for(lambda: not _alive(runner), 30, 'the runner to end')
    step = pod.saved_step()
    assert step and step >= 3
    assert (run_dir / 'state').read_text().split() == ['stopped', '0', str(step)]
    copied = (pod.bucket / 'bucket/runs/ffhq/logs/worker-0.log').read_text()
    assert f'stopped at step {step} after SIGTERM' in copied
    assert copied == (home / 'idm_jax_train.log').read_text()
  finally:
    _kill_group(home / 'idm_jax_run' / 'runner_pid')


def test_tpu_pod_runs_to_the_end_on_every_worker(pod):
  r = pod.run(
    [*BASE_ARGS, *FAST, '--logs-dir', str(pod.logs), '--', *OVERRIDES], FAKE_GCLOUD_WORKERS='2'
  )
  assert r.returncode == 0, r.stdout + r.stderr
  kinds = pod.kinds()
  assert kinds[:4] == ['create', 'install', 'preflight', 'start']
  assert kinds[-2:] == ['scp', 'delete'] and kinds.count('start') == 1
  assert set(kinds[4:-2]) <= {'describe', 'follow', 'status'}
  for argv in pod.calls():
    _check_common(argv)
  assert sorted(r['worker'] for r in pod.trainer_runs()) == ['0', '1']
  assert pod.saved_step() == 3
  for worker in (0, 1):  # every worker's log, in the bucket
    log = (pod.bucket / f'bucket/runs/ffhq/logs/worker-{worker}.log').read_text()
    assert log.startswith('training output\n') and 'step 3' in log
  assert 'step 3' in r.stdout  # followed on the laptop
  assert 'training finished' in r.stderr
  assert (pod.logs / 'idm_jax_train.log').read_text().endswith('step 3\n')


def test_tpu_pod_failed_training_still_copies_logs_and_deletes(pod):
  r = pod.run([*BASE_ARGS, *FAST, '--logs-dir', str(pod.logs), '--', *OVERRIDES], FAKE_TRAIN_RC='7')
  assert r.returncode == 7, (r.stdout, r.stderr)
  kinds = pod.kinds()
  assert kinds[:4] == ['create', 'install', 'preflight', 'start'] and kinds.count('start') == 1
  assert kinds[-2:] == ['scp', 'delete']
  assert pod.calls()[-2][5] == f'{pod.logs}/'
  assert (pod.logs / 'idm_jax_train.log').read_text() == 'training output\n'
  assert 'exit 7' in r.stderr


def test_tpu_pod_keep_leaves_the_slice(pod):
  r = pod.run([*BASE_ARGS, *FAST, '--keep', '--logs-dir', str(pod.logs)])
  assert r.returncode == 0, r.stderr
  kinds = pod.kinds()
  assert kinds[-1] == 'scp' and 'delete' not in kinds
  assert 'tpu-vm delete idm-test-pod' in r.stderr  # tells the user how to delete it


def test_tpu_pod_failed_preflight_stops_before_training_and_deletes(pod):
  r = pod.run([*BASE_ARGS, *FAST, '--logs-dir', str(pod.logs)], FAKE_GCLOUD_FAIL_PREFLIGHT='1')
  assert r.returncode == 1, (r.stdout, r.stderr)
  assert pod.kinds() == ['create', 'install', 'preflight', 'delete']
  assert 'preflight failed' in r.stderr and '--skip-preflight' in r.stderr
  assert pod.trainer_runs() == []


def test_tpu_pod_skip_preflight(pod):
  r = pod.run(
    [*BASE_ARGS, *FAST, '--skip-preflight', '--logs-dir', str(pod.logs)],
    FAKE_GCLOUD_FAIL_PREFLIGHT='1',
  )
  assert r.returncode == 0, r.stderr
  assert pod.kinds()[:3] == ['create', 'install', 'start']
  assert 'preflight' not in pod.kinds()


def test_tpu_pod_failed_create_does_not_delete(tmp_path):
  bindir = tmp_path / 'bin'
  bindir.mkdir()
  log = tmp_path / 'calls.txt'
  _write_exe(
    bindir / 'gcloud', f'#!/usr/bin/env bash\necho "$*" >> {shlex.quote(str(log))}\nexit 3\n'
  )
  env = dict(os.environ, PATH=f'{bindir}{os.pathsep}{os.environ["PATH"]}')
  r = subprocess.run(
    ['bash', str(TPU_POD), *BASE_ARGS],
    env=env,
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=30,
  )
  assert r.returncode == 3
  lines = log.read_text().splitlines()
  assert len(lines) == 1 and lines[0].startswith('alpha compute tpus tpu-vm create idm-test-pod')


# ------------------------------------------------------------------------------------------------
# tpu_pod.sh: preemption, maintenance, a lost laptop, --attach, --stop


def test_tpu_pod_preempted_spot_slice_is_recreated_and_resumed(pod):
  """The fake slice is preempted once while training (its trainers get SIGTERM, save, and the
  slice turns PREEMPTED): the script deletes it, creates a new one, installs, starts the job
  again, which resumes from the bucket's checkpoint and finishes."""
  r = pod.run(
    [*BASE_ARGS, *FAST, '--spot', '--logs-dir', str(pod.logs)],
    FAKE_GCLOUD_PREEMPT='once',
    FAKE_GCLOUD_WORKERS='2',
    # 6 s of training: the notice comes at the first poll (1 s) after the start, and a loaded
    # machine once let a 1.6 s job finish before it (no stop, nothing to resume).
    FAKE_TRAIN_STEPS='30',
  )
  assert r.returncode == 0, r.stdout + r.stderr
  kinds = pod.kinds()
  first = kinds.index('delete')
  assert kinds[:4] == ['create', 'install', 'preflight', 'start']
  assert kinds[first : first + 4] == ['delete', 'create', 'install', 'start']  # no second preflight
  assert kinds.count('create') == 2 and kinds[-1] == 'delete'
  assert 'the slice is PREEMPTED: deleting it' in r.stderr
  assert 'creating the slice again (restart 1 of 5)' in r.stderr
  assert '--spot' in pod.calls()[kinds.index('create', 1)]
  runs = pod.trainer_runs()
  assert len(runs) == 4 and all(r['argv'] == runs[0]['argv'] for r in runs)
  assert pod.saved_step() == 30
  # The log in the bucket holds both slices' output: the stop, then the resume.
  log = (pod.bucket / 'bucket/runs/ffhq/logs/worker-0.log').read_text()
  stopped = int(re.search(r'stopped at step (\d+) after SIGTERM', log).group(1))
  assert f'resuming from step {stopped}' in log.split('after SIGTERM')[1]
  assert 1 <= stopped < 30


# Both with the runners reaped when they end and with them left zombies: a zombie runner once
# looked alive to the script (the job "already running", never "lost") and to the fake slice's
# notice (every preemption waited out its timeout).
REAPERS = pytest.mark.parametrize('reaper', [True, False], ids=['reaped', 'zombies'])


@REAPERS
def test_tpu_pod_restarts_are_bounded(pod, reaper):
  r = pod.run(
    [*BASE_ARGS, *FAST, '--spot', '--max-restarts', '2', '--logs-dir', str(pod.logs)],
    reaper=reaper,
    FAKE_GCLOUD_PREEMPT='always',
    FAKE_TRAIN_STEPS='100000',
    FAKE_TRAIN_STEP_SECONDS='0.05',
  )
  assert r.returncode == 1, r.stdout + r.stderr
  kinds = pod.kinds()
  assert kinds.count('create') == 3 and kinds.count('start') == 3
  assert kinds.count('delete') == 3 and not (pod.state / 'slice.json').exists()
  assert '--max-restarts=2 restarts are used up' in r.stderr
  assert not any(
    _alive(int(p.read_text())) for p in pod.state.glob('slice-*/worker-*/idm_jax_run/runner_pid')
  )


@REAPERS
def test_tpu_pod_stop_nobody_asked_for_restarts_on_the_same_slice(pod, reaper):
  """A SIGTERM on the workers while the slice stays READY (a maintenance notice): the job saved
  and stopped unfinished, so it is started again on the same slice and resumes."""
  r = pod.run(
    [*BASE_ARGS, *FAST, '--logs-dir', str(pod.logs)],
    reaper=reaper,
    FAKE_GCLOUD_MAINTENANCE='once',
    FAKE_TRAIN_STEPS='8',
  )
  assert r.returncode == 0, r.stdout + r.stderr
  kinds = pod.kinds()
  assert kinds.count('create') == 1 and kinds.count('start') == 2
  assert 'the job stopped unfinished; starting it again (restart 1 of 5)' in r.stderr
  assert re.search(r'^idm_jax_status 0 stopped 0 \d+ -$', r.stderr, re.M)  # saved, not asked
  assert pod.saved_step() == 8 and len(pod.trainer_runs()) == 2


def _launch_and_lose_the_laptop(pod, *extra, **env):
  """Starts a launch, waits until it follows the job, then hangs up on it (SIGHUP, a closed
  terminal). Returns the trainer's pid."""
  proc = pod.start([*BASE_ARGS, *FAST, '--logs-dir', str(pod.logs), *extra], **env)
  try:
    _wait_for(
      lambda: 'status' in pod.kinds(),
      60,
      'the script to follow the job',
      lambda: f'calls: {pod.kinds()}\nits output:\n{pod.script_out()}',
    )
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(timeout=30) == 129
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  out = pod.script_out()
  assert 'the job keeps running on TPU idm-test-pod' in out and '--attach' in out
  assert 'delete' not in pod.kinds()
  trainer = int((pod.homes()[0] / 'idm_jax_run' / 'pid').read_text())
  assert _alive(trainer)
  return trainer


def test_tpu_pod_lost_laptop_leaves_the_job_and_attach_follows_it_to_the_end(pod):
  env = dict(FAKE_TRAIN_STEPS='100', FAKE_TRAIN_STEP_SECONDS='0.1')
  trainer = _launch_and_lose_the_laptop(pod, **env)
  n = len(pod.calls())
  r = pod.run([*BASE_ARGS, *FAST, '--logs-dir', str(pod.logs), '--attach'], **env)
  assert r.returncode == 0, r.stdout + r.stderr
  kinds = pod.kinds()[n:]
  assert kinds[0] == 'describe' and 'create' not in kinds and 'start' not in kinds
  assert kinds[-2:] == ['scp', 'delete']
  assert not _alive(trainer) and pod.saved_step() == 100
  assert 'step 100' in r.stdout and len(pod.trainer_runs()) == 1


def test_tpu_pod_stop_saves_a_step_and_deletes_the_slice(pod):
  trainer = _launch_and_lose_the_laptop(
    pod, FAKE_GCLOUD_WORKERS='2', FAKE_TRAIN_STEPS='100000', FAKE_TRAIN_STEP_SECONDS='0.05'
  )
  n = len(pod.calls())
  r = pod.run(
    [
      '--stop',
      '--name',
      'idm-test-pod',
      '--zone',
      'us-central2-b',
      '--project',
      'my-proj',
      '--logs-dir',
      str(pod.logs),
      '--poll-seconds',
      '1',
    ]
  )
  assert r.returncode == 0, r.stdout + r.stderr
  kinds = pod.kinds()[n:]
  assert kinds[0] == 'stop' and kinds[-2:] == ['scp', 'delete']
  step = pod.saved_step()
  assert step and f'step {step} saved' in r.stderr
  assert not _alive(trainer)
  states = [(h / 'idm_jax_run' / 'state').read_text().split() for h in pod.homes()]
  assert states[0] == ['stopped', '0', str(step)]  # worker 0's step is the one saved
  assert [s[:2] for s in states] == [['stopped', '0']] * 2
  assert f'stopped at step {step} after SIGTERM' in (pod.logs / 'idm_jax_train.log').read_text()


def test_tpu_pod_attach_to_a_missing_slice_fails(pod):
  r = pod.run([*BASE_ARGS, *FAST, '--attach'])
  assert r.returncode == 1 and 'no TPU idm-test-pod' in r.stderr


# ------------------------------------------------------------------------------------------------
# The real trainer under the pod's remote command, and behind a lost terminal.

STOPPABLE = [
  '--config.train.num_steps=100000',
  '--config.train.ckpt_every=100000',
  '--config.train.sample_every=100000',
]


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_pod_remote_command_runs_the_trainer_detached_and_a_signal_saves_a_step(
  tmp_path, gcs_bucket, sig
):
  """The exact start command the script sends to every worker, run under bash in a worker's
  home, with the real trainer (configs/test.py) and its workdir in a bucket on the local GCS
  server: the command returns while the trainer runs on; SIGTERM (a preemption or maintenance
  notice, --stop) or SIGHUP (a lost session) ends it with a saved step and exit 0, and the
  runner records that step and copies the log to WORKDIR/logs/worker-0.log."""
  from idm_jax.storage import files
  from idm_jax.training import checkpoints

  workdir = f'{gcs_bucket}/run'
  command = _dry_run_command(
    'start',
    [
      '--name',
      'p',
      '--zone',
      'z',
      '--accelerator-type',
      'v4-8',
      '--repo',
      'r',
      '--workdir',
      workdir,
      '--config',
      'configs/test.py',
      '--log-copy-seconds',
      '5',
      '--',
      *STOPPABLE,
    ],
  )
  home = tmp_path / 'home'
  home.mkdir()
  (home / 'idm_jax').symlink_to(REPO)
  (home / 'idm_venv').symlink_to(sys.prefix)
  assert (home / 'idm_venv' / 'bin' / 'python').exists()
  run_dir = home / 'idm_jax_run'
  log = home / 'idm_jax_train.log'
  env = dict(os.environ, HOME=str(home), IDM_JAX_WORKER='0')
  try:
    r = subprocess.run(
      ['bash', '-c', command], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    _wait_for(
      lambda: log.exists() and re.search(r'step 2: ', log.read_text()), 600, 'two training steps'
    )
    trainer = int((run_dir / 'pid').read_text())
    runner = int((run_dir / 'runner_pid').read_text())
    os.kill(trainer, sig)
    _wait_for(lambda: not _alive(runner), 600, 'the runner to end')
    state = (run_dir / 'state').read_text().split()
    assert state[:2] == ['stopped', '0'], (state, log.read_text()[-3000:])
    step = int(state[2])
    assert step >= 2
    assert checkpoints.Checkpointer(workdir).latest_step() == step
    copied = files.read_text(f'{workdir}/logs/worker-0.log')
    assert f'stopped at step {step} after {sig.name}; checkpoint saved' in copied
  finally:
    _kill_group(run_dir / 'runner_pid')


def test_lost_terminal_does_not_kill_the_trainer_before_its_save(tmp_path):
  """The trainer in the foreground of a session whose pipe dies (a `| tee` or ssh gone): its
  progress bar and log lines meet a broken pipe, then SIGHUP comes. It saves a step and exits
  0 instead of dying of the broken pipe (tqdm raises EPIPE) or of the hang-up."""
  from idm_jax.training import checkpoints

  workdir = tmp_path / 'w'
  proc = subprocess.Popen(
    [
      sys.executable,
      '-m',
      'idm_jax.main',
      '--config=configs/test.py',
      f'--workdir={workdir}',
      *STOPPABLE,
    ],
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    env=dict(os.environ, PYTHONPATH=str(REPO)),
  )
  try:
    seen, deadline = b'', time.time() + 600
    while not re.search(rb'step 2: ', seen) and time.time() < deadline:
      ready, _, _ = select.select([proc.stdout], [], [], 5)
      if ready:
        chunk = os.read(proc.stdout.fileno(), 65536)
        assert chunk, seen[-3000:]  # the trainer ended early
        seen += chunk
    assert re.search(rb'step 2: ', seen), seen[-3000:]
    proc.stdout.close()  # the terminal is gone: every later write meets EPIPE
    time.sleep(3)  # a few steps' bar updates and log lines into the broken pipe
    assert proc.poll() is None, 'the broken pipe ended the trainer'
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(timeout=600) == 0
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  step = checkpoints.Checkpointer(str(workdir)).latest_step()
  assert step is not None and step >= 2


def test_two_hosts_sighup_on_one_stops_both_at_one_saved_step(tmp_path):
  """Two jax.distributed processes (tests/train_worker.py, through tests/quick_worker.py so that
  both reuse the persistent compilation cache), one CPU device each; SIGHUP reaches process 1
  only. It is passed on as SIGTERM to JAX's preemption service, so both stop after the same
  step, save it once and exit 0, as with a preemption notice."""
  import socket

  from idm_jax.training import checkpoints

  workdir = tmp_path / 'w'
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  ov = {'train.num_steps': 100000, 'train.ckpt_every': 100000, 'train.sample_every': 100000}
  procs, outs = [], []
  try:
    for i in range(2):
      out = open(tmp_path / f'out{i}', 'w+')
      err = open(tmp_path / f'err{i}', 'w+')
      outs.append((out, err))
      procs.append(
        subprocess.Popen(
          [
            sys.executable,
            str(REPO / 'tests' / 'quick_worker.py'),
            str(REPO / 'tests' / 'train_worker.py'),
            '--workdir',
            str(workdir),
            '--steps',
            '100000',
            '--devices',
            '1',
            '--overrides',
            json.dumps(ov),
            '--process-id',
            str(i),
            '--num-processes',
            '2',
            '--port',
            str(port),
          ],
          stdout=out,
          stderr=err,
          env=dict(os.environ, PYTHONPATH=str(REPO)),
        )
      )
    metrics = workdir / 'metrics.jsonl'
    _wait_for(
      lambda: (
        (metrics.exists() and len(metrics.read_text().splitlines()) >= 2)
        or any(p.poll() is not None for p in procs)
      ),
      900,
      'two logged steps',
    )
    assert all(p.poll() is None for p in procs), (tmp_path / 'err0').read_text()[-3000:]
    procs[1].send_signal(signal.SIGHUP)
    for p in procs:
      p.wait(timeout=600)
    errs = [(tmp_path / f'err{i}').read_text() for i in range(2)]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    stopped = json.loads((tmp_path / 'out0').read_text().strip().splitlines()[-1])['step']
    assert 2 <= stopped < 100000
    assert 'SIGHUP received: passed on as SIGTERM' in errs[1]
    for err in errs:  # both name the step they agreed on
      assert f'all hosts stop at step {stopped}' in err
    assert checkpoints.Checkpointer(str(workdir)).latest_step() == stopped
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    for f in (f for pair in outs for f in pair):
      f.close()


# ------------------------------------------------------------------------------------------------
# gpu_slurm.sbatch


def test_sbatch_directives_come_before_the_first_command():
  lines = SBATCH.read_text().splitlines()
  first_command = next(
    i for i, l in enumerate(lines) if i > 0 and l.strip() and not l.startswith('#')
  )
  directives = {
    l.split()[1].split('=')[0]: i for i, l in enumerate(lines) if l.startswith('#SBATCH ')
  }
  for d in ('--nodes', '--gpus-per-node', '--ntasks-per-node', '--time', '--job-name'):
    assert d in directives, d
    assert directives[d] < first_command, f'{d} after the first command: sbatch ignores it'
  assert re.search(r'^srun .*\bidm_jax\.main\b', SBATCH.read_text().replace('\\\n', ' '), re.M), (
    'no srun line running idm_jax.main'
  )


def _run_sbatch(
  tmp_path, *, ntasks_per_node, nodes=2, visible='0,1,2,3', gpus_on_node='4', extra_env=None
):
  """Runs the sbatch script as SLURM would, with fake scontrol/srun and a fake interpreter that
  records, per process, its argv and the JAX variables it sees."""
  bindir = tmp_path / 'bin'
  bindir.mkdir(exist_ok=True)
  out = tmp_path / 'procs'
  out.mkdir(exist_ok=True)
  _write_exe(
    bindir / 'scontrol',
    textwrap.dedent("""\
      #!/usr/bin/env bash
      [[ $1 == show && $2 == hostnames && $3 == 'gpu[01-02]' ]] || exit 9
      printf 'gpu01\\ngpu02\\n'
      """),
  )
  # srun: drop its options, start SLURM_NTASKS copies of the command with per-task variables.
  _write_exe(
    bindir / 'srun',
    textwrap.dedent(f"""\
      #!{sys.executable}
      import os, subprocess, sys
      args = sys.argv[1:]
      while args and args[0].startswith('--'):
        args.pop(0)
      n = int(os.environ['SLURM_NTASKS'])
      per_node = int(os.environ['SLURM_NTASKS_PER_NODE'])
      for rank in range(n):
        env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank % per_node),
                   SLURM_STEP_NODELIST=os.environ['SLURM_JOB_NODELIST'])
        if {visible!r}:
          env['CUDA_VISIBLE_DEVICES'] = {visible!r}
        subprocess.run(args, env=env, check=True)
      """),
  )
  python = _write_exe(
    tmp_path / 'fake_python',
    textwrap.dedent(f"""\
      #!{sys.executable}
      import json, os, sys
      keys = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID',
              'JAX_LOCAL_DEVICE_IDS')
      rec = {{'argv': sys.argv[1:], 'cwd': os.getcwd(), **{{k: os.environ.get(k) for k in keys}}}}
      with open(os.path.join({str(out)!r}, os.environ['SLURM_PROCID'] + '.json'), 'w') as f:
        json.dump(rec, f)
      """),
  )
  repo = tmp_path / 'repo'
  repo.mkdir(exist_ok=True)
  env = dict(
    os.environ,
    PATH=f'{bindir}{os.pathsep}{os.environ["PATH"]}',
    SLURM_JOB_ID='1234',
    SLURM_JOB_NODELIST='gpu[01-02]',
    SLURM_JOB_NUM_NODES=str(nodes),
    SLURM_NTASKS=str(nodes * ntasks_per_node),
    SLURM_NTASKS_PER_NODE=str(ntasks_per_node),
    SLURM_GPUS_ON_NODE=gpus_on_node,
    SLURM_SUBMIT_DIR=str(repo),
    VENV='',
    PYTHON=str(python),
    WORKDIR='/shared/runs/x',
  )
  for k in ('CONFIG', 'COORD_PORT', 'DATA_DIR', 'REPO_DIR', 'CUDA_VISIBLE_DEVICES'):
    env.pop(k, None)
  env.update(extra_env or {})
  r = subprocess.run(
    ['bash', str(SBATCH), '--config.train.batch_size=32', 'two words'],
    env=env,
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert r.returncode == 0, r.stdout + r.stderr
  recs = [json.loads((out / f'{i}.json').read_text()) for i in range(nodes * ntasks_per_node)]
  return recs, repo


def test_sbatch_one_process_per_gpu(tmp_path):
  recs, repo = _run_sbatch(tmp_path, ntasks_per_node=4)
  assert len(recs) == 8
  for rank, rec in enumerate(recs):
    assert rec['argv'] == [
      '-m',
      'idm_jax.main',
      '--config=configs/ffhq.py',
      '--workdir=/shared/runs/x',
      '--config.train.batch_size=32',
      'two words',
    ]
    assert rec['JAX_COORDINATOR_ADDRESS'] == f'gpu01:{20000 + 1234 % 20000}'
    assert rec['JAX_NUM_PROCESSES'] == '8'
    assert rec['JAX_PROCESS_ID'] == str(rank)
    assert rec['JAX_LOCAL_DEVICE_IDS'] == str(rank % 4)
    assert pathlib.Path(rec['cwd']).resolve() == repo.resolve()


def test_sbatch_one_process_per_node_drives_all_gpus(tmp_path):
  recs, _ = _run_sbatch(
    tmp_path,
    ntasks_per_node=1,
    gpus_on_node='4',
    extra_env=dict(COORD_PORT='5555', DATA_DIR='/shared/tfds'),
  )
  assert [r['JAX_PROCESS_ID'] for r in recs] == ['0', '1']
  for rec in recs:
    assert rec['JAX_LOCAL_DEVICE_IDS'] == '0,1,2,3'
    assert rec['JAX_NUM_PROCESSES'] == '2'
    assert rec['JAX_COORDINATOR_ADDRESS'] == 'gpu01:5555'
    assert '--config.data.source=tfds' in rec['argv']
    assert '--config.data.tfds_data_dir=/shared/tfds' in rec['argv']


def test_sbatch_gpu_bound_per_task_uses_device_zero(tmp_path):
  recs, _ = _run_sbatch(tmp_path, ntasks_per_node=2, visible='1')
  assert [r['JAX_LOCAL_DEVICE_IDS'] for r in recs] == ['0'] * 4


def test_sbatch_refuses_to_run_outside_slurm(tmp_path):
  env = {k: v for k, v in os.environ.items() if not k.startswith('SLURM_')}
  r = subprocess.run(
    ['bash', str(SBATCH)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30
  )
  assert r.returncode != 0 and 'sbatch' in r.stderr


# ------------------------------------------------------------------------------------------------
# colab_tpu.ipynb


@pytest.fixture(scope='module')
def notebook():
  return json.loads(NOTEBOOK.read_text())


def _source(cell):
  src = cell['source']
  return ''.join(src) if isinstance(src, list) else src


def test_notebook_is_nbformat4(notebook):
  assert notebook['nbformat'] == 4
  assert isinstance(notebook['nbformat_minor'], int)
  assert isinstance(notebook['metadata'], dict)
  assert notebook['metadata']['kernelspec']['language'] == 'python'
  cells = notebook['cells']
  assert cells and isinstance(cells, list)
  for cell in cells:
    assert cell['cell_type'] in ('markdown', 'code', 'raw')
    assert isinstance(cell['metadata'], dict)
    src = cell['source']
    assert isinstance(src, str) or all(isinstance(s, str) for s in src)
    if cell['cell_type'] == 'code':
      assert cell['outputs'] == []
      assert cell['execution_count'] is None
  if notebook['nbformat_minor'] >= 5:  # nbformat 4.5: every cell has a unique id
    ids = [c['id'] for c in cells]
    assert len(set(ids)) == len(ids)
  kinds = [c['cell_type'] for c in cells]
  assert kinds.count('markdown') >= 5 and kinds.count('code') >= 5
  # Every code cell is explained by a markdown cell somewhere before it.
  assert kinds[0] == 'markdown'


def test_notebook_cli_modules_exist(notebook):
  used = []
  for cell in notebook['cells']:
    if cell['cell_type'] != 'code':
      continue
    for module in re.findall(r'-m\s+idm_jax\.([\w.]+)', _source(cell)):
      assert module in CLI_MODULES, f'python -m idm_jax.{module}: no such CLI module'
      path = REPO / 'idm_jax' / (module.replace('.', '/') + '.py')
      assert path.parent.is_dir(), path
      used.append(module)
  # installs, prepares, checks the topology, trains, makes a test set, restores
  assert set(used) == CLI_MODULES


def test_notebook_steps(notebook):
  code = [_source(c) for c in notebook['cells'] if c['cell_type'] == 'code']
  text = '\n'.join(code)
  assert re.search(r'git clone', text) and re.search(r'pip install .*-e "\.\[tpu,gcs\]"', text)
  assert 'configs/demo.py' in text
  i = next(i for i, c in enumerate(code) if '-m idm_jax.main' in c)
  train = code[i]
  # The topology check comes first and compiles the same config with the same flags.
  check = next(j for j, c in enumerate(code) if '-m idm_jax.aot' in c)
  assert check < i
  flags = re.search(r'--config=(\S+) .*--workdir=\S+ (.*)', train).groups()
  aot_line = next(l for l in code[check].splitlines() if '-m idm_jax.aot' in l)
  assert f'--config={flags[0]}' in aot_line and aot_line.rstrip().endswith(flags[1].rstrip())
  assert '--topology={TOPOLOGY}' in aot_line
  assert 'num_steps' in code[check] and '{TRAIN_FLAGS}' in train
  assert re.search(r'samples_\*\.png', text)  # shows the grids the trainer writes
  restore = next(c for c in code if '-m idm_jax.restore' in c)
  assert '--aligned' in restore and '--checkpoint {WORKDIR}' in restore
  testset = next(c for c in code if '-m idm_jax.data.make_testset' in c)
  assert '--seed 0' in testset and '--dst' in testset
  assert "'cmp'" in text and 'display(' in text
  # The kernel must not grab the TPU that the training subprocess needs.
  for src in code:
    for line in src.splitlines():
      assert not re.match(r'\s*(import jax|from jax)\b', line), line


def test_notebook_code_cells_are_valid_python(notebook):
  """IPython shell (!) and magic (%) lines aside, every code cell compiles."""
  for i, cell in enumerate(notebook['cells']):
    if cell['cell_type'] != 'code':
      continue
    lines = []
    for line in _source(cell).splitlines():
      stripped = line.lstrip()
      if stripped.startswith(('!', '%')):
        line = line[: len(line) - len(stripped)] + 'pass'
      lines.append(line)
    compile('\n'.join(lines), f'cell {i}', 'exec')
