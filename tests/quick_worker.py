"""Runs a worker script (tests/train_worker.py, ...) with two test-only speed-ups, for the tests
that start several processes many times (test_storage_faults, test_launch):

  * jax's persistent compilation cache is written by every process, not by process 0 alone.
    Process 1 of a job looks up keys of its own (its compile options differ), which jax never
    writes, so it compiled every program afresh in every run. The programs are the same ones;
    only the cache's contents change, and each run still checks what it checked.
  * with IDM_JAX_TEST_GCSFS_WAIT_DIVISOR=D, gcsfs's waits between its tries of a request are
    divided by D (gcs_faults.shorten_gcsfs_waits: its 6 tries and what it retries unchanged).

python tests/quick_worker.py WORKER.py [WORKER's arguments]
"""

import os
import runpy
import sys


def _cache_from_every_process(start):
  """Wraps conftest.start_cpu_processes (which imports jax once the device count is set) so that
  jax's compiler writes cache entries on every process."""

  def starting(args):
    jax = start(args)
    from jax._src import compilation_cache  # pylint: disable=import-outside-toplevel
    from jax._src import compiler  # pylint: disable=import-outside-toplevel
    from jax._src import distributed  # pylint: disable=import-outside-toplevel

    write = compiler._cache_write  # pylint: disable=protected-access

    def write_on_any_process(
      cache_key, compile_time_secs, module_name, backend, executable, host_callbacks
    ):
      if distributed.global_state.process_id in (None, 0) or host_callbacks:
        return write(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks)
      try:
        compilation_cache.put_executable_and_time(
          cache_key, module_name, executable, backend, int(compile_time_secs)
        )
      except Exception:  # pylint: disable=broad-except  (a cache that fails is only slower)
        pass
      return None

    compiler._cache_write = write_on_any_process  # pylint: disable=protected-access
    return jax

  return starting


def main():
  script = os.path.abspath(sys.argv[1])
  sys.argv = sys.argv[1:]
  sys.path.insert(0, os.path.dirname(__file__))
  import conftest  # pylint: disable=import-outside-toplevel  (the workers' helpers)

  conftest.start_cpu_processes = _cache_from_every_process(conftest.start_cpu_processes)
  divisor = float(os.environ.get('IDM_JAX_TEST_GCSFS_WAIT_DIVISOR') or 0)
  if divisor:
    import gcs_faults  # pylint: disable=import-outside-toplevel

    gcs_faults.shorten_gcsfs_waits(divisor)
  runpy.run_path(script, run_name='__main__')


if __name__ == '__main__':
  main()
