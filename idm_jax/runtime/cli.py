"""The flag convention of every idm_jax command: long flag names with underscores.

One spelling across the commands. The driver's and aot's absl flags and their config overrides
(--config.train.num_steps) can only be written with underscores, and the commands this
project's users know, GFPGAN's and CodeFormer's, spell theirs the same way (--only_center_face,
--bg_upsampler). The hyphenated spelling of a long flag is read as the underscored one
(--t-start is --t_start), so commands written either way keep working.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from absl import app
from absl import flags


def spelled(arg: str) -> str:
  """--a-b[=v] as --a_b[=v]; anything else (values, short flags, '--') unchanged."""
  if not arg.startswith('--') or arg == '--':
    return arg
  name, eq, value = arg[2:].partition('=')
  return '--' + name.replace('-', '_') + eq + value


class ArgumentParser(argparse.ArgumentParser):
  """argparse.ArgumentParser whose long flags are declared with underscores and read either way.

  A hyphenated long flag in `add_argument` is a ValueError, so no command drifts back to the
  other spelling. Arguments after a bare '--' are values, and are left alone.
  """

  def add_argument(self, *names, **kwargs):
    for name in names:
      if isinstance(name, str) and name.startswith('--') and '-' in name[2:]:
        raise ValueError(
          f'{name}: idm_jax flags are spelled with underscores '
          f'({spelled(name)}); idm_jax/runtime/cli.py says why'
        )
    return super().add_argument(*names, **kwargs)

  def parse_known_args(self, args: Sequence[str] | None = None, namespace=None):
    args = list(sys.argv[1:] if args is None else args)
    end = args.index('--') if '--' in args else len(args)
    return super().parse_known_args([spelled(a) for a in args[:end]] + args[end:], namespace)


# A command's exit status for a refused input: a usage error, as argparse's own.
USAGE_ERROR = 2


def fail(problem) -> int:
  """Says `problem` (which names the flag, file or value to fix) in one line on stderr, without
  a traceback, and returns the exit status every idm_jax command gives a refused input."""
  print(f'error: {problem}', file=sys.stderr)
  return USAGE_ERROR


def run_absl(main, module_name: str) -> None:
  """absl's app.run(main) for a console script: its --help shows `module_name`'s usage and
  flags, as `python -m module_name --help` does (absl looks both up under sys.argv[0])."""
  module = sys.modules[module_name]
  sys.modules['__main__'].__doc__ = module.__doc__
  for flag in flags.FLAGS.get_key_flags_for_module(module_name):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  app.run(main)
