"""A job over many processes, in lockstep: each takes its share (`host_share`), walks it in
chunks, as many as the busiest process has (`lockstep_chunks`: one agreement per job), runs each
chunk padded to one compiled shape (`call_padded`), and, where every process needs every result,
exchanges them (`gather_shares`). Every command that splits items over hosts (cleaning, scoring,
generating, evaluating) takes its share here.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from idm_jax.runtime import parallel


def host_share(n: int) -> np.ndarray:
  """The indices of n items this process handles: every process_count-th, from its index."""
  return np.arange(jax.process_index(), n, jax.process_count())


def batch_starts(n: int, batch_size: int, lockstep: bool) -> range:
  """Where this process's batches of `n` rows start. In lockstep, as many batches as the busiest
  process needs (every process must call it): a start at or past `n` is a filler batch."""
  count = -(-n // batch_size)
  if lockstep:
    count = parallel.max_over_processes(count)
  return range(0, count * batch_size, batch_size)


def lockstep_chunks(batch_size: int, lockstep: bool, *arrays):
  """This process's `arrays` in row chunks of at most `batch_size`; in lockstep, as many chunks
  as the busiest process has, trailing ones empty (every process must iterate to the end)."""
  for start in batch_starts(len(arrays[0]), batch_size, lockstep):
    yield tuple(x[start : start + batch_size] for x in arrays)


def pad_rows(x: np.ndarray, size: int) -> np.ndarray:
  """`x` with its last row repeated up to `size` rows. The padded rows are computed and thrown
  away, so that a short batch reuses the compiled shape of a full one."""
  x = np.asarray(x)
  return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)]) if size > len(x) else x


def call_padded(fn: Callable[..., np.ndarray], batch_size: int, *chunk: np.ndarray) -> np.ndarray:
  """fn(*chunk) with the chunk padded to `batch_size` rows, so that one compilation serves every
  chunk; the padding's results are dropped. An empty chunk (a process out of work, in lockstep)
  runs one filler row and returns no rows."""
  n = len(chunk[0])
  if not n:
    chunk = tuple(np.zeros((1,) + np.shape(x)[1:], np.asarray(x).dtype) for x in chunk)
  return fn(*(pad_rows(x, batch_size) for x in chunk))[:n]


def gather_shares(local: np.ndarray, n: int) -> np.ndarray:
  """Every process's `host_share` results (this process's in `local`) as all n rows, in order,
  bit for bit: the rows travel as bytes (a float64 gathered as itself would arrive as float32
  where JAX runs without x64). Collective: every process must call it."""
  pc = jax.process_count()
  if pc == 1:
    return local
  local = np.ascontiguousarray(local)
  row = local.shape[1:]
  raw = local.view(np.uint8).reshape(len(local), -1)
  per_process = -(-n // pc)
  padded = np.zeros((per_process, raw.shape[1]), np.uint8)
  padded[: len(raw)] = raw
  gathered = np.asarray(parallel.to_host(padded)).reshape(pc, per_process, raw.shape[1])
  result = np.empty((n, raw.shape[1]), np.uint8)
  for p in range(pc):
    idx = np.arange(p, n, pc)
    result[idx] = gathered[p, : len(idx)]
  return result.view(local.dtype).reshape((n,) + row)


def map_in_batches(
  fn: Callable[..., np.ndarray],
  batch_size: int,
  indices: np.ndarray,
  *arrays: np.ndarray,
  lockstep: bool = False,
  empty: np.ndarray | None = None,
) -> np.ndarray:
  """fn(indices chunk, *array chunks) over `call_padded` chunks of `batch_size` rows.

  lockstep: `fn` is collective over processes (a Restorer over several), so every process runs
  as many chunks as the process with the most (`lockstep_chunks`). Every process must make the
  call. `empty`: the result when this process has no rows.
  """
  out = [
    call_padded(fn, batch_size, *chunk)
    for chunk in lockstep_chunks(batch_size, lockstep, indices, *arrays)
  ]
  return np.concatenate(out) if len(indices) else empty
