"""experiments/generation.sh end to end at toy scale: clean, two generators, samples, scores."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

from conftest import REPO
import pytest

GENERATOR = (
  '--config.model.conditional=False --config.model.lq_concat=False '
  '--config.model.lq_encoder=False --config.train.num_steps=2 '
  '--config.train.ckpt_every=2 --config.generate.num_samples=6'
)


def _digest(folder):
  h = hashlib.sha256()
  for name in sorted(os.listdir(folder)):
    h.update(name.encode() + (folder / name).read_bytes())
  return h.hexdigest()


@pytest.mark.slow
def test_generation_script(tmp_path, celeba_dir, niqe_params_path):
  data = tmp_path / 'faces'
  data.mkdir()
  for p in sorted(celeba_dir.glob('*.jpg'))[:16]:
    shutil.copy(p, data / p.name)
  before = _digest(data)
  restorer = tmp_path / 'restorer'
  run = dict(cwd=REPO, capture_output=True, text=True, timeout=900)
  out = subprocess.run(
    [
      sys.executable,
      '-m',
      'idm_jax.main',
      '--config=configs/test.py',
      f'--workdir={restorer}',
      '--config.data.source=folder',
      f'--config.data.dir={data}',
      '--config.data.num_val=4',
    ],
    **run,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  env = dict(
    os.environ,
    RESTORER=str(restorer),
    DATA=str(data),
    NIQE=str(niqe_params_path),
    VAL='4',
    CONFIG='configs/test.py',
    EXTRA=GENERATOR,
    CLEAN_EXTRA='--config.clean.fraction=0.25 --config.clean.steps=2',
  )
  work = tmp_path / 'gen'
  out = subprocess.run(['bash', 'experiments/generation.sh', str(work)], env=env, **run)
  assert out.returncode == 0, out.stderr[-3000:]
  assert _digest(data) == before  # the source is never written to
  manifest = json.loads((work / 'cleaned' / 'manifest.json').read_text())
  assert manifest['counts'] == {'cleaned': 3, 'copied': 9, 'failed': 0}
  assert set(manifest['cleaned_niqe']) == {'before', 'after'}
  for version in ('original', 'cleaned'):
    samples = sorted(os.listdir(work / f'gen_{version}' / 'generated'))
    assert samples == [f'{i:06d}.png' for i in range(6)]
    metrics = json.loads((work / f'eval_{version}' / 'metrics.json').read_text())
    assert metrics['num_images'] == 6 and metrics['num_ref_images'] == 16
    assert metrics['ref_resized_to'] == '32x32'
    assert metrics['metrics']['fd_dlib']['mean'] > 0
    assert metrics['metrics']['niqe']['upscale'] == 6
    assert f'| {version} |' in out.stdout
  # The cleaned generator trained on the cleaned images, not the source.
  config = json.loads((work / 'gen_cleaned' / 'config_train.json').read_text())
  assert config['data']['source'] == 'folder' and config['data']['num_val'] == 0
  assert config['data']['dir'] == str(work / 'cleaned' / 'images')
