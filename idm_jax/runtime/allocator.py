"""TCMalloc under the heavy commands, where the system has it.

XLA's CPU runtime allocates each execution's temporaries (a train step's activations and
gradients) as one block. glibc's malloc serves a block that large with a fresh mapping and
unmaps it when the execution ends, so every step faults in and zeroes each page of it again.
TCMalloc keeps the freed block for the next execution. Libraries choose their allocator when
the process starts, so a command that wants TCMalloc re-executes itself with it preloaded, as
the field's launch scripts set LD_PRELOAD (docs/PERFORMANCE.md has the measurements).

IDM_JAX_MALLOC=system keeps the system's malloc. The re-executed process finds the variable set
(to `tcmalloc`) and goes on, so it never re-executes twice, and neither do the commands it starts.
"""

from __future__ import annotations

import ctypes.util
import os
import sys

ENV = 'IDM_JAX_MALLOC'
# gperftools' TCMalloc as Debian and Ubuntu package it (libtcmalloc-minimal4, or the full
# libgoogle-perftools4): the minimal one is the allocator without the profilers.
_NAMES = ('tcmalloc_minimal', 'tcmalloc')
# TCMalloc reports every allocation above 1 GiB on stderr; a large model's step allocates one
# each call. Set only where the user has not set it.
_QUIET = {'TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD': str(1 << 50)}


def find() -> str | None:
  """The soname of an installed TCMalloc (the dynamic loader's cache), or None."""
  for name in _NAMES:
    soname = ctypes.util.find_library(name)
    if soname:
      return soname
  return None


def loaded() -> bool:
  """Whether TCMalloc is mapped into this process."""
  try:
    with open('/proc/self/maps') as f:
      return 'libtcmalloc' in f.read()
  except OSError:
    return False


def in_use() -> str:
  """'tcmalloc' or 'system': what this process allocates with (the bench records it)."""
  return 'tcmalloc' if loaded() else 'system'


def use_tcmalloc() -> None:
  """Re-executes this process, with the same interpreter and arguments, with TCMalloc preloaded;
  returns at once where it is loaded already, the user opted out, the system has none, or the
  platform is not Linux. Call it first in a command's entry point, before anything is printed or
  any thread is started: nothing of the process before it survives the re-execution."""
  if not sys.platform.startswith('linux') or not sys.executable:
    return
  if os.environ.get(ENV) or loaded():
    return
  soname = find()
  if soname is None:
    return
  env = {**_QUIET, **os.environ, ENV: 'tcmalloc'}
  env['LD_PRELOAD'] = ':'.join(p for p in (soname, os.environ.get('LD_PRELOAD')) if p)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)
