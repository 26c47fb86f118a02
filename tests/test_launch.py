"""launch/: the TPU pod script, the SLURM script and the Colab notebook.

Nothing here touches the network or a cloud: gcloud, srun, scontrol and the training interpreter
are replaced by fakes on PATH that record how they were called.
"""
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / 'launch'
TPU_POD = LAUNCH / 'tpu_pod.sh'
SBATCH = LAUNCH / 'gpu_slurm.sbatch'
NOTEBOOK = LAUNCH / 'colab_tpu.ipynb'

# Modules of the package that the launchers may run with python -m.
CLI_MODULES = {'main', 'aot', 'data.prepare', 'data.make_testset', 'restore'}

TRICKY = "--config.data.dir=/tmp/my faces/it's $(touch PWNED)"
BASE_ARGS = ['--name', 'idm-test-pod', '--zone', 'us-central2-b', '--accelerator-type', 'v4-32',
             '--repo', 'https://example.com/idm_jax.git', '--workdir', 'gs://bucket/runs/ffhq',
             '--project', 'my-proj']
OVERRIDES = ['--config.train.batch_size=64', TRICKY]


def _write_exe(path: pathlib.Path, text: str) -> pathlib.Path:
  path.write_text(text)
  path.chmod(0o755)
  return path


@pytest.fixture
def fake_gcloud(tmp_path):
  """A gcloud on PATH that appends its argv (JSON) to calls.jsonl; fails on the train command
  when FAKE_GCLOUD_FAIL_TRAIN=1, on the preflight when FAKE_GCLOUD_FAIL_PREFLIGHT=1."""
  bindir = tmp_path / 'bin'
  bindir.mkdir()
  log = tmp_path / 'calls.jsonl'
  _write_exe(bindir / 'gcloud', textwrap.dedent(f"""\
      #!{sys.executable}
      import json, os, sys
      with open({str(log)!r}, 'a') as f:
        f.write(json.dumps(sys.argv[1:]) + '\\n')
      if os.environ.get('FAKE_GCLOUD_FAIL_TRAIN') and any(
          a.startswith('--command=') and 'idm_jax.main' in a for a in sys.argv):
        sys.exit(7)
      if os.environ.get('FAKE_GCLOUD_FAIL_PREFLIGHT') and any(
          a.startswith('--command=') and 'idm_jax.aot' in a for a in sys.argv):
        sys.exit(1)
      """))
  env = dict(os.environ, PATH=f'{bindir}{os.pathsep}{os.environ["PATH"]}')
  env.pop('FAKE_GCLOUD_FAIL_TRAIN', None)
  env.pop('FAKE_GCLOUD_FAIL_PREFLIGHT', None)
  return env, log


def _run_pod(args, env, cwd):
  return subprocess.run(['bash', str(TPU_POD), *args], env=env, cwd=cwd, capture_output=True,
                        text=True, timeout=30)


def _calls(log):
  if not log.exists():
    return []
  return [json.loads(line) for line in log.read_text().splitlines()]


def _kind(argv):
  """create / install / preflight / train / scp / delete for a gcloud argv (without 'gcloud')."""
  assert argv[:3] == ['compute', 'tpus', 'tpu-vm'], argv
  verb = argv[3]
  if verb == 'ssh':
    command = _option(argv, '--command')
    if 'idm_jax.aot' in command:
      return 'preflight'
    return 'train' if 'idm_jax.main' in command else 'install'
  return verb


def _option(argv, name):
  """Value of `name VALUE` or `name=VALUE` in argv."""
  for i, a in enumerate(argv):
    if a == name:
      return argv[i + 1]
    if a.startswith(name + '='):
      return a[len(name) + 1:]
  raise AssertionError(f'{name} not in {argv}')


def _check_common(argv):
  assert argv[4] == 'idm-test-pod' or argv[4].startswith('idm-test-pod:'), argv
  assert _option(argv, '--zone') == 'us-central2-b'
  assert _option(argv, '--project') == 'my-proj'


# ------------------------------------------------------------------------------------------------
# Syntax.

@pytest.mark.parametrize('script', [TPU_POD, SBATCH], ids=lambda p: p.name)
def test_bash_syntax(script):
  r = subprocess.run(['bash', '-n', str(script)], capture_output=True, text=True, timeout=30)
  assert r.returncode == 0, r.stderr
  assert script.read_text().startswith('#!/usr/bin/env bash\n')


SHELL_SCRIPTS = sorted([*LAUNCH.parent.glob('launch/*.sh'), *LAUNCH.parent.glob('bench/*.sh'),
                        *LAUNCH.parent.glob('experiments/*.sh'),
                        SBATCH, LAUNCH.parent / '.ci' / 'run'])


@pytest.mark.parametrize('script', SHELL_SCRIPTS,
                         ids=lambda p: str(p.relative_to(LAUNCH.parent)))
def test_shellcheck(script):
  if shutil.which('shellcheck') is None:
    pytest.skip('shellcheck not installed')
  r = subprocess.run(['shellcheck', '--shell=bash', '--severity=warning', str(script)],
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------------------------------------
# tpu_pod.sh

def test_tpu_pod_dry_run_prints_steps_in_order_without_calling_gcloud(fake_gcloud, tmp_path):
  env, log = fake_gcloud
  r = _run_pod([*BASE_ARGS, '--spot', '--data-dir', 'gs://bucket/tfds', '--dry-run', '--',
                *OVERRIDES], env, tmp_path)
  assert r.returncode == 0, r.stderr
  assert not log.exists(), 'gcloud was invoked during --dry-run'
  assert not (tmp_path / 'tpu_logs').exists(), '--dry-run created the logs directory'
  assert not (tmp_path / 'PWNED').exists()

  printed = [shlex.split(line[2:]) for line in r.stdout.splitlines() if line.startswith('+ ')]
  gcloud = [argv[1:] for argv in printed if argv[0] == 'gcloud']
  assert [_kind(a) for a in gcloud] == ['create', 'install', 'preflight', 'train', 'scp',
                                        'delete']
  for argv in gcloud:
    _check_common(argv)
  create, install, preflight, train, scp, delete = gcloud

  assert _option(create, '--accelerator-type') == 'v4-32'
  assert _option(create, '--version') == 'tpu-ubuntu2204-base'
  assert '--spot' in create
  for ssh in (install, train):
    assert _option(ssh, '--worker') == 'all'

  install_words = shlex.split(_option(install, '--command'))
  assert 'https://example.com/idm_jax.git' in install_words
  assert 'jax[tpu]' in install_words
  # gs:// workdirs and data need the [gcs] extra
  assert any(w.startswith('$HOME/idm_jax[gcs]') for w in install_words)

  # The remote command, as the workers' shell splits it, carries every override unchanged.
  train_words = shlex.split(_option(train, '--command'))
  i = train_words.index('idm_jax.main')
  assert train_words[i - 1] == '-m'
  args = train_words[i + 1:train_words.index('2>&1')]
  assert args == ['--config=configs/ffhq.py', '--workdir=gs://bucket/runs/ffhq',
                  '--config.data.source=tfds', '--config.data.tfds_data_dir=gs://bucket/tfds',
                  *OVERRIDES]

  # The preflight: worker 0 compiles for the accelerator type with the config's overrides.
  assert _option(preflight, '--worker') == '0'
  words = shlex.split(_option(preflight, '--command'))
  i = words.index('idm_jax.aot')
  assert words[i + 1:words.index('2>&1')] == [
      '--config=configs/ffhq.py', '--topology=v4-32', '--config.data.source=tfds',
      '--config.data.tfds_data_dir=gs://bucket/tfds', *OVERRIDES]

  assert _option(scp, '--worker') == '0'
  assert scp[4] == 'idm-test-pod:idm_jax_train.log'
  assert '--quiet' in delete


def test_tpu_pod_remote_train_command_runs_in_bash_with_exact_args(fake_gcloud, tmp_path):
  """Execute the printed --command in bash with a fake home: the interpreter gets the intended
  argv (no word splitting, no command substitution) and the log lands in ~/idm_jax_train.log."""
  env, _ = fake_gcloud
  r = _run_pod([*BASE_ARGS, '--dry-run', '--', *OVERRIDES], env, tmp_path)
  assert r.returncode == 0, r.stderr
  printed = [shlex.split(line[2:]) for line in r.stdout.splitlines() if line.startswith('+ ')]
  train = next(a[1:] for a in printed if a[0] == 'gcloud' and _kind(a[1:]) == 'train')
  command = _option(train, '--command')

  home = tmp_path / 'home'
  (home / 'idm_jax').mkdir(parents=True)
  (home / 'idm_venv' / 'bin').mkdir(parents=True)
  argv_out = tmp_path / 'argv.json'
  _write_exe(home / 'idm_venv' / 'bin' / 'python', textwrap.dedent(f"""\
      #!{sys.executable}
      import json, os, sys
      json.dump({{'argv': sys.argv[1:], 'cwd': os.getcwd()}}, open({str(argv_out)!r}, 'w'))
      print('training output')
      """))
  r = subprocess.run(['bash', '-c', command], env=dict(env, HOME=str(home)), cwd=tmp_path,
                     capture_output=True, text=True, timeout=30)
  assert r.returncode == 0, r.stderr
  got = json.loads(argv_out.read_text())
  assert got['argv'] == ['-m', 'idm_jax.main', '--config=configs/ffhq.py',
                         '--workdir=gs://bucket/runs/ffhq', *OVERRIDES]
  assert pathlib.Path(got['cwd']).resolve() == (home / 'idm_jax').resolve()
  assert (home / 'idm_jax_train.log').read_text() == 'training output\n'
  assert not list(tmp_path.rglob('PWNED'))


def test_tpu_pod_failed_training_still_copies_logs_and_deletes(fake_gcloud, tmp_path):
  env, log = fake_gcloud
  env = dict(env, FAKE_GCLOUD_FAIL_TRAIN='1')
  r = _run_pod([*BASE_ARGS, '--logs-dir', str(tmp_path / 'logs'), '--', *OVERRIDES], env, tmp_path)
  assert r.returncode == 7, (r.stdout, r.stderr)
  calls = _calls(log)
  assert [_kind(a) for a in calls] == ['create', 'install', 'preflight', 'train', 'scp',
                                       'delete']
  for argv in calls:
    _check_common(argv)
  assert calls[4][5] == f'{tmp_path / "logs"}/'
  assert (tmp_path / 'logs').is_dir()


def test_tpu_pod_keep_leaves_the_slice(fake_gcloud, tmp_path):
  env, log = fake_gcloud
  r = _run_pod([*BASE_ARGS, '--keep', '--logs-dir', str(tmp_path / 'logs')], env, tmp_path)
  assert r.returncode == 0, r.stderr
  assert [_kind(a) for a in _calls(log)] == ['create', 'install', 'preflight', 'train', 'scp']
  assert 'tpu-vm delete idm-test-pod' in r.stderr  # tells the user how to delete it


def test_tpu_pod_failed_preflight_stops_before_training_and_deletes(fake_gcloud, tmp_path):
  env, log = fake_gcloud
  env = dict(env, FAKE_GCLOUD_FAIL_PREFLIGHT='1')
  r = _run_pod([*BASE_ARGS, '--logs-dir', str(tmp_path / 'logs')], env, tmp_path)
  assert r.returncode == 1, (r.stdout, r.stderr)
  assert [_kind(a) for a in _calls(log)] == ['create', 'install', 'preflight', 'delete']
  assert 'preflight failed' in r.stderr and '--skip-preflight' in r.stderr


def test_tpu_pod_skip_preflight(fake_gcloud, tmp_path):
  env, log = fake_gcloud
  env = dict(env, FAKE_GCLOUD_FAIL_PREFLIGHT='1')
  r = _run_pod([*BASE_ARGS, '--skip-preflight', '--logs-dir', str(tmp_path / 'logs')], env,
               tmp_path)
  assert r.returncode == 0, r.stderr
  assert [_kind(a) for a in _calls(log)] == ['create', 'install', 'train', 'scp', 'delete']


def test_tpu_pod_failed_create_does_not_delete(tmp_path):
  bindir = tmp_path / 'bin'
  bindir.mkdir()
  log = tmp_path / 'calls.txt'
  _write_exe(bindir / 'gcloud', f'#!/usr/bin/env bash\necho "$*" >> {shlex.quote(str(log))}\n'
                                'exit 3\n')
  env = dict(os.environ, PATH=f'{bindir}{os.pathsep}{os.environ["PATH"]}')
  r = _run_pod(BASE_ARGS, env, tmp_path)
  assert r.returncode == 3
  lines = log.read_text().splitlines()
  assert len(lines) == 1 and lines[0].startswith('compute tpus tpu-vm create idm-test-pod')


@pytest.mark.parametrize('missing', ['--name', '--zone', '--accelerator-type', '--repo',
                                     '--workdir'])
def test_tpu_pod_missing_required_option(fake_gcloud, tmp_path, missing):
  env, log = fake_gcloud
  i = BASE_ARGS.index(missing)
  args = BASE_ARGS[:i] + BASE_ARGS[i + 2:]
  r = _run_pod([*args, '--dry-run'], env, tmp_path)
  assert r.returncode != 0
  assert 'usage:' in r.stderr and f'{missing} is required' in r.stderr
  assert r.stdout == ''
  assert not log.exists()


@pytest.mark.parametrize('args, message', [
    (['--workdir', '/local/dir'], 'gs://'),
    (['--bogus'], 'unknown option'),
    (['--zone'], '--zone needs a value'),
])
def test_tpu_pod_rejects_bad_arguments(fake_gcloud, tmp_path, args, message):
  env, log = fake_gcloud
  r = _run_pod([*BASE_ARGS, '--dry-run', *args], env, tmp_path)
  assert r.returncode != 0
  assert message in r.stderr and 'usage:' in r.stderr
  assert not log.exists()


def test_tpu_pod_help(tmp_path):
  r = _run_pod(['--help'], dict(os.environ), tmp_path)
  assert r.returncode == 0
  for option in ('--name', '--zone', '--accelerator-type', '--version', '--project', '--repo',
                 '--config', '--workdir', '--data-dir', '--spot', '--keep', '--dry-run',
                 '--skip-preflight'):
    assert option in r.stdout


# ------------------------------------------------------------------------------------------------
# gpu_slurm.sbatch

def test_sbatch_directives_come_before_the_first_command():
  lines = SBATCH.read_text().splitlines()
  first_command = next(i for i, l in enumerate(lines)
                       if i > 0 and l.strip() and not l.startswith('#'))
  directives = {l.split()[1].split('=')[0]: i for i, l in enumerate(lines)
                if l.startswith('#SBATCH ')}
  for d in ('--nodes', '--gpus-per-node', '--ntasks-per-node', '--time', '--job-name'):
    assert d in directives, d
    assert directives[d] < first_command, f'{d} after the first command: sbatch ignores it'
  assert re.search(r'^srun .*\bidm_jax\.main\b', SBATCH.read_text().replace('\\\n', ' '),
                   re.M), 'no srun line running idm_jax.main'


def _run_sbatch(tmp_path, *, ntasks_per_node, nodes=2, visible='0,1,2,3', gpus_on_node='4',
                extra_env=None):
  """Runs the sbatch script as SLURM would, with fake scontrol/srun and a fake interpreter that
  records, per process, its argv and the JAX variables it sees."""
  bindir = tmp_path / 'bin'
  bindir.mkdir(exist_ok=True)
  out = tmp_path / 'procs'
  out.mkdir(exist_ok=True)
  _write_exe(bindir / 'scontrol', textwrap.dedent("""\
      #!/usr/bin/env bash
      [[ $1 == show && $2 == hostnames && $3 == 'gpu[01-02]' ]] || exit 9
      printf 'gpu01\\ngpu02\\n'
      """))
  # srun: drop its options, start SLURM_NTASKS copies of the command with per-task variables.
  _write_exe(bindir / 'srun', textwrap.dedent(f"""\
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
      """))
  python = _write_exe(tmp_path / 'fake_python', textwrap.dedent(f"""\
      #!{sys.executable}
      import json, os, sys
      keys = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID',
              'JAX_LOCAL_DEVICE_IDS')
      rec = {{'argv': sys.argv[1:], 'cwd': os.getcwd(), **{{k: os.environ.get(k) for k in keys}}}}
      with open(os.path.join({str(out)!r}, os.environ['SLURM_PROCID'] + '.json'), 'w') as f:
        json.dump(rec, f)
      """))
  repo = tmp_path / 'repo'
  repo.mkdir(exist_ok=True)
  env = dict(os.environ, PATH=f'{bindir}{os.pathsep}{os.environ["PATH"]}',
             SLURM_JOB_ID='1234', SLURM_JOB_NODELIST='gpu[01-02]', SLURM_JOB_NUM_NODES=str(nodes),
             SLURM_NTASKS=str(nodes * ntasks_per_node), SLURM_NTASKS_PER_NODE=str(ntasks_per_node),
             SLURM_GPUS_ON_NODE=gpus_on_node, SLURM_SUBMIT_DIR=str(repo), VENV='',
             PYTHON=str(python), WORKDIR='/shared/runs/x')
  for k in ('CONFIG', 'COORD_PORT', 'DATA_DIR', 'REPO_DIR', 'CUDA_VISIBLE_DEVICES'):
    env.pop(k, None)
  env.update(extra_env or {})
  r = subprocess.run(['bash', str(SBATCH), '--config.train.batch_size=32', 'two words'],
                     env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stdout + r.stderr
  recs = [json.loads((out / f'{i}.json').read_text()) for i in range(nodes * ntasks_per_node)]
  return recs, repo


def test_sbatch_one_process_per_gpu(tmp_path):
  recs, repo = _run_sbatch(tmp_path, ntasks_per_node=4)
  assert len(recs) == 8
  for rank, rec in enumerate(recs):
    assert rec['argv'] == ['-m', 'idm_jax.main', '--config=configs/ffhq.py',
                           '--workdir=/shared/runs/x', '--config.train.batch_size=32', 'two words']
    assert rec['JAX_COORDINATOR_ADDRESS'] == f'gpu01:{20000 + 1234 % 20000}'
    assert rec['JAX_NUM_PROCESSES'] == '8'
    assert rec['JAX_PROCESS_ID'] == str(rank)
    assert rec['JAX_LOCAL_DEVICE_IDS'] == str(rank % 4)
    assert pathlib.Path(rec['cwd']).resolve() == repo.resolve()


def test_sbatch_one_process_per_node_drives_all_gpus(tmp_path):
  recs, _ = _run_sbatch(tmp_path, ntasks_per_node=1, gpus_on_node='4',
                        extra_env=dict(COORD_PORT='5555', DATA_DIR='/shared/tfds'))
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
  r = subprocess.run(['bash', str(SBATCH)], env=env, cwd=tmp_path, capture_output=True,
                     text=True, timeout=30)
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
  assert re.search(r"samples_\*\.png", text)  # shows the grids the trainer writes
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
        line = line[:len(line) - len(stripped)] + 'pass'
      lines.append(line)
    compile('\n'.join(lines), f'cell {i}', 'exec')
