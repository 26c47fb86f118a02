"""Cloud TPU chips and slices: each chip's HBM and bf16 peak, libtpu's topology name for a Cloud
TPU accelerator type, and a slice's abstract devices (libtpu's, on a CPU host)."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re

from jax.experimental import topologies

GiB = 2**30


# Per chip, from Google's published Cloud TPU specifications: HBM and peak bf16 FLOP/s.
# v4 and v5p run as one "megacore" device per chip, so a device is a chip on every kind here.
@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  hbm_bytes: int
  peak_bf16_flops: float


CHIPS = {
  'TPU v4': Chip('v4', 32 * GiB, 275e12),
  'TPU v5 lite': Chip('v5e', 16 * GiB, 197e12),
  'TPU v5': Chip('v5p', 95 * GiB, 459e12),
  'TPU v6 lite': Chip('v6e', 32 * GiB, 918e12),
}

# Chips of the standard slice shapes, by the TensorCore or chip count of the accelerator type.
_SHAPES_2D = {
  1: '1x1',
  4: '2x2',
  8: '2x4',
  16: '4x4',
  32: '4x8',
  64: '8x8',
  128: '8x16',
  256: '16x16',
}
_SHAPES_3D = {
  4: '2x2x1',
  8: '2x2x2',
  16: '2x2x4',
  32: '2x4x4',
  64: '4x4x4',
  128: '4x4x8',
  256: '4x8x8',
  512: '8x8x8',
  1024: '8x8x16',
  2048: '8x16x16',
  4096: '16x16x16',
}
# accelerator-type prefix -> (libtpu's name, type number counts TensorCores (2 per chip))
_ACCELERATORS = {
  'v5litepod': ('v5e', False),
  'v5e': ('v5e', False),
  'v6e': ('v6e', False),
  'v4': ('v4', True),
  'v5p': ('v5p', True),
}


def topology_name(topology: str) -> str:
  """libtpu's topology name ('v5e:4x4', 'v4:2x2x4', ...) for itself or for a Cloud TPU
  accelerator type ('v5litepod-16', 'v4-32', 'v5p-128', 'v6e-16')."""
  if ':' in topology:
    return topology
  m = re.fullmatch(r'([a-z0-9]+)-([0-9]+)', topology)
  if not m or m.group(1) not in _ACCELERATORS:
    raise ValueError(
      f'--topology: {topology!r} is neither a libtpu topology (v5e:4x4, '
      'v4:2x2x4, v5p:4x4x4) nor an accelerator type (v5litepod-16, v4-32, '
      'v5p-128, v6e-16)'
    )
  kind, per_core = _ACCELERATORS[m.group(1)]
  n = int(m.group(2))
  chips = n // 2 if per_core else n
  shapes = _SHAPES_3D if per_core else _SHAPES_2D
  if chips not in shapes:
    raise ValueError(
      f'--topology: no standard slice shape for {topology} ({chips} chips); give it as {kind}:AxBxC'
    )
  return f'{kind}:{shapes[chips]}'


def topology_devices(topology: str, num_slices: int = 1):
  """The abstract devices of `num_slices` slices of `topology` (needs libtpu)."""
  name = topology_name(topology)
  kwargs = {}
  if num_slices > 1:
    kwargs['num_slices'] = num_slices
  if name.startswith('v4:'):
    # A Cloud TPU v4 VM runs one device per chip (megacore); libtpu's default is one per core.
    kwargs['chip_config_name'] = 'megacore'
  dims = [int(d) for d in name.split(':')[1].split('x')]
  if len(dims) == 2 and math.prod(dims) < 4:
    # Slices smaller than libtpu's default 2x2 host (v5e-1, v6e-1) are one host of that shape.
    kwargs['chips_per_host_bounds'] = (*dims, 1)
  if importlib.util.find_spec('libtpu') is None:
    raise RuntimeError('AOT compiles for TPU topologies need libtpu: pip install -e ".[tpu]"')
  try:
    return list(topologies.get_topology_desc(topology_name=name, platform='tpu', **kwargs).devices)
  except Exception as e:  # e.g. a shape libtpu does not know
    raise ValueError(f'--topology={topology}: libtpu has no topology {name!r}: {e}') from e


def chip_of(devices) -> Chip:
  kind = devices[0].device_kind
  if kind not in CHIPS:
    raise ValueError(f'no HBM and peak figures for {kind!r}; add it to idm_jax.aot.chips.CHIPS')
  return CHIPS[kind]
