"""Kernel launches of a compiled program, counted from its optimized HLO text.

A step made of many small kernels pays a launch gap for each on a GPU, which no FLOP or byte count
shows. This counts the operations XLA will run as separate kernels: every instruction of the
entry computation and of the loop and branch bodies it runs, except the bookkeeping ones (params,
tuples, bitcasts, the loop instructions themselves). Instructions inside fused computations are
one kernel with their fusion, so they are not counted. It is an estimate: XLA may still batch
launches into CUDA graphs, and a library call can launch more than one kernel.
"""

import collections
import re

_HEADER = re.compile(r'^(ENTRY )?%([^\s(]+)\s.*\{$')
_OPCODE = re.compile(r'=\s.*?\s([a-z][\w-]*)\(')
_RUNS = re.compile(r'\b(?:body|condition|true_computation|false_computation)=%([\w.-]+)')
_BRANCHES = re.compile(r'branch_computations=\{([^}]*)\}')
_BOOKKEEPING = {
  'parameter',
  'constant',
  'get-tuple-element',
  'tuple',
  'bitcast',
  'while',
  'conditional',
  'call',
  'after-all',
  'partition-id',
  'replica-id',
  'opt-barrier',
  'copy-done',
  'all-reduce-done',
  'all-gather-done',
  'collective-permute-done',
  'async-done',
  'iota',
}


def launch_count(hlo_text: str) -> dict:
  """{'kernels': n, 'by_op': {opcode: n}} for the optimized HLO text of one program."""
  bodies, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = header.group(2)
      bodies[current] = []
      if header.group(1):
        entry = current
    elif line.startswith('}'):
      current = None
    elif current is not None:
      bodies[current].append(line)
  if entry is None:
    raise ValueError('no ENTRY computation in the HLO text')
  by_op = collections.Counter()
  todo, seen = [entry], set()
  while todo:
    name = todo.pop()
    if name in seen:
      continue
    seen.add(name)
    for line in bodies.get(name, []):
      todo.extend(_RUNS.findall(line))
      for group in _BRANCHES.findall(line):
        todo.extend(n.strip().lstrip('%') for n in group.split(','))
      op = _OPCODE.search(line)
      if op and op.group(1) not in _BOOKKEEPING:
        by_op[op.group(1)] += 1
  return {'kernels': sum(by_op.values()), 'by_op': dict(by_op.most_common())}
