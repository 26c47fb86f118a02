"""Which cluster a process is part of (parallel.detect_cluster), by jax's own detectors, in each
environment a run meets: a Cloud TPU VM slice (its GCE metadata server, played by a real HTTP
server on 127.0.0.1 through jax's GCE_METADATA_IP), GKE, SLURM, explicit variables, and none.

The real two-process join through the metadata path is in test_multihost_modes.py.
"""

import os
import socket
import time

from gce_metadata import MetadataServer
from gce_metadata import tpu_vm_attributes
import jax
from jax._src.clusters import cloud_tpu_cluster
import pytest

from idm_jax.runtime import parallel

# Every variable a detector reads: the tests set what each environment has and nothing else.
CLUSTER_VARS = (
  'JAX_COORDINATOR_ADDRESS',
  'JAX_NUM_PROCESSES',
  'JAX_PROCESS_ID',
  'JAX_COORDINATOR_PORT',
  'TPU_WORKER_HOSTNAMES',
  'TPU_PROCESS_ADDRESSES',
  'TPU_WORKER_ID',
  'TPU_SKIP_MDS_QUERY',
  'MEGASCALE_COORDINATOR_ADDRESS',
  'MEGASCALE_NUM_SLICES',
  'MEGASCALE_SLICE_ID',
  'SLURM_JOB_ID',
  'SLURM_STEP_NODELIST',
  'SLURM_NTASKS',
  'SLURM_PROCID',
  'SLURM_LOCALID',
  'SLURM_STEP_NUM_NODES',
  'OMPI_MCA_orte_hnp_uri',
  'KUBERNETES_SERVICE_HOST',
  'GCE_METADATA_IP',
)


@pytest.fixture
def bare(monkeypatch):
  """A machine with none of the cluster variables, not a Cloud TPU VM (as jax decides at import
  from the PCI devices); a test turns on what its environment has."""
  for var in CLUSTER_VARS:
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setattr(cloud_tpu_cluster, 'running_in_cloud_tpu_vm', False)
  return monkeypatch


def on_tpu_vm(monkeypatch, server):
  """What a Cloud TPU VM worker looks like to jax: TPU chips seen at import (so no
  TPU_SKIP_MDS_QUERY) and its metadata server at GCE_METADATA_IP."""
  monkeypatch.setattr(cloud_tpu_cluster, 'running_in_cloud_tpu_vm', True)
  monkeypatch.setenv('GCE_METADATA_IP', server.address)


def test_a_laptop_finds_no_cluster_at_once_and_never_asks_the_metadata_server(bare):
  with MetadataServer(tpu_vm_attributes(1, ['10.0.0.2', '10.0.0.3'])) as server:
    bare.setenv('GCE_METADATA_IP', server.address)  # there, but a laptop must not ask it
    start = time.monotonic()
    cluster = parallel.maybe_initialize_distributed()
    elapsed = time.monotonic() - start
  assert cluster == parallel.Cluster('none') and not cluster.joins
  assert server.asked == []
  assert elapsed < 1.0
  assert not jax.distributed.is_initialized()


def test_this_machine_as_it_is_finds_no_cluster_promptly():
  """No patching at all: the CI machine or laptop the suite runs on (no TPU chips, no cluster
  variables in the test environment) is one process, decided without waiting."""
  # (A Kubernetes pod without jax's [k8s] extra, as CI may run in, is no cluster to jax.)
  if cloud_tpu_cluster.running_in_cloud_tpu_vm or any(
    v in os.environ for v in ('JAX_COORDINATOR_ADDRESS', 'SLURM_JOB_ID', 'OMPI_MCA_orte_hnp_uri')
  ):
    pytest.skip('this machine is a TPU VM or in a cluster: the other tests stand in for it')
  start = time.monotonic()
  assert parallel.detect_cluster() == parallel.Cluster('none')
  assert time.monotonic() - start < 1.0


def test_a_cloud_tpu_vm_slice_is_found_through_its_metadata_server(bare):
  with MetadataServer(tpu_vm_attributes(1, ['10.0.0.2', '10.0.0.3'])) as server:
    on_tpu_vm(bare, server)
    cluster = parallel.detect_cluster()
  assert cluster == parallel.Cluster('gcetpu', num_processes=2, process_id=1)
  assert cluster.joins
  assert 'agent-worker-number' in server.asked and 'worker-network-endpoints' in server.asked
  assert 'cluster gcetpu: process 1 of 2, joining' == cluster.describe()


def test_worker_endpoints_as_bare_host_names_count_too(bare):
  attributes = tpu_vm_attributes(3, ['w-0', 'w-1', 'w-2', 'w-3'], accelerator='v5litepod-16')
  attributes['worker-network-endpoints'] = 'w-0,w-1,w-2,w-3'
  with MetadataServer(attributes) as server:
    on_tpu_vm(bare, server)
    assert parallel.detect_cluster() == parallel.Cluster('gcetpu', 4, 3)


def test_a_single_host_slice_is_a_cluster_with_nothing_to_join(bare):
  with MetadataServer(tpu_vm_attributes(0, ['10.0.0.2'], accelerator='v4-8')) as server:
    on_tpu_vm(bare, server)
    cluster = parallel.maybe_initialize_distributed()
  assert cluster == parallel.Cluster('gcetpu', 1, 0) and not cluster.joins
  assert not jax.distributed.is_initialized()


def test_a_multislice_worker_counts_every_slice(bare):
  """Slice 1 of 2, worker 0 of its 2: process 2 of 4 (jax numbers slice by slice)."""
  env = {
    'MEGASCALE_NUM_SLICES': '2',
    'MEGASCALE_SLICE_ID': '1',
    'MEGASCALE_COORDINATOR_ADDRESS': '10.0.0.2:8080',
  }
  with MetadataServer(tpu_vm_attributes(0, ['10.0.1.2', '10.0.1.3'], tpu_env=env)) as server:
    on_tpu_vm(bare, server)
    assert parallel.detect_cluster() == parallel.Cluster('gcetpu', 4, 2)


def test_an_unreachable_metadata_server_is_named_and_not_joined(bare, caplog):
  with socket.socket() as s:  # a port with nothing listening: connection refused at once
    s.bind(('127.0.0.1', 0))
    address = f'127.0.0.1:{s.getsockname()[1]}'
  bare.setattr(cloud_tpu_cluster, 'running_in_cloud_tpu_vm', True)
  bare.setenv('GCE_METADATA_IP', address)
  start = time.monotonic()
  assert parallel.detect_cluster().kind == 'none'
  assert time.monotonic() - start < 5.0
  assert 'cluster gcetpu: could not tell' in caplog.text


def test_gke_names_its_workers_in_the_environment(bare):
  with MetadataServer(tpu_vm_attributes(2, ['ignored'])) as server:
    # A GKE TPU node is a TPU VM too; GKE tells its TPU containers to skip the VM's metadata
    # (jax checks the GCE slice first) and names the workers in the environment.
    on_tpu_vm(bare, server)
    bare.setenv('TPU_SKIP_MDS_QUERY', 'true')
    bare.setenv('TPU_WORKER_HOSTNAMES', 'job-0.svc,job-1.svc,job-2.svc,job-3.svc')
    bare.setenv('TPU_WORKER_ID', '2')
    cluster = parallel.detect_cluster()
  assert cluster == parallel.Cluster('gketpu', 4, 2)
  assert 'agent-worker-number' not in server.asked


def test_slurm_tasks(bare):
  for var, value in dict(
    SLURM_JOB_ID='812',
    SLURM_STEP_NODELIST='gpu[01-02]',
    SLURM_NTASKS='16',
    SLURM_PROCID='9',
    SLURM_LOCALID='1',
  ).items():
    bare.setenv(var, value)
  assert parallel.detect_cluster() == parallel.Cluster('slurm', 16, 9)
  bare.setenv('SLURM_NTASKS', '1')  # an interactive allocation: one task, nothing to join
  bare.setenv('SLURM_PROCID', '0')
  cluster = parallel.maybe_initialize_distributed()
  assert cluster == parallel.Cluster('slurm', 1, 0) and not cluster.joins
  assert not jax.distributed.is_initialized()


def test_explicit_variables_win_over_any_detector(bare):
  bare.setenv('SLURM_JOB_ID', '812')  # launch/gpu_slurm.sbatch sets both
  for var, value in dict(
    SLURM_STEP_NODELIST='gpu01',
    SLURM_NTASKS='2',
    SLURM_PROCID='1',
    SLURM_LOCALID='0',
    JAX_COORDINATOR_ADDRESS='gpu01:20812',
    JAX_NUM_PROCESSES='2',
    JAX_PROCESS_ID='1',
  ).items():
    bare.setenv(var, value)
  assert parallel.detect_cluster() == parallel.Cluster('explicit', 2, 1)


def test_an_explicit_address_alone_leaves_the_rest_to_jax(bare):
  bare.setenv('JAX_COORDINATOR_ADDRESS', '10.0.0.2:1234')
  cluster = parallel.detect_cluster()
  assert cluster == parallel.Cluster('explicit', None, None) and cluster.joins


@pytest.mark.parametrize(
  'env, message',
  [
    (dict(JAX_NUM_PROCESSES='2'), 'set JAX_PROCESS_ID too'),
    (dict(JAX_PROCESS_ID='0'), 'set JAX_NUM_PROCESSES too'),
    (dict(JAX_NUM_PROCESSES='2', JAX_PROCESS_ID='2'), r'JAX_PROCESS_ID=2 is not in \[0, '),
    (dict(JAX_NUM_PROCESSES='two', JAX_PROCESS_ID='0'), "JAX_NUM_PROCESSES='two' is not a whole"),
  ],
)
def test_half_given_explicit_variables_are_named(bare, env, message):
  bare.setenv('JAX_COORDINATOR_ADDRESS', '10.0.0.2:1234')
  for var, value in env.items():
    bare.setenv(var, value)
  with pytest.raises(ValueError, match=message):
    parallel.detect_cluster()


@pytest.mark.parametrize('kind', ['gcetpu', 'explicit'])
def test_joining_hands_jax_the_cluster_it_detected(bare, kind):
  """What maybe_initialize_distributed asks of jax.distributed.initialize for a detected
  cluster (the call itself is stood in for: it would wait for the other hosts)."""
  called = []
  bare.setattr(jax.distributed, 'initialize', lambda **kwargs: called.append(kwargs))
  with MetadataServer(tpu_vm_attributes(1, ['10.0.0.2', '10.0.0.3'])) as server:
    if kind == 'gcetpu':
      on_tpu_vm(bare, server)
    else:
      for var, value in dict(
        JAX_COORDINATOR_ADDRESS='10.0.0.2:1234', JAX_NUM_PROCESSES='2', JAX_PROCESS_ID='1'
      ).items():
        bare.setenv(var, value)
    cluster = parallel.maybe_initialize_distributed()
  assert cluster.kind == kind and cluster.joins
  assert called == [
    dict(cluster_detection_method='gcetpu')
    if kind == 'gcetpu'
    else dict(coordinator_address='10.0.0.2:1234', num_processes=2, process_id=1)
  ]
