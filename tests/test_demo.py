"""The README's quick start, verbatim: the demo trains on the CPU and leaves what it promises."""
import pathlib
import subprocess
import sys
import time

import pytest

from conftest import REPO


@pytest.mark.slow
def test_readme_demo_command(tmp_path):
  readme = (REPO / 'README.md').read_text()
  command = 'python -m idm_jax.main --config=configs/demo.py --workdir=workdirs/demo'
  assert command in readme   # the test runs exactly what the README tells people to run
  workdir = tmp_path / 'demo'
  start = time.time()
  out = subprocess.run([sys.executable, '-m', 'idm_jax.main', '--config=configs/demo.py',
                        f'--workdir={workdir}'], cwd=REPO, capture_output=True, text=True,
                       timeout=900)
  elapsed = time.time() - start
  assert out.returncode == 0, out.stderr[-3000:]
  print(f'demo took {elapsed:.0f} s')
  # The target is 5 minutes on an otherwise idle 2-core machine (a goal for issue 14, measured
  # by this print, not asserted: on 2026-12-01 it took 487 s twice here). The bound only catches
  # a run that has become several times slower.
  assert elapsed < 720
  assert (workdir / 'checkpoints' / '500').is_dir()
  assert len((workdir / 'metrics.jsonl').read_text().splitlines()) >= 20
  assert sorted(p.name for p in pathlib.Path(workdir).glob('samples_*.png')) == [
      'samples_0000250.png', 'samples_0000500.png']
  assert list((workdir / 'tensorboard').glob('events.out.tfevents.*'))
