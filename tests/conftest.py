"""Shared fixtures. Tests run on the CPU; the mesh tests simulate 8 devices in subprocesses."""

import importlib.util
import os
import pathlib
import tempfile

# Persistent XLA cache shared by the test process and the training subprocesses it starts: the
# same tiny programs compile once per session instead of once per process (set before jax loads).
os.environ.setdefault(
  'JAX_COMPILATION_CACHE_DIR', os.path.join(tempfile.gettempdir(), 'idm_jax_test_xla_cache')
)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
# The real faces live beside the checkout (../shared/data, as in CI); a plain clone has none, and
# their tests skip. IDM_JAX_SHARED_DATA points elsewhere (and lets one check the plain-clone case).
SHARED_DATA = pathlib.Path(os.environ.get('IDM_JAX_SHARED_DATA', REPO.parent / 'shared' / 'data'))


# The skips a run may expect, by name. Given --allow-skips=NAMES, a run fails on any other skip,
# so a missing dependency cannot hide a test: CI passes it on every call (.ci/run).
EXPECTED_SKIPS = {
  'gpu': ('needs a GPU or TPU', 'cuDNN attention is a GPU path'),
  'libtpu': ('AOT TPU compiles need libtpu',),
  'shared-data': ('needs ../shared/data/celeba_hq128_dev',),
}


def pytest_addoption(parser):
  parser.addoption(
    '--allow-skips',
    default=None,
    metavar='NAMES',
    help='fail the run on a skip other than these (comma-separated, from '
    f'{", ".join(EXPECTED_SKIPS)}; empty: none)',
  )


def pytest_configure(config):
  names = config.getoption('--allow-skips')
  if names is None:
    return
  allowed = [n for n in names.split(',') if n]
  unknown = sorted(set(allowed) - set(EXPECTED_SKIPS))
  if unknown:
    raise pytest.UsageError(f'--allow-skips: unknown {unknown}; choose from {list(EXPECTED_SKIPS)}')
  config.pluginmanager.register(
    _SkipPolicy(tuple(r for n in allowed for r in EXPECTED_SKIPS[n])), 'idm_jax-skip-policy'
  )


class _SkipPolicy:
  """Collects skips whose reason is not allowed; fails the session if there are any."""

  def __init__(self, allowed_reasons):
    self.allowed_reasons = allowed_reasons
    self.unexpected = []

  def _note(self, report):
    if report.skipped:
      longrepr = report.longrepr
      reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
      if not any(r in reason for r in self.allowed_reasons):
        self.unexpected.append(f'{report.nodeid}: {reason}')

  def pytest_runtest_logreport(self, report):
    self._note(report)

  def pytest_collectreport(self, report):
    self._note(report)

  def pytest_sessionfinish(self, session):
    # Under xdist the controller sees every worker's reports; a worker leaves the verdict to it.
    if hasattr(session.config, 'workerinput') or not self.unexpected:
      return
    reporter = session.config.pluginmanager.get_plugin('terminalreporter')
    if reporter:
      reporter.write_line(
        f'\n{len(self.unexpected)} unexpected skip(s) (--allow-skips): each hides a test', red=True
      )
      for u in self.unexpected:
        reporter.write_line(f'  {u}')
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def load_config(name: str):
  """configs/<name>.py's get_config(), loaded by path as --config does."""
  from idm_jax.runtime import configlib

  return configlib.load(REPO / 'configs' / f'{name}.py')


def add_process_args(parser) -> None:
  """The worker scripts' flags for simulated devices and local multi-process runs."""
  parser.add_argument('--devices', type=int, default=1)
  parser.add_argument('--process-id', type=int, default=0)
  parser.add_argument('--num-processes', type=int, default=1)
  parser.add_argument('--port', type=int, default=0)


def start_cpu_processes(args):
  """In a worker, before anything imports jax: `args.devices` CPU devices, and with several
  processes jax.distributed over localhost with gloo collectives. Returns the jax module."""
  os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={args.devices}'
  os.environ['JAX_PLATFORMS'] = 'cpu'
  import jax  # pylint: disable=import-outside-toplevel

  if args.num_processes > 1:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(
      f'localhost:{args.port}',
      args.num_processes,
      args.process_id,
      local_device_ids=list(range(args.devices)),
    )
  return jax


@pytest.fixture
def test_config():
  return load_config('test')


@pytest.fixture(scope='session')
def model_path(tmp_path_factory):
  """configs/test.py's model with random weights, exported (.msgpack) as a user would load it."""
  from idm_jax.inference import engine
  from idm_jax.inference import export  # pylint: disable=import-outside-toplevel
  from idm_jax.runtime import configlib  # pylint: disable=import-outside-toplevel

  config = load_config('test')
  params = engine.random_params(configlib.build_model(config.model, config.data.resolution), 0)
  path = str(tmp_path_factory.mktemp('model') / 'model.msgpack')
  export.save_exported(path, config, params)
  return path


@pytest.fixture(scope='session')
def celeba_dir():
  d = SHARED_DATA / 'celeba_hq128_dev'
  if not d.is_dir():
    pytest.skip(
      'needs ../shared/data/celeba_hq128_dev beside the checkout (or '
      f'IDM_JAX_SHARED_DATA=DIR with DIR/celeba_hq128_dev); {d} not found'
    )
  return d


# (CelebA file, degrees turned counter-clockwise): HOG finds the first two faces, CNN all four.
TILTED = (('201600.jpg', 0), ('201604.jpg', -40), ('201601.jpg', -55), ('201606.jpg', 55))
TILTED_CELL = 144


def tilted_faces_photo(celeba_dir):
  """(576x144 photo, the (2, 3) affine that placed each face): the TILTED CelebA faces, each
  128 px crop scaled to 96 px and turned about its centre, one per 144 px cell, on grey."""
  import cv2
  import numpy as np
  from PIL import Image

  cell = TILTED_CELL
  photo = np.full((cell, cell * len(TILTED), 3), 128, np.uint8)
  affines = []
  for k, (name, angle) in enumerate(TILTED):
    face = np.asarray(Image.open(celeba_dir / name).convert('RGB'))
    affine = cv2.getRotationMatrix2D((63.5, 63.5), angle, 0.75)
    affine[:, 2] += ((cell - 1) / 2 + cell * k - 63.5, (cell - 1) / 2 - 63.5)
    cv2.warpAffine(
      face,
      affine,
      photo.shape[1::-1],
      dst=photo,
      flags=cv2.INTER_LINEAR,
      borderMode=cv2.BORDER_TRANSPARENT,
    )  # paints only the face's square
    affines.append(affine)
  return photo, affines


@pytest.fixture(scope='session')
def niqe_params_path():
  """The pristine parameters shipped with the package, so NIQE tests never skip."""
  from idm_jax.metrics import niqe

  return pathlib.Path(niqe.default_params_path())


# ---------------------------------------------------------------------------------------------
# A real Cloud Storage server on 127.0.0.1 (tests/gcs_server.py), for every gs:// path test.

GCS_SERVER = pathlib.Path(__file__).with_name('gcs_server.py')


_GCS_TLS = {}  # 'ca': the certificate the session's server answers gRPC (TLS) with


def gcs_env(port: int) -> dict:
  """What gcsfs, google-cloud-storage (tensorboardX, the lock), tensorstore (orbax) and
  google-cloud-cpp (array_record's reader under TFDS) need to talk to the local server (or a
  proxy in front of it) instead of Google's. gcsfs keeps its shipped defaults: its bucket-type
  probe (gRPC over TLS to the same address) is answered by the server, whose certificate gRPC
  trusts through GRPC_DEFAULT_SSL_ROOTS_FILE_PATH."""
  url = f'http://127.0.0.1:{port}'
  env = {
    'STORAGE_EMULATOR_HOST': url,
    'TENSORSTORE_GCS_HTTP_URL': url,
    'CLOUD_STORAGE_EMULATOR_ENDPOINT': url,
    'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'test',
    'GOOGLE_CLOUD_PROJECT': 'test',
    # Anonymous, as an emulator's clients are: without it gcsfs looks for credentials
    # (none on CI, so its probe fails and warns at every call; a laptop's own elsewhere).
    'FSSPEC_GS_TOKEN': 'anon',
    'FSSPEC_GCS_TOKEN': 'anon',
  }
  if 'ca' in _GCS_TLS:
    env['GRPC_DEFAULT_SSL_ROOTS_FILE_PATH'] = _GCS_TLS['ca']
  return env


@pytest.fixture(scope='session')
def gcs_server(tmp_path_factory):
  """The local GCS server (one per test process); its environment set for this process and
  every subprocess it starts. Skips only where the [gcs] extra is not installed."""
  import socket
  import subprocess
  import sys
  import time

  for module in ('gcsfs', 'gcp_storage_emulator', 'google.cloud.storage'):
    if importlib.util.find_spec(module.split('.')[0]) is None:
      pytest.skip(
        f'needs the [gcs] and [test] extras ({module} is not installed): '
        'pip install -e ".[test,gcs]"'
      )
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  tls_dir = tmp_path_factory.mktemp('gcs_tls')
  proc = subprocess.Popen(
    [sys.executable, str(GCS_SERVER), '--port', str(port), '--tls-dir', str(tls_dir)],
    stdout=subprocess.PIPE,
    stderr=subprocess.DEVNULL,
    text=True,
  )
  line = proc.stdout.readline()
  if line.strip() != 'ready':
    proc.kill()
    pytest.fail(f'the local GCS server did not start: {line!r}')
  deadline = time.time() + 30
  while time.time() < deadline:  # the line comes before the socket accepts, just
    try:
      socket.create_connection(('127.0.0.1', port), timeout=1).close()
      break
    except OSError:
      time.sleep(0.1)
  _GCS_TLS['ca'] = str(tls_dir / 'ca.pem')
  saved = {k: os.environ.get(k) for k in gcs_env(port)}
  os.environ.update(gcs_env(port))
  # fsspec read its FSSPEC_* variables when this process imported it: tell it directly too.
  import fsspec  # pylint: disable=import-outside-toplevel

  saved_tokens = {p: fsspec.config.conf.setdefault(p, {}).get('token') for p in ('gs', 'gcs')}
  for p in saved_tokens:
    fsspec.config.conf[p]['token'] = 'anon'
  try:
    yield f'http://127.0.0.1:{port}'
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    for p, token in saved_tokens.items():
      if token is None:
        fsspec.config.conf[p].pop('token', None)
      else:
        fsspec.config.conf[p]['token'] = token
    _GCS_TLS.pop('ca', None)
    proc.kill()
    proc.wait()


@pytest.fixture(scope='session')
def gcs_fault_proxy(gcs_server):
  """The session's fault proxy (tests/gcs_faults.py) in front of the local GCS server. One for
  the whole session: gcsfs keeps the gRPC channel of its bucket-type probe to the first
  address it used, which must stay up."""
  from gcs_faults import FaultProxy  # pylint: disable=import-outside-toplevel

  with FaultProxy(gcs_server) as proxy:
    yield proxy


@pytest.fixture
def gcs_faults(gcs_fault_proxy):
  """The fault proxy, without rules and with an empty log, and every client of this process
  pointed at it for the test. `.proxy` takes the rules, `.env` points a subprocess's clients
  at it (`dict(os.environ, **gcs_faults.env)`), `.url` is its address."""
  import types

  proxy = gcs_fault_proxy
  proxy.reset()
  env = gcs_env(proxy.port)
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    yield types.SimpleNamespace(proxy=proxy, env=env, url=proxy.url)
  finally:
    os.environ.update({k: v for k, v in saved.items() if v is not None})
    for k in (k for k, v in saved.items() if v is None):
      os.environ.pop(k, None)
    proxy.reset()


@pytest.fixture
def gcs_bucket(gcs_server, request):
  """A new, empty bucket on the local server: 'gs://<name>'."""
  import json
  import re
  import urllib.request
  import uuid

  name = re.sub(r'[^a-z0-9-]', '-', request.node.name.lower())[:40].strip('-')
  name = f'{name}-{uuid.uuid4().hex[:8]}'
  req = urllib.request.Request(
    f'{gcs_server}/storage/v1/b?project=test',
    method='POST',
    data=json.dumps({'name': name}).encode(),
    headers={'Content-Type': 'application/json'},
  )
  urllib.request.urlopen(req, timeout=30).read()
  return f'gs://{name}'


@pytest.fixture(params=['local', 'gcs'])
def local_or_bucket(request, tmp_path):
  """A folder to write into, once on local disk and once in a new bucket (a test of both)."""
  if request.param == 'local':
    return str(tmp_path)
  return request.getfixturevalue('gcs_bucket')
