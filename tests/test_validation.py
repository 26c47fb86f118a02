"""Sampling jobs (validation.restore_all, cleaning, generation) on one host and over several."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
from PIL import Image

WORKER = pathlib.Path(__file__).with_name('restore_worker.py')
REPO = WORKER.parent.parent


def _faces(root):
  """Five 32 px faces and one corrupt file: a cleaning batch of the second process has no good
  image, so that process restores a filler batch while the first restores its own."""
  root.mkdir()
  rng = np.random.default_rng(1)
  for i in range(5):
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f'{i}.png')
  (root / '5.png').write_bytes(b'not a png')
  return root


def _run(out, faces, *extra, wait=True):
  out.mkdir(exist_ok=True)
  cmd = [
    sys.executable,
    str(WORKER),
    '--out',
    str(out),
    '--faces',
    str(faces),
    '--devices',
    '2',
    *extra,
  ]
  env = dict(os.environ, PYTHONPATH=str(REPO))
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
  return proc.communicate(timeout=600) + (proc,) if wait else proc


def _pngs(directory):
  return {name: np.asarray(Image.open(directory / name)) for name in sorted(os.listdir(directory))}


def test_two_processes_sample_in_lockstep_what_one_does(tmp_path):
  """Restoring, cleaning and generating over 2 processes x 2 devices (one program over all 4,
  each process feeding its share, the one with fewer batches running fillers) == 1 process."""
  faces = _faces(tmp_path / 'faces')
  _, err, proc = _run(tmp_path / 'one', faces)
  assert proc.returncode == 0, err[-4000:]
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  procs = [
    _run(
      tmp_path / 'two',
      faces,
      '--process-id',
      str(i),
      '--num-processes',
      '2',
      '--port',
      str(port),
      wait=False,
    )
    for i in range(2)
  ]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-4000:]
  one, two, two_1 = (
    json.loads((tmp_path / f).read_text())
    for f in ('one/info-0.json', 'two/info-0.json', 'two/info-1.json')
  )
  assert (one['mesh_size'], one['lockstep'], two['mesh_size'], two['lockstep']) == (
    2,
    False,
    4,
    True,
  )
  assert one['counts'] == two['counts'] == dict(cleaned=5, copied=0, failed=1)
  # Lockstep: both processes launch the same programs in the same order, as many as the busier
  # one needs (CPU runs a collective-free program without the other process; a TPU pod need not).
  assert (
    two['launches']
    == two_1['launches']
    == [
      ['restore_all', 3],
      ['restore_all', 3],
      ['clean', 2],
      ['clean', 2],
      ['clean', 2],
      ['clean', 2],  # 2 chunks x 2 draws
      ['generate', 2],
      ['generate', 2],
    ]
  )
  restored = [np.load(tmp_path / d / 'restored.npy') for d in ('one', 'two')]
  assert restored[0].shape == (7, 32, 32, 3)
  assert len({a.tobytes() for a in restored[0]}) == 7  # distinct outputs: a mix-up would show
  np.testing.assert_array_equal(*restored)
  for job in ('clean/images', 'generated'):
    a, b = _pngs(tmp_path / 'one' / job), _pngs(tmp_path / 'two' / job)
    assert sorted(a) == sorted(b) and len(a) == 5, job
    assert len({x.tobytes() for x in a.values()}) == 5, job
    for name in a:
      np.testing.assert_array_equal(a[name], b[name], err_msg=f'{job}/{name}')


def test_niqe_params_default_to_the_shipped_file_and_can_be_overridden(test_config, tmp_path):
  from idm_jax.inference import validation
  from idm_jax.metrics import niqe

  test_config.data.update(source='folder', dir=str(tmp_path / 'faces'))  # no file beside it
  assert validation.niqe_params_path(test_config) == niqe.default_params_path()
  test_config.eval.niqe_params = str(tmp_path / 'mine.npz')
  assert validation.niqe_params_path(test_config) == str(tmp_path / 'mine.npz')
