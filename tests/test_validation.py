"""validation.restore_all: the same restorations on one host and split over several."""
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

WORKER = pathlib.Path(__file__).with_name('restore_worker.py')
REPO = WORKER.parent.parent


def _run(out, *extra, wait=True):
  cmd = [sys.executable, str(WORKER), '--out', str(out), *extra]
  env = dict(os.environ, PYTHONPATH=str(REPO))
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env)
  return proc.communicate(timeout=600) + (proc,) if wait else proc


def test_two_processes_restore_what_one_does(tmp_path):
  """7 images over 2 processes (every other image each, then exchanged) == 1 process."""
  _, err, proc = _run(tmp_path / 'one.npy')
  assert proc.returncode == 0, err[-4000:]
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  procs = [_run(tmp_path / 'two.npy', '--process-id', str(i), '--num-processes', '2',
                '--port', str(port), wait=False) for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-4000:]
  one, two = np.load(tmp_path / 'one.npy'), np.load(tmp_path / 'two.npy')
  assert one.shape == two.shape == (7, 32, 32, 3)
  assert len({a.tobytes() for a in one}) == 7  # distinct outputs: a mix-up would show
  np.testing.assert_array_equal(one, two)


def test_niqe_params_default_to_the_shipped_file_and_can_be_overridden(test_config, tmp_path):
  from idm_jax import validation
  from idm_jax.metrics import niqe
  test_config.data.update(source='folder', dir=str(tmp_path / 'faces'))  # no file beside it
  assert validation.niqe_params_path(test_config) == niqe.default_params_path()
  test_config.eval.niqe_params = str(tmp_path / 'mine.npz')
  assert validation.niqe_params_path(test_config) == str(tmp_path / 'mine.npz')
