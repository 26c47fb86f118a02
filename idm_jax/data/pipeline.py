"""grain pipelines: endless shuffled (HQ, LQ) training batches, and fixed evaluation pairs.

Training (one host's view):

  range(N) -shuffle(seed; reshuffled each epoch)-> repeat forever -> this host's block of each
    global batch
    -> decode record -> degrade with rng(seed, epoch, source index)     } worker processes
    -> drop bad records (logged once each) -> batch(b, drop remainder)  } main process
    -> thread prefetch

Why this order:
  * Each example's numpy Generator is seeded from (seed, epoch, source index), never from a
    worker's identity, so the stream is the same for any `num_workers`.
  * Bad records are dropped *after* `mp_prefetch`: grain interleaves its workers round-robin,
    which reproduces the sequential order only if every worker yields every element, so the
    many-to-one steps (filter, batch) run in the main process. That keeps batches identical for
    0, 1 or 16 workers and makes the iterator state checkpointable.
  * The per-host split gives host p the contiguous block [k*B + p*b, k*B + (p+1)*b) of global
    batch k, so the hosts' batches, concatenated in process order (which is how
    `jax.make_array_from_process_local_data` assembles the global array), are exactly the batch a
    single host with the global batch B sees: a multi-host run computes the same steps.

The iterator state (grain's `get_state()`, a JSON-serialisable dict) restores the stream
exactly; it records per-worker positions, so resume with the same `num_workers`.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Any

from absl import flags
from absl import logging
import cv2
import grain
import numpy as np

from idm_jax.data import sources

# Stream tags mixed into the per-example seeds, so train and eval draws never coincide.
_TRAIN_STREAM, _EVAL_STREAM = 0, 1


def _degradation_ops():
  """The degradation module (looked up at build time; tests may substitute a stand-in)."""
  return importlib.import_module('idm_jax.data.degradations')


def _ensure_flags_parsed() -> None:
  """grain's mp_prefetch reads absl flags; outside absl.app (tests, notebooks, bench scripts)
  they are unparsed and reading one raises. Mark them parsed with their defaults then."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _worker_init(worker_index: int, worker_count: int) -> None:
  """One OpenCV thread per worker process: the processes are the parallelism, and N workers
  times N OpenCV threads would oversubscribe the cores."""
  del worker_index, worker_count
  cv2.setNumThreads(1)


def _check_seed(seed: int) -> int:
  if not 0 <= int(seed) < 2**32:
    raise ValueError(f"config.seed={seed} must be in [0, 2**32) (it seeds grain's shuffle)")
  return int(seed)


def per_host_batch_size(config, process_count: int) -> int:
  b, p = int(config.train.batch_size), int(process_count)
  if b % p:
    raise ValueError(
      f'config.train.batch_size={b} (global) is not divisible by the '
      f'{p} processes: each host must load the same number of examples'
    )
  return b // p


@dataclasses.dataclass(frozen=True)
class _TrainExample:
  """Host-local stream position k, source index -> {'hq', 'lq'} or a bad-record marker."""

  source: Any
  num_examples: int
  seed: int
  process_index: int
  process_count: int
  host_batch: int
  degradation: Any  # config.degradation
  conditional: bool
  ops: Any  # the degradations module (or a test stand-in)

  def __call__(self, k: int, src_index: int) -> dict[str, Any]:
    position = host_position(k, self.host_batch, self.process_index, self.process_count)
    epoch = position // self.num_examples
    record = self.source[int(src_index)]
    if sources.is_bad(record):
      return {'bad_name': record['name'], 'error': record['error']}
    rng = np.random.default_rng([self.seed, _TRAIN_STREAM, epoch, int(src_index)])
    if self.conditional:
      hq, lq, _ = self.ops.degrade_pair(record['image'], rng, self.degradation)
      return {'hq': np.ascontiguousarray(hq), 'lq': np.ascontiguousarray(lq)}
    # An unconditional model never sees LQ: skip the (costly) degradation, keep the flip.
    hq = record['image']
    if rng.random() < self.degradation.flip_prob:
      hq = hq[:, ::-1]
    return {'hq': np.ascontiguousarray(hq)}


class _DropBad:
  """Filter that drops bad records, logging each file once and remembering name -> reason."""

  def __init__(self, num_examples: int):
    self.num_examples = num_examples
    self.skipped: dict[str, str] = {}

  def __call__(self, element: dict[str, Any]) -> bool:
    if 'error' not in element:
      return True
    name = element['bad_name']
    if name not in self.skipped:
      self.skipped[name] = element['error']
      logging.warning(
        'skipping bad training image %s: %s (%d skipped so far)',
        name,
        element['error'],
        len(self.skipped),
      )
      if len(self.skipped) >= self.num_examples:  # otherwise we would loop forever
        raise ValueError(
          f'all {self.num_examples} training images are unusable, e.g. {name}: {element["error"]}'
        )
    return False


def host_position(k: int, host_batch: int, process_index: int, process_count: int) -> int:
  """Global stream position of host-local element k: host p owns block p of every batch."""
  return ((k // host_batch) * process_count + process_index) * host_batch + k % host_batch


@dataclasses.dataclass(frozen=True)
class _HostBlock:
  """Host-local element k -> the global stream's element at host_position(k)."""

  stream: Any
  host_batch: int
  process_index: int
  process_count: int

  def __call__(self, k: int) -> int:
    return self.stream[host_position(k, self.host_batch, self.process_index, self.process_count)]


def train_index_dataset(
  num_examples: int, seed: int, process_index: int = 0, process_count: int = 1, host_batch: int = 1
) -> grain.MapDataset:
  """This host's endless stream of source indices (each epoch a fresh permutation).

  Element k is the source index at global position host_position(k, host_batch, ...).
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, {process_count})')
  if num_examples < 1:
    raise ValueError('the training split is empty')
  ds = grain.MapDataset.range(num_examples).shuffle(seed=_check_seed(seed)).repeat()
  if process_count == 1:
    return ds
  return grain.MapDataset.range(len(ds) // process_count).map(
    _HostBlock(ds, host_batch, process_index, process_count)
  )


def _build_train(config, process_index: int, process_count: int):
  """(IterDataset of host-local batches, the _DropBad filter that records skipped files)."""
  b = per_host_batch_size(config, process_count)
  source = sources.make_source(config.data, config.data.train_split)
  n = len(source)
  if n < 1:
    raise ValueError(f'the training split of {config.data.source!r} data is empty')
  make = _TrainExample(
    source=source,
    num_examples=n,
    seed=_check_seed(config.seed),
    process_index=process_index,
    process_count=process_count,
    host_batch=b,
    degradation=config.degradation,
    conditional=bool(config.model.conditional),
    ops=_degradation_ops() if config.model.conditional else None,
  )
  ds = train_index_dataset(n, config.seed, process_index, process_count, b).map_with_index(make)

  workers = int(config.data.num_workers)
  prefetch = max(1, int(config.data.prefetch))
  # In-process: a few threads overlap decoding with the train step (cv2/PIL drop the GIL).
  # With worker processes the processes are the parallelism; one thread each.
  read = grain.ReadOptions(
    num_threads=1 if workers else 4,
    prefetch_buffer_size=prefetch * b if not workers else max(1, math.ceil(prefetch * b / workers)),
  )
  ds = ds.to_iter_dataset(read)
  if workers > 0:
    _ensure_flags_parsed()
    ds = ds.mp_prefetch(
      grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=max(1, math.ceil(prefetch * b / workers))
      ),
      worker_init_fn=_worker_init,
    )
  drop_bad = _DropBad(n)
  ds = ds.filter(drop_bad).batch(b, drop_remainder=True)
  ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
  return ds, drop_bad


def train_dataset(config, *, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """grain IterDataset of this host's batches {'hq', 'lq'}: uint8 (b, R, R, 3), endless.

  b = config.train.batch_size // process_count. Unconditional models get only 'hq'. Its
  iterators support get_state()/set_state().
  """
  return _build_train(config, process_index, process_count)[0]


class TrainIterator:
  """Iterator of host-local batches with grain's checkpointable state and a bad-file report.

  `skipped` maps each bad file met so far to its reason (each is also logged once).
  """

  def __init__(self, config, process_index: int = 0, process_count: int = 1):
    ds, self._drop_bad = _build_train(config, process_index, process_count)
    self._it = iter(ds)

  def __iter__(self) -> 'TrainIterator':
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._it is None:
      raise RuntimeError('TrainIterator is closed')
    return next(self._it)

  def get_state(self) -> dict[str, Any]:
    """grain's state (JSON-serialisable); it names per-worker positions, so restore it into an
    iterator built from the same config (same num_workers, batch size, seed, data)."""
    return self._it.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._it.set_state(state)

  @property
  def skipped(self) -> dict[str, str]:
    return dict(self._drop_bad.skipped)

  def close(self) -> None:
    """Stops worker processes now and drops grain's iterator (which otherwise complains if it
    is still alive at interpreter exit)."""
    if self._it is not None:
      close, self._it = getattr(self._it, 'close', None), None
      if close is not None:
        close()

  def __enter__(self) -> 'TrainIterator':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def train_iterator(config, *, process_index: int = 0, process_count: int = 1) -> TrainIterator:
  """An endless iterator of {'hq': uint8 (b, R, R, 3), 'lq': ...} batches for this host."""
  return TrainIterator(config, process_index, process_count)


def eval_pair(image: np.ndarray, index: int, config, ops=None) -> tuple[np.ndarray, dict]:
  """The fixed LQ version of eval image `index`: rng(seed, eval stream, index), never flipped."""
  ops = ops or _degradation_ops()
  rng = np.random.default_rng([_check_seed(config.seed), _EVAL_STREAM, int(index)])
  params = dict(ops.sample_params(rng, config.degradation, image.shape[0]))
  params['flip'] = False
  return ops.apply(image, params), params


def eval_batches(
  config, num_images: int, batch_size: int, split: str | None = None
) -> list[dict[str, Any]]:
  """The first `num_images` good images of the eval split with fixed degradations.

  Returns batches {'hq': uint8 (b, R, R, 3), 'lq': same, 'name': list[str]}; the last batch may
  be smaller. Every call returns identical arrays. Bad files are skipped (and logged); a split
  with fewer images than asked gives what it has, with a warning.
  """
  if num_images < 1 or batch_size < 1:
    raise ValueError(f'num_images={num_images} and batch_size={batch_size} must be >= 1')
  split = split or config.data.eval_split
  source = sources.make_source(config.data, split)
  ops = _degradation_ops()
  hq, lq, names = [], [], []
  for i in range(len(source)):
    if len(hq) == num_images:
      break
    record = source[i]
    if sources.is_bad(record):
      logging.warning('skipping bad eval image %s: %s', record['name'], record['error'])
      continue
    # Seeded by the source index, so one bad file does not shift everyone else's degradation.
    hq.append(record['image'])
    lq.append(eval_pair(record['image'], i, config, ops)[0])
    names.append(record['name'])
  if not hq:
    raise ValueError(f'the {split!r} split of {config.data.source!r} data has no usable images')
  if len(hq) < num_images:
    logging.warning(
      'asked for %d eval images, the %r split has only %d usable ones', num_images, split, len(hq)
    )
  return [
    {
      'hq': np.stack(hq[s : s + batch_size]),
      'lq': np.stack(lq[s : s + batch_size]),
      'name': names[s : s + batch_size],
    }
    for s in range(0, len(hq), batch_size)
  ]
