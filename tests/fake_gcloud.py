"""A stand-in for `gcloud compute tpus tpu-vm` that simulates a slice on this machine.

tests/test_launch.py puts a `gcloud` on PATH that runs this file. Every call appends its argv
(JSON) to $FAKE_GCLOUD_DIR/calls.jsonl. The slice is a folder per worker under
$FAKE_GCLOUD_DIR/slice-<generation>/worker-<i> that serves as that worker's $HOME:
`ssh --command` runs the command there in bash (with IDM_JAX_WORKER=i, the worker number a real
worker reads from its metadata server), so a detached job really runs and outlives the call.

  create       a new generation of FAKE_GCLOUD_WORKERS (default 1) workers, READY; $HOME/idm_jax
               links to FAKE_GCLOUD_REPO and $HOME/idm_venv to FAKE_GCLOUD_VENV when set.
               Fails (ALREADY_EXISTS) if the slice exists.
  describe     prints the state for --format=value(state); fails (NOT_FOUND) without a slice.
               FAKE_GCLOUD_PREEMPT=once|always: the first describe of a slice (once: of the first
               slice only) that finds its job running (a step logged) SIGTERMs every worker's trainer (the
               preemption notice), waits for the runners to end, then answers PREEMPTED.
               FAKE_GCLOUD_MAINTENANCE=once: the same notice once, the slice stays READY.
  delete       kills what still runs on the slice (the runners' sessions) and forgets it.
  ssh          the install command and the preflight are recorded, not run (the preflight
               fails with FAKE_GCLOUD_FAIL_PREFLIGHT=1); anything else runs on each worker.
  scp          NAME:PATH DEST copies from worker 0's home.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

STATE_DIR = pathlib.Path(os.environ['FAKE_GCLOUD_DIR'])
SLICE = STATE_DIR / 'slice.json'


def option(argv, name, default=None):
  for i, a in enumerate(argv):
    if a == name:
      return argv[i + 1]
    if a.startswith(name + '='):
      return a[len(name) + 1 :]
  return default


def load():
  return json.loads(SLICE.read_text()) if SLICE.exists() else None


def existing(verb, argv):
  """The slice, or None after gcloud's NOT_FOUND error for `verb` on stderr."""
  s = load()
  if s is None:
    print(f'ERROR: (gcloud.compute.tpus.tpu-vm.{verb}) NOT_FOUND: {argv[4]}', file=sys.stderr)
  return s


def save(s):
  SLICE.write_text(json.dumps(s))


def workers(s):
  return [pathlib.Path(w) for w in s['workers']]


def alive(pid):
  """Whether PID runs. A zombie does not: where the runners' reaper is slow or absent (PID 1 of
  some CI containers), an ended runner stays a zombie, and waiting for it to end would wait out
  notice_and_wait's timeout on every notice."""
  try:
    os.kill(pid, 0)
  except (ProcessLookupError, PermissionError):
    return False
  try:
    return pathlib.Path(f'/proc/{pid}/stat').read_text().split(') ')[1][0] != 'Z'
  except OSError:
    return False


def read_pid(path):
  try:
    return int(path.read_text().strip())
  except (OSError, ValueError):
    return None


def notice_and_wait(s, timeout=60):
  """SIGTERM to every worker's trainer, as a preemption or maintenance notice; waits for the
  runners (which record the outcome and copy the log) to end."""
  runners = []
  for home in workers(s):
    pid = read_pid(home / 'idm_jax_run' / 'pid')
    if pid and alive(pid):
      os.kill(pid, signal.SIGTERM)
    runner = read_pid(home / 'idm_jax_run' / 'runner_pid')
    if runner:
      runners.append(runner)
  deadline = time.time() + timeout
  while time.time() < deadline and any(alive(p) for p in runners):
    time.sleep(0.2)


def job_running(s):
  """Whether a worker's job runs: the trainer the runner started has its handlers in place (its
  pid in HOME/fake_trainer_ready, tests/fake_trainer.py) and has logged a step. The log alone
  cannot tell: on a recreated slice it starts as the copy of the last slice's, steps and all,
  until the new trainer writes its first line."""
  for home in workers(s):
    state = home / 'idm_jax_run' / 'state'
    log = home / 'idm_jax_train.log'
    pid = read_pid(home / 'idm_jax_run' / 'pid')
    if (
      state.exists()
      and state.read_text().startswith('running')
      and pid is not None
      and alive(pid)
      and read_pid(home / 'fake_trainer_ready') == pid
      and log.exists()
      and re.search(r'^step \d', log.read_text().rsplit('training output', 1)[-1], re.M)
    ):
      return True
  return False


def create(argv):
  if load() is not None:
    print(f'ERROR: (gcloud.compute.tpus.tpu-vm.create) ALREADY_EXISTS: {argv[4]}', file=sys.stderr)
    return 1
  generation = (
    int((STATE_DIR / 'generations').read_text()) + 1 if (STATE_DIR / 'generations').exists() else 1
  )
  (STATE_DIR / 'generations').write_text(str(generation))
  homes = []
  for i in range(int(os.environ.get('FAKE_GCLOUD_WORKERS', '1'))):
    home = STATE_DIR / f'slice-{generation}' / f'worker-{i}'
    home.mkdir(parents=True)
    if os.environ.get('FAKE_GCLOUD_REPO'):
      (home / 'idm_jax').symlink_to(os.environ['FAKE_GCLOUD_REPO'])
    if os.environ.get('FAKE_GCLOUD_VENV'):
      (home / 'idm_venv').symlink_to(os.environ['FAKE_GCLOUD_VENV'])
    homes.append(str(home))
  save(
    {
      'name': argv[4],
      'state': 'READY',
      'generation': generation,
      'workers': homes,
      'noticed': False,
    }
  )
  return 0


def describe(argv):
  s = existing('describe', argv)
  if s is None:
    return 1
  preempt = os.environ.get('FAKE_GCLOUD_PREEMPT', '')
  maintenance = os.environ.get('FAKE_GCLOUD_MAINTENANCE', '')
  if s['state'] == 'READY' and not s['noticed'] and job_running(s):
    if preempt == 'always' or (preempt == 'once' and s['generation'] == 1):
      notice_and_wait(s)
      s.update(state='PREEMPTED', noticed=True)
    elif maintenance == 'once' and s['generation'] == 1:
      notice_and_wait(s)
      s['noticed'] = True
    save(s)
  print(s['state'])
  return 0


def delete(argv):
  s = existing('delete', argv)
  if s is None:
    return 1
  for home in workers(s):  # the VMs go away: so does everything running on them
    runner = read_pid(home / 'idm_jax_run' / 'runner_pid')
    if runner and alive(runner):
      try:
        os.killpg(runner, signal.SIGKILL)  # setsid: the runner leads its own process group
      except ProcessLookupError:
        pass
  SLICE.unlink()
  return 0


def ssh(argv):
  s = load()
  if s is None or s['state'] != 'READY':
    print('ERROR: (gcloud.compute.tpus.tpu-vm.ssh) the TPU is not READY', file=sys.stderr)
    return 255
  command = option(argv, '--command')
  if 'uv venv' in command:
    return 0
  if 'idm_jax.aot' in command:
    return 1 if os.environ.get('FAKE_GCLOUD_FAIL_PREFLIGHT') else 0
  which = option(argv, '--worker', '0')
  homes = workers(s) if which == 'all' else [workers(s)[int(which)]]
  rc = 0
  for home in homes:
    i = int(home.name.split('-')[1])
    env = dict(os.environ, HOME=str(home), IDM_JAX_WORKER=str(i))
    r = subprocess.run(
      ['bash', '-c', command],
      env=env,
      cwd=home,
      stdin=subprocess.DEVNULL,
      capture_output=True,
      timeout=120,
    )
    sys.stdout.buffer.write(r.stdout)
    sys.stderr.buffer.write(r.stderr)
    rc = max(rc, r.returncode)
  return rc


def scp(argv):
  s = load()
  if s is None:
    return 1
  src, dst = argv[4], argv[5]
  path = src.split(':', 1)[1]
  try:
    shutil.copy(workers(s)[0] / path, dst)
  except FileNotFoundError as e:
    print(f'scp: {e}', file=sys.stderr)
    return 1
  return 0


def main():
  argv = sys.argv[1:]
  with open(STATE_DIR / 'calls.jsonl', 'a') as f:
    f.write(json.dumps(argv) + '\n')
  if argv[:1] == ['alpha']:
    argv = argv[1:]
  assert argv[:3] == ['compute', 'tpus', 'tpu-vm'], argv
  verbs = {'create': create, 'describe': describe, 'delete': delete, 'ssh': ssh, 'scp': scp}
  return verbs[argv[3]](argv)


if __name__ == '__main__':
  sys.exit(main())
