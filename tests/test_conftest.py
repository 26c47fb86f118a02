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
  cmd = [
    sys.executable,
    '-m',
    'pytest',
    '-q',
    '-rs',
    '-p',
    'no:cacheprovider',
    'tests/test_sources.py::test_cmyk_jpeg_becomes_rgb',
    'tests/test_metrics_niqe.py::test_niqe_accepts_path_and_ranks_degradation',
  ]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-4000:]
  assert '1 passed, 1 skipped' in out, out[-4000:]
  assert 'needs ../shared/data/celeba_hq128_dev beside the checkout' in out


def test_allow_skips_fails_a_run_on_any_other_skip(tmp_path):
  """CI's --allow-skips: a skip outside the named list fails the run and is named; the same skip
  allowed by name passes; an unknown name is a usage error."""
  env = dict(os.environ, IDM_JAX_SHARED_DATA=str(tmp_path / 'nothing'))
  test = 'tests/test_sources.py::test_cmyk_jpeg_becomes_rgb'

  def run(*args):
    return subprocess.run(
      [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', test, *args],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
    )

  strict = run('--allow-skips=gpu,libtpu')
  assert strict.returncode == 1, strict.stdout + strict.stderr
  assert '1 unexpected skip(s)' in strict.stdout
  assert f'{test}: Skipped: needs ../shared/data/celeba_hq128_dev' in strict.stdout
  allowed = run('--allow-skips=gpu,shared-data')
  assert allowed.returncode == 0, allowed.stdout + allowed.stderr
  assert run().returncode == 0  # without the option, a skip is only a skip
  bad = run('--allow-skips=gpu,browser')
  assert bad.returncode == 4 and "unknown ['browser']" in bad.stderr
