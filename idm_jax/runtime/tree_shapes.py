"""Comparing the names and shapes of a set of arrays with what a model expects.

Shared by everything that loads weights a user supplies (checkpoints, exported models, converted
LPIPS/Inception files), so a mismatch reads the same wherever it is found.
"""

from typing import Mapping, Sequence


def mismatches(want: Mapping[str, Sequence[int]], got: Mapping[str, Sequence[int]]) -> list:
  """Readable problems, first examples included: missing names, unexpected names, and names
  whose shape differs. Empty when `got` fits `want` exactly."""
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  wrong = [
    f'{k}: got {tuple(got[k])}, expected {tuple(want[k])}'
    for k in sorted(set(want) & set(got))
    if tuple(got[k]) != tuple(want[k])
  ]
  problems = []
  if missing:
    problems.append(f'{len(missing)} missing (e.g. {missing[:3]})')
  if extra:
    problems.append(f'{len(extra)} unexpected (e.g. {extra[:3]})')
  if wrong:
    problems.append(f'{len(wrong)} with wrong shapes (e.g. {wrong[:3]})')
  return problems
