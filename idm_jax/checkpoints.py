"""Checkpoints: orbax's CheckpointManager over the train state, the data iterator and the config.

Layout of WORKDIR/checkpoints/<step>/:
  train/   step, params, optimiser state, RNG key (sharded arrays, restorable on any mesh)
  ema/     EMA params (a separate item so inference restores only what it needs)
  data/    the grain iterator state, one JSON file per process
  config/  the run's config as JSON (a checkpoint describes itself)
  progress/  JSON: training wall-clock seconds so far (train.max_seconds counts across resumes)
Saves are asynchronous and atomic: orbax writes into a temporary folder and renames it when the
save completes, so a run killed mid-save leaves the previous checkpoint as the latest one.
"""
from __future__ import annotations

import json
import logging
import os

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from idm_jax import configlib

CHECKPOINT_DIR = 'checkpoints'


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


class Checkpointer:
  """A thin wrapper that knows our items; every process must call every method (collectives)."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
    self.directory = checkpoint_dir(workdir)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers=dict(train=ocp.StandardCheckpointHandler(),
                           ema=ocp.StandardCheckpointHandler(),
                           data=grain.checkpoint.CheckpointHandler(),
                           config=ocp.JsonCheckpointHandler(),
                           progress=ocp.JsonCheckpointHandler()))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator, config, *, force: bool = False,
           train_seconds: float = 0.0) -> bool:
    train, ema = split_state(state)
    items = dict(train=ocp.args.StandardSave(train), ema=ocp.args.StandardSave(ema),
                 config=ocp.args.JsonSave(json.loads(configlib.to_json(config))),
                 progress=ocp.args.JsonSave(dict(train_seconds=float(train_seconds))))
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointSave(_IteratorState(data_iterator))
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restores into `abstract_state`'s shapes and shardings (any mesh); sets the iterator."""
    train, ema = split_state(abstract_state)
    items = dict(train=ocp.args.StandardRestore(train), ema=ocp.args.StandardRestore(ema))
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(_IteratorState(data_iterator))
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return merge_state(restored['train'], restored['ema'])

  def train_seconds(self, step: int) -> float:
    """Training wall-clock seconds recorded with a checkpoint (0 for checkpoints written before
    it was recorded)."""
    if not os.path.isdir(os.path.join(self.directory, str(step), 'progress')):
      return 0.0
    restored = self.manager.restore(step, args=ocp.args.Composite(progress=ocp.args.JsonRestore()))
    return float(restored['progress'].get('train_seconds', 0.0))

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


class _IteratorState:
  """Adapts our data iterator (JSON-able dict state) to grain's orbax handler, which writes one
  file per process of whatever bytes get_state() returns."""

  def __init__(self, iterator):
    self.iterator = iterator

  def get_state(self) -> bytes:
    return json.dumps(self.iterator.get_state()).encode()

  def set_state(self, state: bytes) -> None:
    self.iterator.set_state(json.loads(state))

  def start_prefetch(self) -> None:   # grain's handler calls this after restoring
    pass


def split_state(state):
  """TrainState -> (everything but EMA, EMA params), as two pytrees of arrays."""
  train = dict(step=state.step, params=state.params, opt_state=state.opt_state, rng=state.rng,
               bad_step=state.bad_step)
  return train, state.ema


def merge_state(train: dict, ema):
  from idm_jax.train import TrainState  # train imports us; import here to avoid a cycle
  return TrainState(step=train['step'], params=train['params'], ema=ema,
                    opt_state=train['opt_state'], rng=train['rng'], bad_step=train['bad_step'])


def read_config(workdir: str, step: int | None = None) -> ml_collections.ConfigDict:
  """The config saved with a workdir's latest (or given) complete checkpoint."""
  manager = ocp.CheckpointManager(checkpoint_dir(workdir),
                                  options=ocp.CheckpointManagerOptions(read_only=True),
                                  item_handlers=dict(config=ocp.JsonCheckpointHandler()))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'{workdir}: no complete checkpoint found')
  cfg = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
  manager.close()
  return configlib.from_json(json.dumps(cfg))


def load_for_inference(workdir: str, step: int | None = None):
  """(config, EMA params) of the latest complete checkpoint, as single-device arrays."""
  from idm_jax.models import unet  # heavy; only inference needs it here
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'{workdir}: no {CHECKPOINT_DIR}/ folder; is this a training workdir?')
  config = read_config(workdir, step)
  model = unet.build_model(config.model, config.data.resolution)
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
      unet_abstract_params(model))
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                                  item_handlers=dict(ema=ocp.StandardCheckpointHandler()))
  step = manager.latest_step() if step is None else step
  ema = manager.restore(step, args=ocp.args.Composite(ema=ocp.args.StandardRestore(abstract)))['ema']
  manager.close()
  logging.info('loaded EMA params of %s at step %d', workdir, step)
  return config, ema


def unet_abstract_params(model):
  """Unboxed abstract params of a model (shapes and dtypes only, nothing allocated)."""
  from flax.linen import meta
  from idm_jax.models import unet
  return meta.unbox(unet.param_shapes(model))
