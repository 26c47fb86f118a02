"""aot/chips.py: topology names (libtpu's own, and Cloud TPU accelerator types). The abstract
devices of a topology need libtpu: tests/test_aot.py."""

import pytest

from idm_jax.aot import chips


@pytest.mark.parametrize(
  'name, expected',
  [
    ('v5e:4x4', 'v5e:4x4'),
    ('v5litepod-16', 'v5e:4x4'),
    ('v5litepod-256', 'v5e:16x16'),
    ('v4-32', 'v4:2x2x4'),
    ('v5p-128', 'v5p:4x4x4'),
    ('v6e-8', 'v6e:2x4'),
  ],
)
def test_topology_name(name, expected):
  assert chips.topology_name(name) == expected


@pytest.mark.parametrize('name', ['v4-12', 'tpu-16', 'v5e'])
def test_topology_name_rejects_unknown_shapes(name):
  with pytest.raises(ValueError, match='--topology'):
    chips.topology_name(name)
