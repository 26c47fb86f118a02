"""The `python` of the fake slice's virtualenv (tests/fake_gcloud.py): a trainer in miniature.

python -m idm_jax.main --config=... --workdir=gs://B/P [...]
    Appends its argv to FAKE_BUCKET/argv.jsonl, resumes from the step saved in
    FAKE_BUCKET/B/P/step, takes a step every FAKE_TRAIN_STEP_SECONDS (default 0.2) up to
    FAKE_TRAIN_STEPS (default 3), saves the last one and exits 0; on SIGTERM or SIGHUP saves the
    current step, logs the driver's stop line and exits 0, as idm_jax.training.train does. Only worker 0
    (IDM_JAX_WORKER) writes the step.
    FAKE_TRAIN_RC=N: fails at once with exit status N.
python -c CODE up|down LOG WORKDIR WORKER
    The runner's log copy: LOG to FAKE_BUCKET/B/P/logs/worker-WORKER.log (up), or back (down)
    if it is there.
"""

import json
import os
import pathlib
import shutil
import signal
import sys
import time

BUCKET = pathlib.Path(os.environ['FAKE_BUCKET'])


def in_bucket(url: str) -> pathlib.Path:
  assert url.startswith('gs://'), url
  return BUCKET / url[len('gs://') :]


def main():
  argv = sys.argv[1:]
  if argv[0] == '-c':
    way, log, workdir, worker = argv[2:6]
    remote = in_bucket(workdir) / 'logs' / f'worker-{worker}.log'
    if way == 'up':
      remote.parent.mkdir(parents=True, exist_ok=True)
      shutil.copy(log, remote)
    elif remote.exists():
      shutil.copy(remote, log)
    return 0
  assert argv[:2] == ['-m', 'idm_jax.main'], argv
  with open(BUCKET / 'argv.jsonl', 'a') as f:
    f.write(
      json.dumps({'argv': argv, 'cwd': os.getcwd(), 'worker': os.environ.get('IDM_JAX_WORKER')})
      + '\n'
    )
  print('training output', flush=True)
  if os.environ.get('FAKE_TRAIN_RC'):
    return int(os.environ['FAKE_TRAIN_RC'])
  workdir = next(a.split('=', 1)[1] for a in argv if a.startswith('--workdir='))
  saved = in_bucket(workdir) / 'step'
  saved.parent.mkdir(parents=True, exist_ok=True)
  step = int(saved.read_text()) if saved.exists() else 0
  if step:
    print(f'resuming from step {step}', flush=True)
  # Worker 0 alone records the step: on a real slice the hosts agree on it (JAX's preemption
  # service); here each worker stops on its own signal, perhaps a step apart.
  record = os.environ.get('IDM_JAX_WORKER', '0') == '0'
  stop = []
  for sig in (signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, lambda signum, frame: stop.append(signal.Signals(signum).name))
  # For the fake slice's notices (tests/fake_gcloud.py): this trainer's handlers are in place.
  (pathlib.Path(os.environ['HOME']) / 'fake_trainer_ready').write_text(str(os.getpid()))
  end = int(os.environ.get('FAKE_TRAIN_STEPS', '3'))
  while step < end:
    time.sleep(float(os.environ.get('FAKE_TRAIN_STEP_SECONDS', '0.2')))
    step += 1
    print(f'step {step}', flush=True)
    if stop:
      if record:
        saved.write_text(str(step))
      print(f'stopped at step {step} after {stop[0]}; checkpoint saved', flush=True)
      return 0
  if record:
    saved.write_text(str(step))
  return 0


if __name__ == '__main__':
  sys.exit(main())
