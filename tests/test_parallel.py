"""The mesh's shape and the logical-axis rules that decide how each parameter is sharded.

The multi-device behaviour (a sharded train step equals the single-device one, restoring across
mesh shapes) is tested in test_train.py on simulated devices; these are the rules themselves, on
abstract meshes (no devices needed).
"""

from conftest import load_config
import flax.linen as nn
import jax
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P
import ml_collections
import pytest

from idm_jax.models import unet
from idm_jax.runtime import configlib
from idm_jax.runtime import parallel

MESH = AbstractMesh((2, 4), parallel.MESH_AXES)  # data 2, fsdp 4
CONV = ('conv_h', 'conv_w', 'conv_in', 'conv_out')


def _mesh_cfg(data, fsdp):
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp))


def test_mesh_shape_resolves_the_rest_and_refuses_what_does_not_multiply():
  assert parallel.mesh_shape(_mesh_cfg(-1, 1), 8) == (8, 1)
  assert parallel.mesh_shape(_mesh_cfg(2, -1), 8) == (2, 4)
  assert parallel.mesh_shape(_mesh_cfg(2, 4), 8) == (2, 4)
  with pytest.raises(ValueError, match='at most one axis'):
    parallel.mesh_shape(_mesh_cfg(-1, -1), 8)
  with pytest.raises(ValueError, match='not divisible by 3'):
    parallel.mesh_shape(_mesh_cfg(3, -1), 8)
  with pytest.raises(ValueError, match='data=2 x fsdp=2 != 8 devices'):
    parallel.mesh_shape(_mesh_cfg(2, 2), 8)


def test_conv_kernels_shard_their_output_channels_over_fsdp():
  assert parallel._spec_for(CONV, (3, 3, 64, 128), MESH, 0) == P(None, None, None, 'fsdp')
  assert parallel._spec_for(('embed_in', 'embed_out'), (128, 512), MESH, 0) == P(None, 'fsdp')


def test_what_cannot_shard_evenly_or_is_small_is_replicated():
  # 126 output channels do not split over 4 devices: replicated, not an uneven shard.
  assert parallel._spec_for(CONV, (3, 3, 64, 126), MESH, 0) == P(None, None, None, None)
  # Below min_size the whole tensor is replicated (the gather would cost more than it saves).
  assert parallel._spec_for(CONV, (3, 3, 4, 8), MESH, 1024) == P()
  assert parallel._spec_for(None, (3, 3, 64, 128), MESH, 0) == P()  # unannotated
  # Biases and norms ('channels') replicate whatever their size.
  assert parallel._spec_for(('channels',), (4096,), MESH, 0) == P(None)


def test_a_mesh_axis_shards_one_dimension_at_most():
  assert parallel._spec_for(('embed_out', 'conv_out'), (512, 512), MESH, 0) == P('fsdp', None)


def test_the_batch_splits_over_every_device():
  spec = parallel._spec_for(('batch', 'height', 'width', 'channels'), (16, 8, 8, 3), MESH, 0)
  assert spec == P(('data', 'fsdp'), None, None, None)
  # A batch that 8 devices do not divide is not split (the pipeline refuses it earlier).
  assert parallel._spec_for(('batch',), (12,), MESH, 0) == P(None)


def test_every_logical_name_the_model_uses_has_a_rule():
  """A layer annotated with a name the rules lack would be replicated without a word."""
  cfg = load_config('test')
  boxed = unet.param_shapes(configlib.build_model(cfg.model, cfg.data.resolution))
  names = set()
  for leaf in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
    assert isinstance(leaf, nn.Partitioned), leaf  # every parameter is annotated
    names.update(n for n in leaf.names if n is not None)
  assert names and names <= set(dict(parallel.LOGICAL_RULES)), names
  # And on a real mesh the big kernels do shard: some parameter gets 'fsdp'.
  specs = jax.tree.leaves(
    parallel.param_shardings(boxed, MESH, min_size=0),
    is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding),
  )
  assert any('fsdp' in s.spec for s in specs)
