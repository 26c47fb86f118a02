"""Runs a command as a parent that adopts orphans and never reaps them: PID 1 of a container that
does not collect its zombies. tests/test_launch.py runs the pod script under it, so that a runner
that ended and stays a zombie must still count as ended.

  python tests/no_reaper.py COMMAND [ARG...]   exits with COMMAND's status
"""

import ctypes
import os
import subprocess
import sys

PR_SET_CHILD_SUBREAPER = 36


def main():
  if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
    sys.exit(f'no_reaper.py: prctl(PR_SET_CHILD_SUBREAPER) failed: errno {ctypes.get_errno()}')
  child = subprocess.Popen(sys.argv[1:])
  _, status = os.waitpid(child.pid, 0)  # this child only: the adopted orphans stay zombies
  sys.exit(os.waitstatus_to_exitcode(status))


if __name__ == '__main__':
  main()
