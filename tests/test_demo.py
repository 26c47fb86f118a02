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
  # The target is 5 minutes on an otherwise idle 2-core machine, measured by this print
  # (docs/PERFORMANCE.md), not asserted: machines differ. The bound only catches a run that has
  # become several times slower.
  assert elapsed < 720
  assert (workdir / 'checkpoints' / '400').is_dir()
  assert len((workdir / 'metrics.jsonl').read_text().splitlines()) >= 16
  assert sorted(p.name for p in pathlib.Path(workdir).glob('samples_*.png')) == [
      'samples_0000200.png', 'samples_0000400.png']
  assert list((workdir / 'tensorboard').glob('events.out.tfevents.*'))
