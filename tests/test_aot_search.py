"""aot/search.py: the --max_batch search on fake and on measured compiles, reading XLA's
out-of-memory messages, and the search's lines in the report."""

import dataclasses

from conftest import load_config
import pytest

from idm_jax.aot import check
from idm_jax.aot import chips
from idm_jax.aot import programs
from idm_jax.aot import search


def _measure(base, per_image, capacity, oom_above=None, reports=True):
  """A fake compile: (fits, memory) for a batch. Above oom_above it fails without saying what it
  needed; otherwise a compile over the capacity reports its need when `reports`, as XLA does."""

  def measure(n):
    if oom_above is not None and n > oom_above:
      return False, None
    m = base + per_image(n)
    return m <= capacity, m if (m <= capacity or reports) else None

  return measure


def _searched_best(measure, limit):
  """What largest_fitting should return, straight from its definition."""
  fitting = lambda ns: max([n for n in ns if measure(n)[0]], default=0)
  return fitting(range(8, limit + 1, 8)) or fitting(range(1, min(limit, 7) + 1))


@pytest.mark.parametrize(
  'per_image, oom_above',
  [
    (lambda n: 7 * n, None),  # linear
    (lambda n: 3 * n + n * n // 4, None),  # convex
    (lambda n: 7 * n, 20),  # overshoots into compiles that report no memory
    (lambda n: 40 * (n // 5 + 1), None),  # steps (layout padding): flat, then jumps
    (lambda n: int(300 * (1 - 0.8**n)), None),  # saturating, as XLA packs under pressure
  ],
)
@pytest.mark.parametrize('capacity', [11, 40, 100, 161, 1000])
@pytest.mark.parametrize('reports', [True, False])
@pytest.mark.parametrize('start', [1, 3, 16])
def test_largest_fitting_finds_the_exact_edge(per_image, oom_above, capacity, reports, start):
  measure = _measure(4, per_image, capacity, oom_above, reports)
  best, tried = search.largest_fitting(measure, capacity, limit=64, start=start)
  assert best == _searched_best(measure, 64)
  assert len(tried) == len(set(tried))  # no compile twice
  assert all(n % 8 == 0 or n < 8 for n in tried)
  assert tried[0] == (start if start % 8 == 0 else 8)  # a multiple of 8 first
  if best:  # the edge was compiled on both sides
    above = best + 8 if best >= 8 else best + 1
    assert best in tried and (above > 64 or above in tried)


def _fits_compiled(measure, tried):
  return sum(measure(n)[0] for n in tried)


def test_largest_fitting_compiles_two_fits_when_memory_is_linear():
  measure = _measure(1000, lambda n: 700 * n, 16_000)
  best, tried = search.largest_fitting(measure, 16_000, limit=1024)
  # 21 images fit; of the batches searched, 16. Compiled: 128 (refused: no multiple of 128 fits),
  # then 8, 32 (refused), 16, 24 (refused).
  assert best == 16 and tried == [128, 8, 32, 16, 24] and _fits_compiled(measure, tried) == 2


def test_largest_fitting_finds_a_multiple_of_128_past_refused_multiples_of_8():
  # As XLA plans the generation config on v5p (docs/TPU.md): at multiples of 128 the batch goes
  # on the tiles' lanes and costs less per image than at the multiples of 8 around them.
  measure = lambda n: (lambda m: (m <= 100, m))(1 + (0.10 if n % 128 == 0 else 0.16) * n)
  best, tried = search.largest_fitting(measure, 100, limit=1024)
  assert best == 896 and measure(896)[0] and not measure(904)[0] and not measure(1024)[0]
  assert not measure(624)[0]  # where a search over the multiples of 8 alone would have stopped
  assert len(tried) == len(set(tried)) and all(n % 8 == 0 for n in tried)
  assert tried[:3] == [128, 1024, 896] and 904 in tried
  # The multiple of 128 it starts from counts: a known 256 is not compiled again.
  assert search.largest_fitting(measure, 100, limit=1024, start=256)[1][0] == 256


def test_largest_fitting_on_v5es_measured_memory_finds_8_above_refused_3_and_4():
  # ffhq.py's train step on v5e-16 (docs/results/tpu_compiles.csv): per chip, whether it fit and its
  # GiB in all, or what the refusal needed. A search over every batch would stop at 2.
  v5e = {
    2: (True, 15.69),
    3: (False, 17.52),
    4: (False, 19.20),
    8: (True, 14.20),
    16: (False, 29.30),
    128: (False, 110.68),
  }
  best, tried = search.largest_fitting(lambda n: v5e[n], 16, limit=1024, start=2)
  assert best == 8 and tried == [128, 8, 16]


def test_largest_fitting_on_v4s_measured_generation_memory_finds_256_in_two_fits():
  # The generation config's train step on v4 (docs/results/tpu_compiles.csv), started from the
  # compiled 128 per chip: any other batch would raise KeyError.
  v4 = {
    128: (True, 19.94),
    384: (False, 40.28),
    256: (True, 29.81),
    544: (False, 78.82),
    264: (False, 34.24),
  }
  best, tried = search.largest_fitting(lambda n: v4[n], 32, limit=1024, start=128)
  assert best == 256 and tried == [128, 384, 256, 544, 264]


def test_largest_fitting_is_zero_when_one_image_does_not_fit_and_stops_at_the_limit():
  assert search.largest_fitting(_measure(0, lambda n: 10 * n, 5), 5) == (0, [128, 8, 1])
  best, tried = search.largest_fitting(_measure(0, lambda n: n, 10**9), 10**9, limit=8)
  assert best == 8 and tried == [8]
  assert search.largest_fitting(_measure(0, lambda n: n, 10**9), 10**9, limit=5) == (5, [1, 5])


def test_needed_bytes_reads_xlas_out_of_memory_message():
  # Verbatim from libtpu 0.0.42 (ffhq.py, 3 images per chip on v5e).
  error = (
    'RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO '
    'temporaries (16.26G) exceeds available HBM (15.75G).'
  )
  p = programs.Program('train step', 48, 1.0, {}, 0.0, {}, error=error)
  # It names the temporaries only: the arguments and outputs complete the total.
  assert search.needed_bytes(p, 1.26 * chips.GiB) == pytest.approx(17.52 * chips.GiB)
  # Refused at the end of the compile (ffhq_256.py at fsdp = 4 on v5e), it names the total.
  late = (
    'RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent error. Ran out '
    'of memory in memory space hbm. Used 15.82G of 15.75G hbm. Exceeded hbm capacity by '
    '73.09M.'
  )
  assert search.needed_bytes(dataclasses.replace(p, error=late), 1.26 * chips.GiB) == pytest.approx(
    15.82 * chips.GiB
  )
  assert search.needed_bytes(dataclasses.replace(p, error='RESOURCE_EXHAUSTED: other')) is None


def test_max_batch_search_starts_from_the_step_already_compiled(monkeypatch):
  class Mesh:
    size = 4
    shape = {'data': 4, 'fsdp': 1}

  G = chips.GiB
  chip = chips.Chip('x', 60 * G, 1e12)
  compiled = []

  def compile_train_step(config, mesh):
    compiled.append(config.train.batch_size)
    per_chip = config.train.batch_size // mesh.size
    temporaries = 10 * per_chip * G
    if temporaries > 59 * G:  # as XLA refuses it, saying what it needed
      return programs.Program(
        'train step',
        config.train.batch_size,
        1.0,
        {},
        0.0,
        {},
        error=(
          f'RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO '
          f'temporaries ({temporaries / G:.2f}G) exceeds available HBM (59.00G).'
        ),
      )
    memory = {
      'arguments': 1 * G,
      'temporaries': temporaries,
      'outputs': 0,
      'total': temporaries + 1 * G,
    }
    return programs.Program('train step', config.train.batch_size, 1.0, memory, 1.0, {})

  monkeypatch.setattr(programs, 'compile_train_step', compile_train_step)
  known = compile_train_step(search.with_batch(load_config('test'), 8), Mesh())
  compiled.clear()
  best, probes = search.max_batch_per_chip(load_config('test'), Mesh(), chip, known=known)
  assert best == 5 and 8 not in compiled and compiled == [p.batch for p in probes]
  assert all(b % Mesh.size == 0 for b in compiled)
  # Per chip: 128 and 8 first (refused), then from the known 2 along the line the refusals
  # drew: 7 (refused, needing 71 GiB) -> 5 -> 6 (refused).
  assert compiled == [512, 32, 28, 20, 24]
  cannot = dataclasses.replace(known, error='no', cannot_run=True)
  assert search.max_batch_per_chip(load_config('test'), Mesh(), chip, known=cannot) == (0, [])
  # A sampler beside the step (its arguments are not the step's) must not enter the estimate.
  sampler = programs.Program(
    'sampler',
    8,
    1.0,
    {'arguments': 50 * G, 'temporaries': 0, 'outputs': 0, 'total': 50 * G},
    1.0,
    {},
  )
  text = check.report('v5e:2x2', 1, Mesh(), chip, [sampler, known], (best, 5.0, probes))
  assert (
    'largest per-chip batch that fits (of multiples of 128, then of 8, then 1 to 7 when '
    'none fits): 5 (global 20)'
  ) in text
  assert (
    '8: out of memory (needs 81.00 GiB)' in text and '6: out of memory (needs 61.00 GiB)' in text
  )
  # Each fitting probe carries its projection (flops 1.0 per chip: batch x 0.4 x 1e12 img/s).
  assert '5: 51.00 GiB, 8000000000000 img/s at 40% MFU' in text
  assert 'fastest per-chip batch compiled, by the projection: 5 (' in text
