"""Export: one msgpack file with config + params; round trip, atomic write, clear errors."""

import os

from conftest import load_config
from flax import serialization
import jax
import numpy as np
import pytest

from idm_jax.inference import engine
from idm_jax.inference import export
from idm_jax.runtime import configlib


@pytest.fixture(scope='module')
def config_and_params():
  config = load_config('test')
  config.sample.steps = 3  # a non-default value must survive the trip
  params = engine.random_params(configlib.build_model(config.model, config.data.resolution), 3)
  return config, params


def _assert_same_params(a, b):
  la, ta = jax.tree_util.tree_flatten_with_path(a)
  lb, tb = jax.tree_util.tree_flatten_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    assert np.asarray(x).dtype == np.asarray(y).dtype, path
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def test_round_trip(tmp_path, config_and_params):
  config, params = config_and_params
  path = str(tmp_path / 'model.msgpack')
  export.save_exported(path, config, params)
  assert os.listdir(tmp_path) == ['model.msgpack']  # no temp file left behind
  config2, params2 = export.load_exported(path)
  assert configlib.to_json(config2) == configlib.to_json(config)
  assert config2.sample.steps == 3
  assert isinstance(config2.model.channel_mult, tuple)
  _assert_same_params(params, params2)
  # The file is plain msgpack with the documented layout (no pickle anywhere).
  with open(path, 'rb') as f:
    raw = serialization.msgpack_restore(f.read())
  assert set(raw) == {'format', 'config', 'params'} and raw['format'] == export.FORMAT


def test_load_reads_an_export(tmp_path, config_and_params):
  config, params = config_and_params
  path = str(tmp_path / 'model.msgpack')
  export.save_exported(path, config, params)
  r, step = engine.load(path)
  assert step is None
  assert r.resolution == config.data.resolution and r.config.sample.steps == 3
  _assert_same_params(params, jax.device_get(r.params))
  with pytest.raises(FileNotFoundError, match='nope'):
    engine.load(str(tmp_path / 'nope'))


def test_bad_files_give_clear_errors(tmp_path, config_and_params):
  config, params = config_and_params
  good = tmp_path / 'good.msgpack'
  export.save_exported(str(good), config, params)
  data = good.read_bytes()
  cases = {
    'truncated.msgpack': (data[: len(data) // 2], 'corrupt, truncated'),
    'garbage.msgpack': (b'\x00\x01not msgpack at all' * 10, 'not an idm_jax model export'),
    'empty.msgpack': (b'', 'empty'),
    'other.msgpack': (serialization.msgpack_serialize({'a': np.zeros(3)}), 'no format tag'),
    'future.msgpack': (
      serialization.msgpack_serialize({'format': 'idm_jax/99', 'config': '{}', 'params': {}}),
      'idm_jax/99',
    ),
    'noparams.msgpack': (
      serialization.msgpack_serialize({'format': export.FORMAT, 'config': '{}'}),
      'lacks',
    ),
  }
  for name, (content, msg) in cases.items():
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(export.ExportError) as e:
      export.load_exported(str(path))
    assert name in str(e.value) and msg in str(e.value), (name, str(e.value))
  with pytest.raises(FileNotFoundError, match='missing.msgpack'):
    export.load_exported(str(tmp_path / 'missing.msgpack'))


def test_main_exports_a_workdir_and_never_overwrites(tmp_path, monkeypatch, config_and_params):
  config, params = config_and_params
  from idm_jax.training import checkpoints

  seen = []

  def fake_load(workdir):
    seen.append(workdir)
    return config, params, 7

  monkeypatch.setattr(checkpoints, 'load_for_inference', fake_load)
  out = tmp_path / 'out' / 'model.msgpack'
  assert export.main(['--workdir', 'W', '--out', str(out)]) == 0
  assert seen == ['W']
  _assert_same_params(params, export.load_exported(str(out))[1])
  before = out.read_bytes()
  assert export.main(['--workdir', 'W', '--out', str(out)]) == 2  # exists: refused
  assert out.read_bytes() == before
  assert export.main(['--workdir', 'W', '--out', str(out), '--force']) == 0
  assert sorted(os.listdir(out.parent)) == ['model.msgpack']
