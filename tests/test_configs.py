"""Configs: every file builds and validates; bad values fail naming the field; the CLI works."""

import pathlib
import subprocess
import sys

from conftest import REPO
from conftest import load_config
import pytest

from idm_jax.runtime import configlib

CONFIGS = sorted(p.stem for p in (REPO / 'configs').glob('*.py'))


def test_all_configs_present():
  assert set(CONFIGS) >= {
    'ffhq',
    'ffhq_256',
    'celeba_128',
    'demo',
    'test',
    'adm_sr_256',
    'adm_sr_512',
    'ffhq_generation',
  }


@pytest.mark.parametrize('name', CONFIGS)
def test_config_validates(name):
  configlib.validate(load_config(name))


@pytest.mark.parametrize(
  'field, value, message',
  [
    ('model.channel_mult', (1, 2, 2, 2, 2, 2, 2), 'model.channel_mult'),  # 32 px halved 6 times
    ('model.attention_resolutions', (24,), 'model.attention_resolutions'),
    ('model.head_channels', 12, 'model.head_channels'),
    ('sample.sampler', 'euler', 'sample.sampler'),
    ('clean.t_start', 1.5, 'clean.t_start'),
    ('clean.samples', 0, 'clean.samples'),
    ('diffusion.parameterization', 'score', 'diffusion.parameterization'),
    ('train.grad_accum_steps', 3, 'train.grad_accum_steps'),
    ('degradation.scale', (8.0, 0.8), 'degradation.scale'),
    ('degradation.mild_share', 1.5, 'degradation.mild_share'),
    ('degradation.mild.identity_prob', -0.1, 'degradation.mild.identity_prob'),
    ('degradation.mild.blur_sigma', (2.0, 1.0), 'degradation.mild.blur_sigma'),
    ('mode', 'fit', 'mode'),
    ('sample.guidance_scale', 2.0, 'sample.guidance_scale'),  # needs cond_drop_prob > 0
    ('clean.score', 'brisque', 'clean.score'),
    ('train.max_seconds', -1.0, 'train.max_seconds'),
    ('model.conditional', False, 'diffusion.residual'),  # with residual=True below
  ],
)
def test_bad_values_name_the_field(field, value, message):
  config = load_config('test')
  if message == 'diffusion.residual':
    config.diffusion.residual = True
  node = config
  *parents, leaf = field.split('.')
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(configlib.ConfigError, match=message.replace('.', r'\.')):
    configlib.validate(config)


TYPO_CONFIG = """
import ml_collections
from idm_jax.runtime import configlib

def get_config():
  c = configlib.base_config()
  c.data.source = 'builtin'
  {line}
  return c
"""


@pytest.mark.parametrize(
  'line, message',
  [
    # A misspelt field would be added silently and never read: named, with the nearest one.
    (
      'c.train.lerning_rate = 1e-3',
      'config.train.lerning_rate: no such field (did you mean config.train.learning_rate?)',
    ),
    (
      'c.update(dict(sampel=dict(steps=2)))',
      'config.sampel: no such field (did you mean config.sample?)',
    ),
    # A group rebuilt by hand bypasses ConfigDict's own type checks on assignment.
    (
      "c.train = ml_collections.ConfigDict(dict(c.train.to_dict(), batch_size='64'))",
      "config.train.batch_size: '64' is a string; this field takes a number (default 32)",
    ),
  ],
)
def test_a_typo_or_wrong_kind_in_a_config_file_is_one_line_naming_it(tmp_path, line, message):
  path = tmp_path / 'mine.py'
  path.write_text(TYPO_CONFIG.format(line=line))
  out = subprocess.run(
    [sys.executable, '-m', 'idm_jax.main', f'--config={path}', f'--workdir={tmp_path / "w"}'],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1] == f'error: {message}'
  assert 'Traceback' not in out.stderr and not (tmp_path / 'w').exists()


def test_json_round_trip_keeps_tuples():
  config = load_config('ffhq')
  back = configlib.from_json(configlib.to_json(config))
  assert back.model.channel_mult == config.model.channel_mult
  assert isinstance(back.model.channel_mult, tuple)
  assert back.to_dict() == config.to_dict()


def run_main(tmp_path, *args):
  return subprocess.run(
    [
      sys.executable,
      '-m',
      'idm_jax.main',
      '--config=configs/test.py',
      f'--workdir={tmp_path}',
      *args,
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )


def test_cli_rejects_a_bad_override_naming_the_field(tmp_path):
  out = run_main(tmp_path, '--config.sample.sampler=euler')
  assert out.returncode != 0
  assert 'config.sample.sampler' in out.stderr


def test_cli_trains_with_overrides(tmp_path):
  out = run_main(
    tmp_path,
    '--config.train.num_steps=2',
    '--config.train.batch_size=2',
    '--config.model.channels=8',
    '--config.model.num_groups=4',
    '--config.model.head_channels=8',
  )
  assert out.returncode == 0, out.stderr[-3000:]
  saved = configlib.from_json((pathlib.Path(tmp_path) / 'config_train.json').read_text())
  assert saved.model.channels == 8 and saved.train.batch_size == 2
  assert (pathlib.Path(tmp_path) / 'checkpoints' / '2').is_dir()
  assert list(pathlib.Path(tmp_path).glob('samples_*.png'))


def test_a_config_saved_before_a_field_existed_loads_with_its_default():
  """A checkpoint's config.json written by older code lacks newer fields; loading it gives them
  their defaults (which keep the old behaviour), so the libraries read every field directly."""
  import json

  saved = json.loads(configlib.to_json(load_config('test')))
  del saved['diffusion']['residual']
  del saved['clean']
  saved['model']['channels'] = 48  # what the file says wins over the default
  back = configlib.from_json(json.dumps(saved))
  assert back.diffusion.residual is False
  assert back.clean.to_dict() == configlib.base_config().clean.to_dict()
  assert back.model.channels == 48
  configlib.validate(back)
