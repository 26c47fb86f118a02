"""python -m idm_jax.aot --config=configs/ffhq.py --topology=v5e:4x4 [--num_slices=2]
    [--max_batch] [--nosample] [--config.x=y ...]

Prints the check's report and its verdict; exits 0 when it fits, 1 when something does not fit
in HBM, 2 when the config cannot run on the slice."""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from idm_jax.aot import check
from idm_jax.runtime import cli as cli_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).', lock_config=True)
flags.DEFINE_string(
  'topology',
  None,
  'libtpu topology (v5e:4x4, v4:2x2x4, v5p:4x4x4) or '
  'accelerator type (v5litepod-16, v4-32, v5p-128).',
)
flags.DEFINE_integer('num_slices', 1, 'Slices joined over the data-centre network.')
flags.DEFINE_bool(
  'sample',
  True,
  'With a training config.mode, also compile its samplers '
  "(the training grid's; extrinsic's cleaning Restorer).",
)
flags.DEFINE_bool('max_batch', False, 'Also search the largest per-chip batch that fits.')
flags.mark_flags_as_required(['config', 'topology'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    text, (line, status) = check.run(
      FLAGS.config, FLAGS.topology, FLAGS.num_slices, sample=FLAGS.sample, max_batch=FLAGS.max_batch
    )
  except ValueError as e:  # a field the slice cannot take (ConfigError is one): no traceback
    print(f'aot: cannot run on {FLAGS.topology}: {e}', file=sys.stderr)
    print('verdict: does not run', file=sys.stderr)
    raise SystemExit(2) from None
  print(text)
  print('verdict:', line)
  if status:
    raise SystemExit(status)


def cli():
  """The console script (setup.cfg)."""
  cli_lib.run_absl(main, __name__)


if __name__ == '__main__':
  cli()
