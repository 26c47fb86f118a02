"""contaminate: seeded and recorded, byte-replayable from its manifest, the source untouched."""

import hashlib
import json
import os

import numpy as np
from PIL import Image
import pytest

from idm_jax.data import contaminate


def _digest(folder):
  h = hashlib.sha256()
  for name in sorted(os.listdir(folder)):
    h.update(name.encode() + (folder / name).read_bytes())
  return h.hexdigest()


@pytest.fixture
def src(tmp_path):
  """20 smooth random 48x40 'faces' (a centre crop to 40 and a resize to 32 happen on load)."""
  d = tmp_path / 'src'
  d.mkdir()
  rng = np.random.default_rng(0)
  for i in range(20):
    base = rng.integers(0, 256, (6, 5, 3)).astype(np.uint8)
    img = Image.fromarray(base).resize((40, 48), Image.BICUBIC)
    img.save(d / f'{i:03d}.jpg', quality=95)
  return d


def _run(*args):
  return contaminate.main([str(a) for a in args])


def test_fraction_seed_manifest_and_source_untouched(src, tmp_path):
  before = _digest(src)
  dst = tmp_path / 'c'
  assert (
    _run(
      '--src',
      src,
      '--dst',
      dst,
      '--fraction',
      0.25,
      '--seed',
      3,
      '--resolution',
      32,
      '--skip_last',
      4,
    )
    == 0
  )
  assert _digest(src) == before
  m = json.loads((dst / 'manifest.json').read_text())
  chosen = [r for r in m['records'] if 'defect' in r]
  assert m['num_contaminated'] == len(chosen) == 4  # round(0.25 * 16 eligible)
  assert all(int(r['name'][:3]) < 16 for r in chosen)  # the last 4 stay pristine
  assert sorted(os.listdir(dst / 'images')) == [f'{i:03d}.png' for i in range(20)]
  for r in m['records']:
    assert Image.open(dst / 'images' / r['file']).size == (32, 32)
  # A pristine twin (fraction 0) differs from it exactly in the contaminated files.
  twin = tmp_path / 'p'
  assert _run('--src', src, '--dst', twin, '--fraction', 0, '--resolution', 32) == 0
  differ = {
    f
    for f in os.listdir(dst / 'images')
    if (dst / 'images' / f).read_bytes() != (twin / 'images' / f).read_bytes()
  }
  assert differ == contaminate.contaminated_names(m)
  # Another seed picks other files.
  other = tmp_path / 'o'
  assert (
    _run(
      '--src',
      src,
      '--dst',
      other,
      '--fraction',
      0.25,
      '--seed',
      4,
      '--resolution',
      32,
      '--skip_last',
      4,
    )
    == 0
  )
  m2 = json.loads((other / 'manifest.json').read_text())
  assert contaminate.contaminated_names(m2) != contaminate.contaminated_names(m)


def test_replay_is_byte_identical_and_rerun_keeps_the_dataset(src, tmp_path, capsys):
  dst = tmp_path / 'c'
  assert _run('--src', src, '--dst', dst, '--fraction', 0.5, '--resolution', 32) == 0
  again = tmp_path / 'again'
  assert _run('--replay', dst / 'manifest.json', '--dst', again) == 0
  assert _digest(dst / 'images') == _digest(again / 'images')
  assert (dst / 'manifest.json').read_bytes() == (again / 'manifest.json').read_bytes()
  # The same command on a finished dataset verifies it; a different one is refused.
  assert _run('--src', src, '--dst', dst, '--fraction', 0.5, '--resolution', 32) == 0
  assert _run('--src', src, '--dst', dst, '--fraction', 0.1, '--resolution', 32) == 2
  assert 'different contamination' in capsys.readouterr().err
  (dst / 'images' / '000.png').write_bytes(b'broken')
  assert _run('--src', src, '--dst', dst, '--fraction', 0.5, '--resolution', 32) == 2
  assert 'checksum' in capsys.readouterr().err


def test_a_bucket_source_and_destination_give_the_local_dataset(src, tmp_path, gcs_bucket, capsys):
  """--src, --dst and --replay in a bucket: the same images and records as a local run; a rerun
  verifies, a damaged file is found, and a replay from the bucket is byte-identical."""
  from idm_jax.storage import files

  for rel in files.walk_files(src):
    files.copy_file(src / rel, f'{gcs_bucket}/src/{rel}')
  args = ('--fraction', 0.25, '--seed', 3, '--resolution', 32, '--kinds', 'blur,jpeg')
  local, dst = tmp_path / 'c', f'{gcs_bucket}/sets/c'
  assert _run('--src', src, '--dst', local, *args) == 0
  assert _run('--src', f'{gcs_bucket}/src', '--dst', dst, *args) == 0
  want = [f'images/{i:03d}.png' for i in range(20)] + ['manifest.json']
  assert files.walk_files(dst) == files.walk_files(local) == want
  for rel in want[:-1]:
    assert files.read_bytes(files.join(dst, rel)) == (local / rel).read_bytes(), rel
  m = json.loads(files.read_text(files.join(dst, 'manifest.json')))
  assert m['src'] == f'{gcs_bucket}/src' and m['num_contaminated'] == 5
  assert m['records'] == json.loads((local / 'manifest.json').read_text())['records']
  capsys.readouterr()
  assert _run('--replay', f'{dst}/manifest.json', '--dst', f'{gcs_bucket}/sets/again') == 0
  assert capsys.readouterr().out.endswith(f'manifest {gcs_bucket}/sets/again/manifest.json\n')
  for rel in want:
    assert files.read_bytes(f'{gcs_bucket}/sets/again/{rel}') == files.read_bytes(
      files.join(dst, rel)
    ), rel
  # A finished dataset in the bucket is verified, not rebuilt; a damaged file is named.
  assert _run('--src', f'{gcs_bucket}/src', '--dst', dst, *args) == 0
  files.write_atomic(files.join(dst, 'images', '007.png'), b'broken')
  assert _run('--src', f'{gcs_bucket}/src', '--dst', dst, *args) == 2
  assert f'{dst}/images/007.png: missing or its checksum differs' in capsys.readouterr().err
  assert _run('--src', f'{gcs_bucket}/src', '--dst', f'{gcs_bucket}/src/inside', *args) == 2
  assert 'inside --src' in capsys.readouterr().err
  assert files.walk_files(f'{gcs_bucket}/src') == files.walk_files(src)  # never written


@pytest.mark.parametrize('kind', contaminate.KINDS)
def test_each_defect_is_mild_deterministic_and_changes_the_image(kind):
  rng = np.random.default_rng(1)
  img = np.asarray(
    Image.fromarray(rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)).resize(
      (64, 64), Image.BICUBIC
    )
  )
  defect = contaminate.sample_defect(0, 5, (kind,), contaminate.DEFAULT_RANGES)
  assert defect['kind'] == kind and defect == contaminate.sample_defect(
    0, 5, (kind,), contaminate.DEFAULT_RANGES
  )
  out = contaminate.apply_defect(img, defect)
  assert out.shape == img.shape and out.dtype == np.uint8
  np.testing.assert_array_equal(out, contaminate.apply_defect(img, defect))
  diff = np.abs(out.astype(float) - img)
  assert 0.3 < diff.mean() < 20  # visible, but mild


def test_bad_arguments_are_named(src, tmp_path, capsys):
  assert _run('--src', src, '--dst', src / 'inside') == 2
  assert 'inside --src' in capsys.readouterr().err
  assert _run('--src', src, '--dst', tmp_path / 'x', '--fraction', 1.5) == 2
  assert '--fraction' in capsys.readouterr().err
  assert _run('--src', src, '--dst', tmp_path / 'x', '--kinds', 'blur,smudge') == 2
  assert 'smudge' in capsys.readouterr().err
  assert _run('--src', tmp_path / 'nope', '--dst', tmp_path / 'x') == 2
  assert 'does not exist' in capsys.readouterr().err
