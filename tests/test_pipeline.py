"""grain training pipeline and fixed eval pairs: determinism, host splits, state, bad files."""

import collections
import json
import shutil

import numpy as np
import pytest

from idm_jax.data import pipeline
from idm_jax.data import sources

R = 32
NUM_FILES = 10


@pytest.fixture
def degradation_ops():
  """The real degradation model (no stand-in: if it stopped importing, these tests must fail)."""
  from idm_jax.data import degradations  # pylint: disable=g-import-not-at-top

  return degradations


@pytest.fixture
def face_dir(tmp_path, celeba_dir):
  d = tmp_path / 'faces'
  d.mkdir()
  for p in sorted(celeba_dir.iterdir())[:NUM_FILES]:
    shutil.copy(p, d / p.name)
  return d


@pytest.fixture
def config(test_config, face_dir):
  c = test_config
  c.data.update(source='folder', dir=str(face_dir), num_val=2, resolution=R, num_workers=0)
  c.train.batch_size = 4
  return c


def _take(config, n, **kw):
  with pipeline.train_iterator(config, **kw) as it:
    return [next(it) for _ in range(n)]


def _equal(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _pairs(batch):
  """The batch as a multiset of (hq, lq) byte strings, to compare sets of examples."""
  return collections.Counter(h.tobytes() + l.tobytes() for h, l in zip(batch['hq'], batch['lq']))


def test_batches_are_degraded_real_images(config, face_dir):
  batches = _take(config, 3)
  train_files = sorted(face_dir.iterdir())[: NUM_FILES - 2]
  originals = [sources.load_image(p, R) for p in train_files]
  for b in batches:
    assert set(b) == {'hq', 'lq'}
    assert b['hq'].shape == b['lq'].shape == (4, R, R, 3)
    assert b['hq'].dtype == b['lq'].dtype == np.uint8
    for hq, lq in zip(b['hq'], b['lq']):
      assert not np.array_equal(hq, lq)
      # HQ is a training image, possibly flipped; never a validation image.
      assert any(np.array_equal(hq, o) or np.array_equal(hq, o[:, ::-1]) for o in originals)
  # Flips happen (p = 0.5 over 12 draws: all-or-nothing has probability 2 / 4096).
  flipped = [
    any(np.array_equal(hq, o[:, ::-1]) for o in originals) for b in batches for hq in b['hq']
  ]
  assert 0 < sum(flipped) < len(flipped)


def test_mild_share_reaches_training_pairs_but_never_eval_pairs(config):
  """The mild share (here all of it, all undamaged) shapes what the model trains on; the eval
  pairs it is scored on keep the heavy preset."""
  config.degradation.mild_share = 1.0
  config.degradation.mild.identity_prob = 1.0
  for b in _take(config, 2):
    np.testing.assert_array_equal(b['hq'], b['lq'])
  (e,) = pipeline.eval_batches(config, num_images=2, batch_size=2)
  config.degradation.mild_share = 0.0
  (heavy,) = pipeline.eval_batches(config, num_images=2, batch_size=2)
  np.testing.assert_array_equal(e['lq'], heavy['lq'])
  assert not np.array_equal(e['lq'], e['hq'])


def test_epochs_cover_everything_and_reshuffle():
  n = 7
  ds = pipeline.train_index_dataset(n, seed=3)
  epochs = [[ds[e * n + i] for i in range(n)] for e in range(3)]
  for e in epochs:
    assert sorted(e) == list(range(n))
  assert epochs[0] != epochs[1] != epochs[2]
  other_seed = pipeline.train_index_dataset(n, seed=4)
  assert [other_seed[i] for i in range(n)] != epochs[0]


@pytest.mark.parametrize('hosts', [2, 3])
def test_host_split_disjoint_and_covering(hosts):
  n = 11
  single = pipeline.train_index_dataset(n, seed=0)
  b = 2  # per-host batch
  per_host = [pipeline.train_index_dataset(n, 0, p, hosts, b) for p in range(hosts)]
  steps = 2 * n  # two epochs' worth of global positions, not a multiple of n or hosts
  for k in range(steps // hosts):
    for p in range(hosts):
      assert per_host[p][k] == single[(k // b) * hosts * b + p * b + k % b]
  # Host p owns block p of every global batch: the concatenation is the single-host stream.
  concat = [per_host[p][k * b + j] for k in range(3) for p in range(hosts) for j in range(b)]
  assert concat == [single[i] for i in range(3 * hosts * b)]


@pytest.mark.parametrize('hosts', [2, 3])
def test_host_batches_union_equals_global_batch(config, hosts):
  config.train.batch_size = 6
  single = _take(config, 3)
  per_host = [_take(config, 3, process_index=p, process_count=hosts) for p in range(hosts)]
  for k in range(3):
    for p in range(hosts):
      assert per_host[p][k]['hq'].shape[0] == 6 // hosts
    # In process order, the hosts' batches ARE the single-host batch (same order, same pixels).
    concat = {key: np.concatenate([per_host[p][k][key] for p in range(hosts)]) for key in single[k]}
    assert _equal(concat, single[k])


def test_batch_size_must_divide(config):
  config.train.batch_size = 4
  with pytest.raises(ValueError, match='batch_size=4'):
    pipeline.train_iterator(config, process_index=0, process_count=3)


def test_state_round_trip_in_process(config):
  with pipeline.train_iterator(config) as it:
    for _ in range(3):
      next(it)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = [next(it) for _ in range(4)]  # crosses the epoch boundary (8 files)
  with pipeline.train_iterator(config) as resumed:
    resumed.set_state(state)
    for want in expected:
      assert _equal(next(resumed), want)


def test_workers_identical_and_resumable(config):
  """0 and 2 worker processes give the same batches; a 2-worker state restores exactly."""
  in_process = _take(config, 5)
  config.data.num_workers = 2
  with pipeline.train_iterator(config) as it:
    got = [next(it) for _ in range(2)]
    state = json.loads(json.dumps(it.get_state()))
    got += [next(it) for _ in range(3)]
  for a, b in zip(in_process, got):
    assert _equal(a, b)
  with pipeline.train_iterator(config) as resumed:
    resumed.set_state(state)
    for want in got[2:]:
      assert _equal(next(resumed), want)


def test_bad_files_are_skipped_and_reported(config, face_dir, celeba_dir):
  jpeg = (celeba_dir / '201600.jpg').read_bytes()
  (face_dir / 'aa_empty.jpg').write_bytes(b'')
  (face_dir / 'ab_truncated.jpg').write_bytes(jpeg[: len(jpeg) // 3])
  (face_dir / 'ac_text.png').write_text('hello')
  config.data.num_val = 0
  with pipeline.train_iterator(config) as it:
    batches = [next(it) for _ in range(8)]  # 13 files, 10 good: 3+ epochs
    skipped = it.skipped
  for b in batches:
    assert b['hq'].shape == (4, R, R, 3)
  assert set(skipped) == {'aa_empty.jpg', 'ab_truncated.jpg', 'ac_text.png'}
  assert 'empty' in skipped['aa_empty.jpg'] and 'truncated' in skipped['ab_truncated.jpg']


def test_all_bad_files_fail_loudly(config, tmp_path):
  d = tmp_path / 'junk'
  d.mkdir()
  for i in range(3):
    (d / f'{i}.png').write_bytes(b'')
  config.data.update(dir=str(d), num_val=0)
  with pipeline.train_iterator(config) as it:
    with pytest.raises(ValueError, match='all 3 training images are unusable'):
      next(it)


def test_unconditional_yields_hq_only(config):
  config.model.conditional = False
  (b,) = _take(config, 1)
  assert set(b) == {'hq'} and b['hq'].shape == (4, R, R, 3)


def test_builtin_source_trains(test_config):
  (b,) = _take(test_config, 1)
  assert b['hq'].shape == (test_config.train.batch_size, 32, 32, 3)


def test_eval_batches_fixed(config, face_dir, degradation_ops):
  config.data.num_val = 5
  first = pipeline.eval_batches(config, num_images=5, batch_size=2)
  second = pipeline.eval_batches(config, num_images=5, batch_size=2)
  assert [len(b['name']) for b in first] == [2, 2, 1]
  assert [n for b in first for n in b['name']] == sorted(p.name for p in face_dir.iterdir())[-5:]
  for a, b in zip(first, second):
    assert a['name'] == b['name']
    assert np.array_equal(a['hq'], b['hq']) and np.array_equal(a['lq'], b['lq'])
  # HQ is the image itself (no flip), and LQ its own fixed degradation; different seeds differ.
  (b0,) = pipeline.eval_batches(config, num_images=1, batch_size=4)
  np.testing.assert_array_equal(b0['hq'][0], sources.load_image(face_dir / b0['name'][0], R))
  assert not np.array_equal(b0['lq'][0], b0['hq'][0])
  config.seed = 1
  (other,) = pipeline.eval_batches(config, num_images=1, batch_size=4)
  assert not np.array_equal(other['lq'][0], b0['lq'][0])
  # Asking for more than the split holds gives what there is.
  assert sum(len(b['name']) for b in pipeline.eval_batches(config, 50, 4)) == 5


def test_grain_workers_read_a_tfds_dataset_in_a_bucket(gcs_bucket, tmp_path, test_config):
  """The pod configs read TFDS from gs:// in grain worker processes (ffhq.py: 16): each worker's
  array_record reader opens the bucket itself. Two workers give the same batches as none."""
  from PIL import Image

  from idm_jax.data import prepare

  faces = tmp_path / 'faces'
  faces.mkdir()
  for i in range(16):
    Image.fromarray(sources.BuiltinSource('train', 64)[i]['image']).save(faces / f'{i:02d}.png')
  prepare.prepare(str(faces), 'tiny', 32, f'{gcs_bucket}/tfds', val_fraction=0.3, workers=0)
  c = test_config
  c.data.update(source='tfds', tfds_name='tiny', tfds_data_dir=f'{gcs_bucket}/tfds')

  def two_batches(workers):
    c.data.num_workers = workers
    it = iter(pipeline.train_iterator(c, process_index=0, process_count=1))
    try:
      return [next(it) for _ in range(2)]
    finally:
      it.close()

  inline, workers = two_batches(0), two_batches(2)
  for a, b in zip(inline, workers):
    assert a['hq'].shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(a['hq'], b['hq'])
    np.testing.assert_array_equal(a['lq'], b['lq'])
