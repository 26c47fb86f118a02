"""The test suite on a plain clone: nothing beside the checkout (tests/conftest.py's fixtures)."""
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_plain_clone_skips_real_face_tests_with_a_reason_and_runs_niqe(tmp_path):
  """Without ../shared/data the real-face tests skip, saying what to provide; NIQE tests use
  the shipped parameters and run."""
  env = dict(os.environ, IDM_JAX_SHARED_DATA=str(tmp_path / 'nothing'))
  cmd = [sys.executable, '-m', 'pytest', '-q', '-rs', '-p', 'no:cacheprovider',
         'tests/test_sources.py::test_cmyk_jpeg_becomes_rgb',
         'tests/test_metrics_niqe.py::test_niqe_accepts_path_and_ranks_degradation']
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-4000:]
  assert '1 passed, 1 skipped' in out, out[-4000:]
  assert 'needs ../shared/data/celeba_hq128_dev beside the checkout' in out
