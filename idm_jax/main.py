"""The one driver: python -m idm_jax.main --config=configs/ffhq.py --workdir=DIR [--config.x=y].

`--config.mode` picks the job: train | evaluate | sample | clean | extrinsic | generate.
The log shows our lines and every library's warnings; libraries' INFO lines (orbax writes
dozens per checkpoint) come back with an explicit --verbosity (0: INFO, 1: DEBUG).
"""

from __future__ import annotations

import logging as std_logging  # only for the filter's types: we log through absl
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from idm_jax.runtime import allocator
from idm_jax.runtime import cli as cli_lib
from idm_jax.storage import files
from idm_jax.storage import workdir_lock

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, logs, samples.')
flags.mark_flags_as_required(['config', 'workdir'])


def run(config, workdir: str):
  """Dispatches on config.mode; importable so tests and notebooks skip absl flag parsing."""
  # Inside: each of these loads jax, and `--help` should answer at once.
  import jax  # noqa: PLC0415

  from idm_jax.runtime import configlib  # noqa: PLC0415
  from idm_jax.runtime import parallel  # noqa: PLC0415

  parallel.maybe_initialize_distributed()
  configlib.validate(config)
  _enable_compilation_cache()
  # A missing bucket or missing credentials fail here, in one line, not after the compile.
  files.check_writable(workdir)
  if jax.process_index() == 0:
    files.write_text(files.join(workdir, f'config_{config.mode}.json'), configlib.to_json(config))
  # Counts, not the device list: on a pod that list is one line of hundreds of chips.
  logging.info(
    'mode=%s workdir=%s: %d %s devices over %d processes, %d on this one',
    config.mode,
    workdir,
    jax.device_count(),
    jax.devices()[0].platform,
    jax.process_count(),
    jax.local_device_count(),
  )
  if config.mode == 'train':
    from idm_jax.training import train  # noqa: PLC0415 (keeps --help fast: the mode's module)

    return train.train_and_evaluate(config, workdir)
  if config.mode in ('evaluate', 'sample'):
    from idm_jax.inference import validation  # noqa: PLC0415 (keeps --help fast: the mode's module)

    return validation.run(config, workdir, write_metrics=config.mode == 'evaluate')
  if config.mode == 'generate':
    from idm_jax.inference import generate  # noqa: PLC0415 (keeps --help fast: the mode's module)

    return generate.run(config, workdir)
  if config.mode == 'clean':
    from idm_jax.extrinsic import cleaning  # noqa: PLC0415 (keeps --help fast: the mode's module)

    return cleaning.clean_from_config(config, workdir)
  if config.mode == 'extrinsic':
    from idm_jax.extrinsic import rounds  # noqa: PLC0415 (keeps --help fast: the mode's module)

    return rounds.run_rounds(config, workdir)
  raise ValueError(f'config.mode: {config.mode!r}')


def _enable_compilation_cache():
  """Reuses compiled programs across runs (resumes, evaluation, the demo): unless the user set
  JAX_COMPILATION_CACHE_DIR, cache under ~/.cache/idm_jax/xla/cpus-N, N the CPUs this process
  may run on. XLA's CPU compiler splits each elementwise loop into that many parallel tasks and
  JAX's cache key does not hold the number, so one run under `taskset -c 0` would otherwise hand
  one-thread programs to every later run on the whole machine."""
  import jax  # noqa: PLC0415 (keeps --help fast)

  if jax.config.jax_compilation_cache_dir:
    return
  path = os.path.join(os.path.expanduser('~'), '.cache', 'idm_jax', 'xla', f'cpus-{_usable_cpus()}')
  try:
    os.makedirs(path, exist_ok=True)
  except OSError:
    return
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


def _usable_cpus() -> int:
  affinity = getattr(os, 'sched_getaffinity', None)
  return len(affinity(0)) if affinity else os.cpu_count() or 1


class OursAndWarnings(std_logging.Filter):
  """Passes records from idm_jax's own files, and anything at WARNING or above."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or record.pathname.startswith(_PACKAGE_DIR)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:
    logging.get_absl_handler().addFilter(OursAndWarnings())
  from idm_jax.runtime import configlib  # noqa: PLC0415 (keeps --help fast: imports jax)
  from idm_jax.training import train  # noqa: PLC0415 (keeps --help fast: imports jax)

  try:
    run(FLAGS.config, FLAGS.workdir)
  except (configlib.ConfigError, files.StorageError, workdir_lock.WorkdirInUse) as e:
    # Said in one line, no traceback: each names the field or path to fix.
    raise SystemExit(f'error: {e}') from None
  except train.Stopped as e:
    # A stop request is not a failure: exit 0 (a pod launcher restarts only what failed), and
    # nothing after the training ran (no evaluation, cleaning or next round on a partial model).
    logging.warning('%s', e)


def cli():
  """The console script (setup.cfg) and `python -m idm_jax.main`."""
  allocator.use_tcmalloc()  # first: it re-executes the process
  cli_lib.run_absl(main, __name__)


if __name__ == '__main__':
  cli()
