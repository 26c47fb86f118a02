"""prepare: folder -> TFDS array_record dataset -> make_source round trip, without TensorFlow."""

import pathlib
import shutil

import cloudpickle
import numpy as np
import pytest

from idm_jax.data import pipeline
from idm_jax.data import prepare
from idm_jax.data import sources

R = 32
FILES = (
  '201600.jpg',
  '201601.jpg',
  '201602.jpg',
  'sub/201603.jpg',
  'sub/deeper/201604.jpg',
  '201605.jpg',
  '201606.jpg',
  '201607.jpg',
)


@pytest.fixture
def src_dir(tmp_path, celeba_dir):
  d = tmp_path / 'src'
  for rel in FILES:
    (d / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(celeba_dir / pathlib.Path(rel).name, d / rel)
  (d / 'broken.png').write_text('not a png')
  return d


def _data_cfg(test_config, out, name, split_res=R):
  d = test_config.data
  d.update(source='tfds', tfds_name=name, tfds_data_dir=str(out), resolution=split_res)
  return d


def _read_all(source):
  return {source[i]['name']: source[i]['image'] for i in range(len(source))}


def test_round_trip_and_rerun(tmp_path, src_dir, test_config, caplog):
  out = tmp_path / 'tfds'
  argv = [
    '--src',
    str(src_dir),
    '--name',
    'tiny',
    '--resolution',
    str(R),
    '--out',
    str(out),
    '--val_fraction',
    '0.4',
    '--workers',
    '0',
  ]
  assert prepare.main(argv) == 0
  assert 'broken.png' in caplog.text  # the bad file is logged with its name

  d = _data_cfg(test_config, out, 'idm_faces/tiny')
  train = _read_all(sources.make_source(d, 'train'))
  val = _read_all(sources.make_source(d, 'validation'))
  assert set(train) | set(val) == set(FILES)  # bad file skipped, names are relative
  assert not set(train) & set(val)
  for rel in FILES:  # split decided by the name's stable hash
    expected = prepare.assign_split(rel, 0.4)
    assert rel in (val if expected == 'validation' else train)
  assert train and val
  for rel, image in {**train, **val}.items():  # lossless: exactly load_image of the file
    np.testing.assert_array_equal(image, sources.load_image(src_dir / rel, R))
  # The short name resolves to the same dataset.
  d.tfds_name = 'tiny'
  assert _read_all(sources.make_source(d, 'train')).keys() == train.keys()
  assert [p.name for p in out.iterdir()] == ['idm_faces']  # no temp folders left behind

  # Worker processes receive the source by cloudpickle; it must reopen and read the same.
  src = sources.make_source(d, 'train')
  clone = cloudpickle.loads(cloudpickle.dumps(src))
  assert clone[0]['name'] == src[0]['name']
  np.testing.assert_array_equal(clone[0]['image'], src[0]['image'])
  # And the training pipeline reads it (unconditional: no degradation module needed here).
  test_config.model.conditional = False
  test_config.train.batch_size = 2
  with pipeline.train_iterator(test_config) as it:
    batch = next(it)
  assert batch['hq'].shape == (2, R, R, 3)
  assert any(
    np.array_equal(batch['hq'][0], im) or np.array_equal(batch['hq'][0], im[:, ::-1])
    for im in train.values()
  )

  # Re-running leaves the complete dataset alone...
  files = sorted((out / 'idm_faces' / 'tiny').rglob('*'))
  mtimes = [p.stat().st_mtime_ns for p in files]
  (src_dir / '201600.jpg').unlink()
  assert prepare.main(argv) == 0
  assert [p.stat().st_mtime_ns for p in files] == mtimes
  assert len(sources.make_source(d, 'train')) + len(sources.make_source(d, 'validation')) == 8

  # ...and --overwrite rebuilds it from the current folder, at the new resolution.
  argv[argv.index(str(R))] = '16'
  assert prepare.main(argv + ['--overwrite']) == 0
  d.resolution = 16
  rebuilt = {
    **_read_all(sources.make_source(d, 'train')),
    **_read_all(sources.make_source(d, 'validation')),
  }
  assert set(rebuilt) == set(FILES) - {'201600.jpg'}
  for rel, image in rebuilt.items():
    np.testing.assert_array_equal(image, sources.load_image(src_dir / rel, 16))
  assert [p.name for p in out.iterdir()] == ['idm_faces']


def test_split_hash_is_stable():
  # Pinned values: a change in the hash would silently move images between train and validation
  # of datasets prepared before and after it.
  assert sources.stable_fraction('00000/00000.png') == pytest.approx(0.8324025613050519, abs=0)
  assert sources.stable_fraction('a.png') == pytest.approx(0.49620164686382306, abs=0)
  assert prepare.assign_split('a.png', 0.5) == 'validation'
  assert prepare.assign_split('a.png', 0.4) == 'train'
  fracs = np.array([sources.stable_fraction(f'{i:05d}/{i:05d}.png') for i in range(4000)])
  assert 0.04 < np.mean(fracs < 0.05) < 0.06  # val_fraction is honoured on average


def test_bad_arguments(tmp_path, src_dir):
  out = str(tmp_path / 'o')
  assert (
    prepare.main(
      ['--src', str(tmp_path / 'missing'), '--name', 'x', '--resolution', '32', '--out', out]
    )
    == 1
  )
  assert (
    prepare.main(['--src', str(src_dir), '--name', 'a/b', '--resolution', '32', '--out', out]) == 1
  )


def test_missing_dataset_error_names_it(tmp_path, test_config):
  d = _data_cfg(test_config, tmp_path, 'idm_faces/nothing_here')
  with pytest.raises(FileNotFoundError, match='nothing_here'):
    sources.make_source(d, 'train')
