"""Device mesh, logical-axis sharding rules, and the multi-host helpers.

One engine scales the same program from one CPU to a TPU pod: jit over a `Mesh` with
`NamedSharding`s. The model names its axes (`conv_out`, `batch`, ...); the rules below map those
names onto the mesh axes `data` and `fsdp`. Small tensors stay replicated: sharding a 128-float
GroupNorm scale buys nothing and costs a collective.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os

from absl import logging
from flax import linen as nn
import jax
from jax._src import clusters  # the detectors have no public handle
from jax._src import distributed  # the coordination client has no public handle
from jax.experimental import mesh_utils
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

MESH_AXES = ('data', 'fsdp')
BATCH_AXES = ('data', 'fsdp')  # the batch is split over every device

# logical axis name -> mesh axis (None = replicated along that dimension)
LOGICAL_RULES = (
  ('batch', BATCH_AXES),
  ('height', None),
  ('width', None),
  ('tokens', None),
  ('channels', None),
  ('conv_h', None),
  ('conv_w', None),
  ('conv_in', None),
  ('conv_out', 'fsdp'),
  ('embed_in', None),
  ('embed_out', 'fsdp'),
)


@dataclasses.dataclass(frozen=True)
class Cluster:
  """Where this process runs, as `detect_cluster` found it.

  kind: 'none' (one machine), 'explicit' (JAX_COORDINATOR_ADDRESS), 'joined' (jax.distributed
  was initialised before us), or the name of the jax `ClusterEnv` that recognised it: 'gcetpu'
  (a Cloud TPU VM slice, from the GCE metadata server), 'gketpu' (GKE's TPU_WORKER_HOSTNAMES),
  'slurm', 'ompi', 'k8s'. num_processes / process_id: None where only jax can tell while
  joining (an explicit address without JAX_NUM_PROCESSES).
  """

  kind: str
  num_processes: int | None = 1
  process_id: int | None = 0

  @property
  def joins(self) -> bool:
    """Whether there is a job of several processes to join (a single-host slice is none)."""
    return self.kind not in ('none', 'joined') and self.num_processes != 1

  def describe(self) -> str:
    if self.kind == 'none':
      return 'no cluster found: one process'
    n = '?' if self.num_processes is None else self.num_processes
    i = '?' if self.process_id is None else self.process_id
    verb = (
      'already joined' if self.kind == 'joined' else 'joining' if self.joins else 'nothing to join'
    )
    return f'cluster {self.kind}: process {i} of {n}, {verb}'


def detect_cluster() -> Cluster:
  """Which cluster this process is part of, by jax's own detectors (`jax._src.clusters`), so a
  Cloud TPU VM slice (whose workers are listed only by the GCE metadata server), GKE, SLURM and
  Open MPI are all recognised as `jax.distributed.initialize()` would recognise them.

  JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES and JAX_PROCESS_ID) wins over any detector.
  On a machine without TPU chips jax never asks the metadata server (its detector checks first
  that it runs on a Cloud TPU VM, which jax decides at import from the PCI devices), so a laptop
  or CI machine does not wait on a network probe here.
  """
  env = os.environ
  if jax.distributed.is_initialized():
    return Cluster('joined', jax.process_count(), jax.process_index())
  if 'JAX_COORDINATOR_ADDRESS' in env:
    return _explicit_cluster(env)
  for cls in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
    if cls.opt_in_only_method:  # mpi4py: jax itself uses it only when asked by name
      continue
    try:
      present = cls.is_env_present()
    except Exception as e:  # pylint: disable=broad-except  (an unreachable metadata server, ...)
      logging.warning(
        'cluster %s: could not tell whether this process is in one (%s: %s); '
        'not joining through it',
        cls.name,
        type(e).__name__,
        e,
      )
      continue
    if present:
      try:
        return Cluster(cls.name, int(cls.get_process_count()), int(cls.get_process_id()))
      except Exception as e:  # pylint: disable=broad-except
        raise RuntimeError(
          f'cluster {cls.name} detected, but it did not say how many processes '
          f'the job has or which one this is: {type(e).__name__}: {e}'
        ) from e
  return Cluster('none')


def _explicit_cluster(env) -> Cluster:
  """JAX_COORDINATOR_ADDRESS, and if given JAX_NUM_PROCESSES and JAX_PROCESS_ID (jax itself
  reads only the address from the environment)."""

  def number(name):
    if name not in env:
      return None
    try:
      return int(env[name])
    except ValueError:
      raise ValueError(f'{name}={env[name]!r} is not a whole number') from None

  num, pid = number('JAX_NUM_PROCESSES'), number('JAX_PROCESS_ID')
  if (num is None) != (pid is None):
    missing = 'JAX_PROCESS_ID' if pid is None else 'JAX_NUM_PROCESSES'
    raise ValueError(
      f'JAX_COORDINATOR_ADDRESS is set with only one of JAX_NUM_PROCESSES and '
      f'JAX_PROCESS_ID; set {missing} too (or neither, for jax to detect both)'
    )
  if num is not None and not 0 <= pid < num:
    raise ValueError(f'JAX_PROCESS_ID={pid} is not in [0, JAX_NUM_PROCESSES={num})')
  return Cluster('explicit', num, pid)


def maybe_initialize_distributed() -> Cluster:
  """Joins a multi-host job when there is one (`detect_cluster`); a no-op on a single machine.
  Logs what it found in one line and returns it. Must run before anything touches a device."""
  cluster = detect_cluster()
  logging.info('%s', cluster.describe())
  if not cluster.joins:
    return cluster
  if cluster.kind == 'explicit':
    kwargs = dict(coordinator_address=os.environ['JAX_COORDINATOR_ADDRESS'])
    if cluster.num_processes is not None:
      kwargs.update(num_processes=cluster.num_processes, process_id=cluster.process_id)
  else:  # the same detector fills in the coordinator, count and index
    kwargs = dict(cluster_detection_method=cluster.kind)
  jax.distributed.initialize(**kwargs)
  logging.info(
    'jax.distributed: process %d of %d, %d local / %d global devices',
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  return cluster


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int]:
  """Resolves -1 ('the rest') and checks that the axes multiply to the device count."""
  sizes = [int(mesh_cfg.data), int(mesh_cfg.fsdp)]
  if sizes.count(-1) > 1:
    raise ValueError('config.mesh: at most one axis may be -1')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f'config.mesh: {num_devices} devices are not divisible by {known}')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f'config.mesh: data={sizes[0]} x fsdp={sizes[1]} != {num_devices} devices')
  return tuple(sizes)


def num_slices(devices) -> int:
  """How many TPU slices (joined by the data-centre network) the devices span; 1 elsewhere."""
  return len({getattr(d, 'slice_index', 0) for d in devices})


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """The (data, fsdp) mesh over `devices` (default: all of jax.devices()): real, simulated, or
  an abstract TPU topology's (idm_jax.aot). Over several slices the data axis spans the slices, so
  only the gradient all-reduce crosses the slow network; fsdp stays inside a slice."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  axis_types = (jax.sharding.AxisType.Auto,) * 2
  slices = num_slices(devices)
  if slices == 1:
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  data, fsdp = shape
  if data % slices:
    raise ValueError(
      f'config.mesh.data: {data} is not a multiple of the {slices} slices; the '
      'data axis spans the slices and fsdp stays within one (fsdp must divide '
      f'the {len(devices) // slices} devices of a slice)'
    )
  grid = mesh_utils.create_hybrid_device_mesh(
    (data // slices, fsdp), (slices, 1), devices, allow_split_physical_axes=True
  )
  return Mesh(grid, MESH_AXES, axis_types=axis_types)


def sampling_mesh(devices=None) -> Mesh:
  """A mesh with all of `devices` (default: every process's) on the data axis, ordered by
  process so that each process's examples are one contiguous block of the global batch.

  Sampling splits the batch and replicates the params: it holds no optimiser state worth
  sharding. Over several processes one program spans every chip and the processes feed it in
  lockstep (`host_shares.map_in_batches`): TPU v5e slices beyond 16 chips compile a program over
  one chip or the whole slice, never over one host's chips (docs/TPU.md, "Sampling on a pod").
  """
  devices = sorted(
    jax.devices() if devices is None else devices, key=lambda d: (d.process_index, d.id)
  )
  return Mesh(np.array(devices).reshape(len(devices), 1), MESH_AXES)


def process_count_of(mesh: Mesh) -> int:
  """How many processes own devices of `mesh`: above 1, each call of a program over it is
  collective (every one of them must make it, with the same shapes)."""
  return len({d.process_index for d in mesh.devices.flat})


_agreements = itertools.count()


def max_over_processes(n: int, timeout_s: float = 3600.0) -> int:
  """The largest `n` any process passes; every process must call it, in the same order.

  Goes through the coordination service's key-value store, not a device collective, so a host
  still compiling its first sampler (minutes, at 512 px) does not time out the others' gloo
  setup on CPU, and a process that skipped a call shows as a timeout naming the agreement.
  """
  if jax.process_count() == 1:
    return int(n)
  client = distributed.global_state.client
  key = f'idm_jax/max/{next(_agreements)}'
  client.key_value_set(f'{key}/{jax.process_index()}', str(int(n)))
  try:
    return max(
      int(client.blocking_key_value_get(f'{key}/{p}', int(timeout_s * 1000)))
      for p in range(jax.process_count())
    )
  except Exception as e:  # the client raises a bare XlaRuntimeError on a timeout
    raise RuntimeError(
      f'{key}: not every process reached this agreement within {timeout_s:g} s '
      '(processes must make the same sampling calls in lockstep)'
    ) from e


def _spec_for(names, shape, mesh: Mesh, min_size: int) -> P:
  """PartitionSpec for one parameter from its logical names, replicating small or odd tensors."""
  if names is None or math.prod(shape) < min_size:
    return P()
  rules = dict(LOGICAL_RULES)
  spec = []
  used = set()
  for name, dim in zip(names, shape):
    axis = rules.get(name)
    axes = (axis,) if isinstance(axis, str) else tuple(axis or ())
    size = math.prod(mesh.shape[a] for a in axes) if axes else 1
    # A dimension is sharded only if it divides evenly and the mesh axis is not used twice.
    if axes and size > 1 and dim % size == 0 and not used.intersection(axes):
      spec.append(axes[0] if len(axes) == 1 else axes)
      used.update(axes)
    else:
      spec.append(None)
  return P(*spec)


def param_shardings(boxed_params, mesh: Mesh, min_size: int):
  """NamedShardings for a (possibly abstract) pytree whose leaves are `nn.Partitioned` boxes."""

  def one(leaf):
    if isinstance(leaf, nn.Partitioned):
      spec = _spec_for(leaf.names, leaf.value.shape, mesh, min_size)
    else:
      spec = P()
    return NamedSharding(mesh, spec)

  return jax.tree.map(one, boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def mesh_platform(mesh) -> str:
  """The platform of the mesh's devices ('tpu', 'gpu', 'cpu'): from the mesh, not from
  jax.default_backend(), so an AOT compile for a TPU topology on a CPU host sees 'tpu'."""
  return mesh.devices.flat[0].platform


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def local_batch_to_global(local_batch: dict, mesh: Mesh) -> dict:
  """Host-local numpy batches -> one global jax.Array per key, split over the batch axes."""
  sharding = batch_sharding(mesh)
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
    for k, v in local_batch.items()
  }


def barrier(name: str, timeout_s: float = 3600.0) -> None:
  """Waits until every process reaches `name`, through the coordination service (no device
  collective). Called between compiling and first running a program with cross-process
  collectives: hosts compile at different speeds, and on CPU gloo gives up setting up its first
  collective after 30 s, which a slow or busy host can exceed."""
  if jax.process_count() == 1:
    return
  distributed.global_state.client.wait_at_barrier(f'idm_jax/{name}', int(timeout_s * 1000))


def to_host(tree):
  """Fetches a (replicated or sharded) pytree to host numpy on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


@contextlib.contextmanager
def mesh_rules(mesh: Mesh):
  """Mesh + logical rules for tracing: the model's `nn.with_logical_constraint` annotations then
  become sharding constraints on this mesh. jax.set_mesh must be entered outside jit, so wrap
  the first call (or `.lower()`) of a jitted function in this, not the function body."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    yield
