"""One flag convention (underscores, the other spelling read too), and the installed commands."""

import configparser
import os
import re
import subprocess
import sys

from conftest import REPO
import pytest

from idm_jax.runtime import cli


def _console_scripts():
  cfg = configparser.ConfigParser()
  cfg.read(REPO / 'setup.cfg')
  lines = cfg['options.entry_points']['console_scripts'].strip().splitlines()
  return dict(tuple(part.strip() for part in line.split('=')) for line in lines)


def test_hyphenated_flags_are_read_as_underscored():
  p = cli.ArgumentParser()
  p.add_argument('--t_start', type=float, default=1.0)
  p.add_argument('--only_center_face', action='store_true')
  p.add_argument('--title', default='')
  for argv in (
    ['--t-start', '0.5', '--only-center-face'],
    ['--t_start=0.5', '--only_center_face'],
    ['--t-start=0.5', '--only-center-face'],
  ):
    a = p.parse_args(argv)
    assert a.t_start == 0.5 and a.only_center_face, argv
  # Values are never respelled, even when they look like flags after a bare '--'.
  p.add_argument('rest', nargs='*')
  a = p.parse_args(['--title', 'a-b', '--', '--not-a-flag'])
  assert a.title == 'a-b' and a.rest == ['--not-a-flag']
  with pytest.raises(SystemExit):
    p.parse_args(['--t-stat', '0.5'])  # a typo is still an error


def test_a_hyphenated_declaration_is_refused():
  with pytest.raises(ValueError, match='--t_start'):
    cli.ArgumentParser().add_argument('--t-start')


def test_every_command_is_installed_and_speaks_underscores():
  """Each console script in setup.cfg exists beside this Python (pip install puts it there),
  answers --help, and lists its long flags with underscores only."""
  scripts = _console_scripts()
  assert {'idm-restore', 'idm-demo', 'idm-evaluate', 'idm-aot', 'idm-prepare', 'idm-jax'} <= set(
    scripts
  )
  bindir = os.path.dirname(sys.executable)
  procs = {}
  for name in scripts:
    exe = os.path.join(bindir, name)
    assert os.path.exists(exe), f'{name}: not installed (pip install -e . makes it)'
    procs[name] = subprocess.Popen(
      [exe, '--help'], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
  for name, proc in procs.items():
    out, _ = proc.communicate(timeout=300)
    # absl's --help (the driver, aot) exits 1 after printing the usage; argparse's exits 0.
    absl = scripts[name].endswith(':cli')
    assert proc.returncode == (1 if absl else 0), f'{name} --help: {out[-2000:]}'
    if absl:
      assert '--config: Config file' in out, out  # the module's own flags, not only absl's
    flags = set(re.findall(r'(?<![\w-])--[a-z][a-z0-9_-]*', out))
    assert flags, f'{name} --help lists no flags'
    hyphenated = sorted(f for f in flags if '-' in f[2:])
    assert not hyphenated, f'{name}: {hyphenated}'
