"""Tests for the make_testset CLI: layout, reproducibility, replay, bad files, refusals."""

import json
import shutil

import numpy as np
from PIL import Image
import pytest

from idm_jax.data import degradations
from idm_jax.data import make_testset
from idm_jax.storage import images


@pytest.fixture
def src(tmp_path, celeba_dir):
  """4 real faces (one in a subfolder), a non-square RGBA PNG, and three bad files."""
  d = tmp_path / 'src'
  (d / 'sub').mkdir(parents=True)
  faces = sorted(celeba_dir.glob('*.jpg'))[:4]
  for f in faces[:3]:
    shutil.copy(f, d / f.name)
  shutil.copy(faces[3], d / 'sub' / 'nested.JPG')
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (70, 50, 4), dtype=np.uint8), 'RGBA').save(d / 'wide.png')
  (d / 'empty.jpg').write_bytes(b'')
  (d / 'text.png').write_text('not an image')
  (d / 'truncated.jpg').write_bytes(faces[0].read_bytes()[:300])
  (d / 'notes.txt').write_text('ignored: not an image extension')
  return d


def _pixels(path):
  return np.asarray(Image.open(path))


def _run(src, dst, *extra):
  return make_testset.main(
    ['--src', str(src), '--dst', str(dst), '--seed', '3', '--resolution', '64', *extra]
  )


def test_layout_params_and_bad_files(src, tmp_path, capsys, caplog):
  dst = tmp_path / 'out'
  assert _run(src, dst) == 0
  summary = capsys.readouterr().out
  assert 'written 5, skipped 3' in summary and 'zero bytes: 1' in summary
  assert 'cannot decode: 2' in summary
  for bad in ('empty.jpg', 'text.png', 'truncated.jpg'):
    assert bad in caplog.text  # each skipped file is named in the log

  names = sorted(p.stem for p in (dst / 'hq').glob('*.png'))
  assert names == sorted(p.stem for p in (dst / 'lq').glob('*.png'))
  assert len(names) == 5 and 'sub_nested' in names and 'wide' in names
  assert not list(dst.rglob('*.tmp'))  # no temp files left behind
  recs = [json.loads(line) for line in (dst / 'params.jsonl').read_text().splitlines()]
  assert sorted(r['name'] for r in recs) == names
  for r in recs:
    hq = _pixels(dst / 'hq' / f'{r["name"]}.png')
    lq = _pixels(dst / 'lq' / f'{r["name"]}.png')
    assert hq.shape == lq.shape == (64, 64, 3) and hq.dtype == np.uint8
    assert r['params']['flip'] is False
    # The stored LQ is exactly the degradation of the stored HQ with the stored params.
    np.testing.assert_array_equal(lq, degradations.apply(hq, r['params']))
    assert np.any(lq != hq)
  # Params come from default_rng([seed, index in the sorted file list]).
  files = make_testset.list_images(src)
  idx = [make_testset.source_name(src, f) for f in files].index(recs[0]['source'])
  expect = degradations.sample_params(
    np.random.default_rng([3, idx]), make_testset.configlib.degradation_config('gfpgan'), 64
  )
  expect['flip'] = False
  assert recs[0]['params'] == expect


def test_non_square_is_centre_cropped(src, tmp_path):
  # 70 rows x 50 cols, decoded by the one reader (alpha on white, as training composites it).
  rgba = images.read(src / 'wide.png')
  got = make_testset.load_square(src / 'wide.png', 50)
  np.testing.assert_array_equal(got, rgba[10:60])


def test_reproducible_and_replay_byte_identical(src, tmp_path, capsys):
  a, b, c = tmp_path / 'a', tmp_path / 'b', tmp_path / 'c'
  assert _run(src, a) == 0 and _run(src, b) == 0
  # Replay with a different seed and preset: the recorded params win.
  assert (
    make_testset.main(
      [
        '--src',
        str(src),
        '--dst',
        str(c),
        '--seed',
        '99',
        '--preset',
        'codeformer_heavy',
        '--resolution',
        '64',
        '--replay',
        str(a / 'params.jsonl'),
      ]
    )
    == 0
  )
  for other in (b, c):
    assert (other / 'params.jsonl').read_text() == (a / 'params.jsonl').read_text()
    for sub in ('hq', 'lq'):
      for p in (a / sub).glob('*.png'):
        np.testing.assert_array_equal(_pixels(p), _pixels(other / sub / p.name))
  # A different seed gives different LQ images.
  d = tmp_path / 'd'
  assert (
    make_testset.main(['--src', str(src), '--dst', str(d), '--seed', '4', '--resolution', '64'])
    == 0
  )
  assert any(np.any(_pixels(p) != _pixels(d / 'lq' / p.name)) for p in (a / 'lq').glob('*.png'))


def test_a_bucket_source_and_destination_give_the_local_set(
  src, tmp_path, gcs_bucket, capsys, caplog
):
  """--src, --dst and --replay in a bucket: the same files, byte for byte, as a local run; the
  refusals (inside --src, not empty) hold there too."""
  from idm_jax.storage import files

  for rel in files.walk_files(src):
    files.copy_file(src / rel, f'{gcs_bucket}/faces/{rel}')
  local, dst = tmp_path / 'local', f'{gcs_bucket}/sets/test'
  assert _run(src, local) == 0
  assert _run(f'{gcs_bucket}/faces', dst) == 0
  assert 'written 5, skipped 3' in capsys.readouterr().out
  want = files.walk_files(local)
  assert files.walk_files(dst) == want and len(want) == 11  # 5 hq, 5 lq, params.jsonl
  assert 'hq/sub_nested.png' in want and 'lq/wide.png' in want
  for rel in want:
    assert files.read_bytes(files.join(dst, rel)) == (local / rel).read_bytes(), rel
  again = f'{gcs_bucket}/sets/again'
  assert (
    make_testset.main(
      [
        '--src',
        f'{gcs_bucket}/faces',
        '--dst',
        again,
        '--seed',
        '99',
        '--resolution',
        '64',
        '--replay',
        f'{dst}/params.jsonl',
      ]
    )
    == 0
  )
  for rel in want:
    assert files.read_bytes(files.join(again, rel)) == (local / rel).read_bytes(), rel
  caplog.clear()
  assert _run(f'{gcs_bucket}/faces', dst) == 2
  assert 'not empty; pass --overwrite' in caplog.text
  assert _run(f'{gcs_bucket}/faces', f'{gcs_bucket}/faces/out') == 2
  assert 'inside --src' in caplog.text
  assert files.walk_files(f'{gcs_bucket}/faces') == files.walk_files(src)  # never written


def test_refusals(src, tmp_path, capsys):
  assert _run(src, src / 'out') == 2  # inside --src
  assert not (src / 'out').exists()
  dst = tmp_path / 'out'
  dst.mkdir()
  (dst / 'keep.txt').write_text('user data')
  assert _run(src, dst) == 2  # non-empty without --overwrite
  assert not (dst / 'hq').exists()
  assert _run(src, dst, '--overwrite') == 0
  assert (dst / 'keep.txt').read_text() == 'user data'
  (tmp_path / 'afile').write_text('x')
  assert _run(src, tmp_path / 'afile', '--overwrite') == 2  # not a folder
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"name": "x"}\n')
  assert _run(src, tmp_path / 'o2', '--replay', str(bad)) == 2
  bad.write_text('{"name": "x", "params": {"scale": 2.0}}\n')
  assert _run(src, tmp_path / 'o3', '--replay', str(bad)) == 2


def test_nothing_written_returns_1(tmp_path, capsys):
  src = tmp_path / 'only_bad'
  src.mkdir()
  (src / 'a.png').write_bytes(b'')
  assert _run(src, tmp_path / 'out') == 1
  assert 'written 0, skipped 1' in capsys.readouterr().out
