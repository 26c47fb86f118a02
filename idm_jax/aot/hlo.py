"""The collective ops in an optimized HLO module's text (a compiled program's `as_text()`), with
the bytes each one's result holds."""

from __future__ import annotations

import math
import re

COLLECTIVES = (
  'all-reduce',
  'all-gather',
  'reduce-scatter',
  'all-to-all',
  'collective-permute',
  'collective-broadcast',
  'ragged-all-to-all',
)

_DTYPE_BYTES = {
  'pred': 1,
  's4': 0.5,
  'u4': 0.5,
  's8': 1,
  'u8': 1,
  'f8e4m3fn': 1,
  'f8e5m2': 1,
  's16': 2,
  'u16': 2,
  'f16': 2,
  'bf16': 2,
  's32': 4,
  'u32': 4,
  'f32': 4,
  's64': 8,
  'u64': 8,
  'f64': 8,
  'c64': 8,
  'c128': 16,
}
_ARRAY = re.compile(
  r'\b(' + '|'.join(sorted(_DTYPE_BYTES, key=len, reverse=True)) + r')\[([0-9,]*)\]'
)
_OPCODE = re.compile(r' (' + '|'.join(COLLECTIVES) + r')(-start)?\(')  # not -done
_COMMENT = re.compile(r'/\*.*?\*/')  # HLO's /*index=5*/ inside long tuples


def collectives(hlo_text: str) -> dict:
  """{kind: (count, bytes)} of the collective ops in an optimized HLO module's text.

  Each op is counted once where it is defined (an async -start/-done pair at its start; an op
  inside a loop body once, not per iteration). Bytes are its result's, per device: the gathered
  array of an all-gather, the reduced buffer of an all-reduce, the shard of a reduce-scatter.
  TPU's compiler writes a reduce-scatter as an all-reduce inside an `all-reduce-scatter`
  fusion; those are counted as reduce-scatter (with the all-reduce's bytes).
  """
  out = {}
  computation = ''
  for line in hlo_text.splitlines():
    if line[:1] not in ('', ' ') and '{' in line:  # a computation's header line
      computation = line.split()[1] if line.startswith('ENTRY') else line.split()[0]
      continue
    if ' = ' not in line:
      continue
    rhs = _COMMENT.sub('', line.split(' = ', 1)[1])
    m = _OPCODE.search(' ' + rhs)
    if not m or not _result_before(rhs, m.start()):
      continue
    kind, start = m.group(1), bool(m.group(2))  # rhs[:m.start()]: the result type
    if kind == 'all-reduce' and computation.lstrip('%').startswith('all-reduce-scatter'):
      kind = 'reduce-scatter'
    arrays = _arrays(rhs[: m.start()])
    if start and kind != 'all-reduce' and rhs.startswith('('):
      # (operands..., results..., u32[] contexts): keep the results
      arrays = [a for a in arrays if a[1]]
      arrays = arrays[len(arrays) // 2 :]
    count, nbytes = out.get(kind, (0, 0))
    out[kind] = (count + 1, nbytes + sum(_bytes(a) for a in arrays))
  return out


def _result_before(rhs: str, at: int) -> bool:
  """Whether the opcode at `at` is the instruction's own (only its result type precedes it),
  not a name inside its attributes."""
  head = rhs[:at]
  return '=' not in head and '%' not in head


def _arrays(text: str):
  return [
    (dtype, tuple(int(d) for d in dims.split(',') if d)) for dtype, dims in _ARRAY.findall(text)
  ]


def _bytes(array) -> int:
  dtype, dims = array
  return int(math.prod(dims) * _DTYPE_BYTES[dtype])
