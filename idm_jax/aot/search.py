"""--max_batch: the largest per-chip batch whose train step compiles and fits a chip's HBM.

Only a compile says where a limit is (XLA packs, pads and rematerialises; memory is not a line
in the batch), and a compile that fits is slow while most that do not fit are refused early,
saying what they needed. So the search compiles, aims each probe with the memory the earlier
ones reported, and tries only the batches TPU layouts favour.
"""

from __future__ import annotations

import re

import ml_collections

from idm_jax.aot import programs
from idm_jax.aot.chips import Chip
from idm_jax.aot.programs import Program

# XLA lays a TPU array out in tiles of 8 rows by 128 lanes. Under 8 images per chip it chooses
# layouts that plan more memory per image than those it uses from 8, and at multiples of 128 it
# puts the batch on the lanes and plans less per image than at the multiples of 8 beside them:
# memory is not monotone in the batch (docs/TPU.md, "Per-chip batch").
TILE_ROWS = 8
TILE_LANES = 128

# How XLA's TPU compiler words a batch that does not fit. Most are refused at buffer assignment,
# early, naming the temporaries they needed; one that misses by a little can be refused only at
# the end of the compile, naming the HBM it used in all.
_NEEDED_TEMPORARIES = re.compile(r'HLO temporaries \(([0-9.]+)([KMGT])\)')
_NEEDED_TOTAL = re.compile(r'Used ([0-9.]+)([KMGT]) of [0-9.]+[KMGT] hbm')


def max_batch_per_chip(config, mesh, chip: Chip, known: Program = None, limit: int = 1024):
  """(largest per-chip batch whose train step compiles and fits, among the batches
  `largest_fitting` searches; the Programs compiled for it). `known`, a train step already
  compiled on this mesh, is reused rather than compiled again."""
  if known is not None and known.cannot_run:
    return 0, []  # not memory: no batch runs there
  cache = {known.batch // mesh.size: known} if known is not None else {}

  def measure(per_chip):
    if per_chip not in cache:
      cache[per_chip] = programs.compile_train_step(with_batch(config, per_chip * mesh.size), mesh)
    program = cache[per_chip]
    if not program.error:
      return programs.fits(program, chip), program.memory['total']
    return False, needed_bytes(program, _beside_temporaries(cache.values()))

  best, _ = largest_fitting(measure, chip.hbm_bytes, limit, start=min(cache, default=1))
  return best, [p for p in cache.values() if p is not known]


def with_batch(config: ml_collections.ConfigDict, batch_size: int) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(config.to_dict())
  config.train.batch_size = int(batch_size)
  return config


def largest_fitting(measure, capacity: int, limit: int = 1024, start: int = 1):
  """(the largest per-chip batch up to `limit` that fits, searched on the grids XLA's TPU layouts
  favour; the batches tried in order), 0 if none fits.
  measure(n) is one compile: (whether it fits, its memory in bytes, or for one that ran out of
  memory what XLA said it needed; None when unknown). The search finds the edge among multiples
  of TILE_LANES, then among multiples of TILE_ROWS from that edge up, and only when no multiple
  of TILE_ROWS fits, among 1 to TILE_ROWS - 1. Batches off those grids are not tried: they seem
  to pad to the next multiple. On each grid it assumes memory grows, which held wherever the
  verdicts were compiled (docs/TPU.md, "Per-chip batch").
  `start` is a batch already compiled: where it lies on a grid the search there starts from it."""
  tried, results = [], {}

  def record(n):
    if n not in results:
      tried.append(n)
      results[n] = measure(n)
    return results[n]

  best = 0
  for grid in (TILE_LANES, TILE_ROWS):
    if limit < grid:
      continue
    first = best // grid if best else start // grid if start % grid == 0 else 1
    k = _edge(
      lambda k, grid=grid: record(k * grid), capacity, limit // grid, min(first, limit // grid)
    )
    best = max(best, k * grid)
  if best:
    return best, tried
  below = min(limit, TILE_ROWS - 1)
  return _edge(record, capacity, below, min(start, below)), tried


def _edge(measure, capacity: int, limit: int, start: int) -> int:
  """The largest n in [1, limit] that fits, 0 if none, for memory that grows with n; the first
  compile at `start`.

  A compile that fits takes as long as many that do not: XLA mostly refuses a batch at buffer
  assignment, before its slow code generation (docs/TPU.md). So while no n is known not to fit,
  each probe aims at twice where the line through the largest fits crosses the capacity (at
  least twice the largest fit): where memory is linear it fails, cheaply, and reports the memory
  that brackets the edge; where memory saturates (XLA packs larger batches into nearly the same
  buffers when HBM runs short) it reaches the edge in fewer fits than following the line. Inside
  the bracket it aims where the chord between its ends crosses the capacity, and bisects when an
  end has no memory. Every probe narrows the bracket, so any growing memory curve gets the exact
  edge."""
  seen, ok = {}, {}

  def fits_at(n):
    ok[n], seen[n] = measure(n)
    return ok[n]

  lo, hi = (start, None) if fits_at(start) else (0, start)
  while lo < limit and (hi is None or hi - lo > 1):
    if hi is None:
      fit = sorted(n for n in seen if ok[n] and seen[n])
      aim = (
        _crossing(seen, fit[-2], fit[-1], capacity)
        if len(fit) > 1
        else fit[-1] * capacity / seen[fit[-1]]
        if fit
        else lo
      )
      n = min(int(max(2 * lo, 2 * aim)), limit)
    elif lo and seen[lo] is not None and seen[hi] is not None:
      n = min(max(_crossing(seen, lo, hi, capacity), lo + 1), hi - 1)
    else:
      n = (lo + hi) // 2
    lo, hi = (n, hi) if fits_at(n) else (lo, n)
  return lo


def _crossing(seen, a: int, b: int, capacity: int) -> int:
  """The largest n at or under the capacity on the line through (a, seen[a]), (b, seen[b])."""
  per_image = (seen[b] - seen[a]) / (b - a)
  if per_image <= 0:
    return 2 * max(a, b)
  return a + int((capacity - seen[a]) // per_image)


def needed_bytes(program: Program, other_bytes: float = 0.0) -> float | None:
  """The HBM an out-of-memory compile said it needed in all; None if it did not say. Where XLA
  names only the temporaries, `other_bytes` (arguments, outputs, code: about the same at every
  batch) completes the total."""

  def size(m):
    return float(m.group(1)) * 1024 ** ('KMGT'.index(m.group(2)) + 1)

  if m := _NEEDED_TOTAL.search(program.error):
    return size(m)
  if m := _NEEDED_TEMPORARIES.search(program.error):
    return size(m) + other_bytes
  return None


def _beside_temporaries(compiled) -> float:
  """The first compiled program's bytes other than its temporaries (arguments, outputs, code):
  give it train steps only, as a sampler's arguments are not a step's."""
  m = next((p.memory for p in compiled if not p.error), {})
  return sum(v for k, v in m.items() if k not in ('temporaries', 'total'))


def report_lines(found, mesh, chip: Chip, compiled) -> list[str]:
  """The search's lines in the check's report. `found`: (the largest per-chip batch, the
  search's seconds, the Programs it compiled); `compiled`: the check's own programs."""
  best, seconds, tried = found
  steps = [p for p in compiled + tried if p.name == 'train step']
  beside = _beside_temporaries(steps)

  def projected(p):
    return f'{programs.images_per_second(p, chip, 0.4):.0f} img/s at 40% MFU'

  def outcome(p):
    if programs.fits(p, chip):
      return f'{programs.gib(p.memory["total"])}, {projected(p)}'
    if not p.error:
      return f'{programs.gib(p.memory["total"])}, over HBM'
    needed = needed_bytes(p, beside)
    return 'out of memory' + (f' (needs {programs.gib(needed)})' if needed is not None else '')

  probes = ', '.join(f'{p.batch // mesh.size}: {outcome(p)}' for p in tried)
  lines = [
    f'largest per-chip batch that fits (of multiples of {TILE_LANES}, then of '
    f'{TILE_ROWS}, then 1 to {TILE_ROWS - 1} when none fits): {best} (global '
    f'{best * mesh.size}); the '
    f'search compiled {len(tried)} more train steps in {seconds:.0f} s (per chip: '
    f'{probes or "none"})'
  ]
  # Near the limit XLA rematerialises, so each image can cost more FLOPs than at a smaller
  # batch that fits: the fastest batch by the projection need not be the largest.
  fitting = [p for p in steps if programs.fits(p, chip)]
  if fitting:
    fastest = max(fitting, key=lambda p: programs.images_per_second(p, chip, 0.4))
    lines.append(
      f'fastest per-chip batch compiled, by the projection: '
      f'{fastest.batch // mesh.size} ({projected(fastest)} on these '
      f'{mesh.size} chips)'
    )
  return lines
