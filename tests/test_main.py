"""The driver's log filter: our lines and every warning, not libraries' INFO chatter."""
import logging
import os

from idm_jax import main


def _record(path, level):
  return logging.LogRecord('absl', level, path, 1, 'msg', None, None)


def test_the_default_log_keeps_our_lines_and_all_warnings():
  ours = os.path.join(os.path.dirname(main.__file__), 'train.py')
  orbax = '/site-packages/orbax/checkpoint/checkpoint_manager.py'
  keep = main.OursAndWarnings().filter
  assert keep(_record(ours, logging.INFO))
  assert not keep(_record(orbax, logging.INFO))
  assert keep(_record(orbax, logging.WARNING)) and keep(_record(orbax, logging.ERROR))
  # A sibling folder whose name starts like ours is not ours.
  assert not keep(_record(os.path.dirname(main.__file__) + '_extra/x.py', logging.INFO))
