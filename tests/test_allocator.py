"""The driver re-executes itself under TCMalloc (idm_jax/runtime/allocator.py says why)."""

import json
import os
import subprocess
import sys

import pytest

from idm_jax.runtime import allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Imported by every interpreter that starts with this folder on its path, the re-executed one
# too; at exit it writes what that process ran with. A re-execution replaces the process
# without running exit handlers, so the file holds the last process only.
_SITECUSTOMIZE = """
import atexit, json, os, sys
def _record():
  with open('/proc/self/maps') as f:
    maps = f.read()
  with open(os.environ['RECORD'], 'w') as f:
    json.dump(dict(tcmalloc='libtcmalloc' in maps, argv=sys.orig_argv[1:],
                   env=os.environ.get('IDM_JAX_MALLOC'), preload=os.environ.get('LD_PRELOAD')), f)
atexit.register(_record)
"""


def _run_driver(tmp_path, **env):
  site = tmp_path / 'site'
  site.mkdir()
  (site / 'sitecustomize.py').write_text(_SITECUSTOMIZE)
  record = tmp_path / 'record.json'
  full_env = {k: v for k, v in os.environ.items() if k not in ('IDM_JAX_MALLOC', 'LD_PRELOAD')}
  full_env.update(RECORD=str(record), PYTHONPATH=os.pathsep.join([str(site), ROOT]), **env)
  argv = ['-m', 'idm_jax.main', '--config=configs/demo.py', f'--workdir={tmp_path}', '--help']
  out = subprocess.run(
    [sys.executable, *argv], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300
  )
  assert '--config: Config file' in out.stdout + out.stderr, out.stderr[-2000:]
  return json.loads(record.read_text()), argv


def _needs_tcmalloc():
  if allocator.find() is None:
    pytest.skip('needs TCMalloc (Debian: apt install libtcmalloc-minimal4; .ci/run installs it)')


def test_the_driver_reexecutes_itself_under_tcmalloc_with_its_arguments(tmp_path):
  _needs_tcmalloc()
  seen, argv = _run_driver(tmp_path)
  assert seen['tcmalloc'], seen
  assert seen['argv'] == argv, seen
  assert seen['env'] == 'tcmalloc', seen


def test_idm_jax_malloc_system_keeps_the_system_allocator(tmp_path):
  _needs_tcmalloc()
  seen, argv = _run_driver(tmp_path, IDM_JAX_MALLOC='system')
  assert not seen['tcmalloc'], seen
  assert seen['argv'] == argv and seen['preload'] is None, seen


class _Executed(Exception):
  pass


def _record_exec(monkeypatch):
  """os.execve replaced by a recorder, so no test can replace the pytest process."""

  def execve(path, argv, env):
    raise _Executed(path, argv, env)

  monkeypatch.setattr(allocator.os, 'execve', execve)


def test_the_reexecution_keeps_the_users_preload_and_quiets_large_allocation_reports(monkeypatch):
  _record_exec(monkeypatch)
  monkeypatch.delenv(allocator.ENV, raising=False)
  monkeypatch.setenv('LD_PRELOAD', 'libmine.so')
  monkeypatch.setattr(allocator, 'loaded', lambda: False)
  monkeypatch.setattr(allocator, 'find', lambda: 'libtcmalloc_minimal.so.4')
  with pytest.raises(_Executed) as e:
    allocator.use_tcmalloc()
  path, argv, env = e.value.args
  assert path == sys.executable and argv == sys.orig_argv
  assert env['LD_PRELOAD'] == 'libtcmalloc_minimal.so.4:libmine.so'
  assert env[allocator.ENV] == 'tcmalloc'
  assert int(env['TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD']) >= 1 << 40
  # The user's own setting wins.
  monkeypatch.setenv('TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD', '123')
  with pytest.raises(_Executed) as e:
    allocator.use_tcmalloc()
  assert e.value.args[2]['TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD'] == '123'


@pytest.mark.parametrize('why', ['opted out', 'reexecuted', 'loaded', 'not installed'])
def test_no_reexecution_where_it_would_change_nothing_or_loop(monkeypatch, why):
  _record_exec(monkeypatch)
  monkeypatch.delenv(allocator.ENV, raising=False)
  monkeypatch.setattr(allocator, 'loaded', lambda: why == 'loaded')
  monkeypatch.setattr(allocator, 'find', lambda: None if why == 'not installed' else 'libt.so')
  if why in ('opted out', 'reexecuted'):
    monkeypatch.setenv(allocator.ENV, 'system' if why == 'opted out' else 'tcmalloc')
  allocator.use_tcmalloc()  # returns: no _Executed
