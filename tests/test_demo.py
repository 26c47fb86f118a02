"""The README's quick start: the demo trains on the CPU, from a plain install, and leaves what it
promises."""

import configparser
from importlib import metadata
import json
import pathlib
import subprocess
import sys
import time

from conftest import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
import pytest

README_DEMO = 'python -m idm_jax.main --config=configs/demo.py --workdir=workdirs/demo'
# A few steps of the demo, enough for a checkpoint and both of its grids.
SHORT = [
  '--config.train.num_steps=4',
  '--config.train.sample_every=2',
  '--config.train.ckpt_every=4',
]


@pytest.mark.slow
def test_readme_demo_command(tmp_path):
  readme = (REPO / 'README.md').read_text()
  assert README_DEMO in readme  # the test runs exactly what the README tells people to run
  workdir = tmp_path / 'demo'
  start = time.time()
  out = subprocess.run(
    [sys.executable, '-m', 'idm_jax.main', '--config=configs/demo.py', f'--workdir={workdir}'],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=900,
  )
  elapsed = time.time() - start
  assert out.returncode == 0, out.stderr[-3000:]
  print(f'demo took {elapsed:.0f} s')
  # The target is 5 minutes on an otherwise idle 2-core machine, measured by this print
  # (docs/PERFORMANCE.md), not asserted: machines differ. The bound only catches a run that has
  # become several times slower.
  assert elapsed < 720
  assert (workdir / 'checkpoints' / '400').is_dir()
  assert len((workdir / 'metrics.jsonl').read_text().splitlines()) >= 16
  assert sorted(p.name for p in pathlib.Path(workdir).glob('samples_*.png')) == [
    'samples_0000200.png',
    'samples_0000400.png',
  ]
  assert list((workdir / 'tensorboard').glob('events.out.tfevents.*'))


# --- the demo needs only install_requires ------------------------------------------------------


def _install_requires() -> list[str]:
  setup = configparser.ConfigParser()
  setup.read(REPO / 'setup.cfg')
  return [
    line.strip() for line in setup['options']['install_requires'].splitlines() if line.strip()
  ]


def _base_modules() -> set[str]:
  """Top-level modules of the distributions a plain `pip install idm_jax` brings: those in
  install_requires and, recursively, their own requirements (with the extras they ask for)."""
  seen, todo = set(), [Requirement(r) for r in _install_requires()]
  while todo:
    req = todo.pop()
    name = canonicalize_name(req.name)
    key = (name, frozenset(req.extras))
    if key in seen:
      continue
    seen.add(key)
    try:
      dist = metadata.distribution(req.name)
    except metadata.PackageNotFoundError:
      continue  # not installed here, so nothing of it can be imported anyway
    for line in dist.requires or []:
      sub = Requirement(line)
      if sub.marker is None or any(sub.marker.evaluate({'extra': e}) for e in ('', *req.extras)):
        todo.append(sub)
  dists = {name for name, _ in seen}
  return {
    module
    for module, owners in metadata.packages_distributions().items()
    if any(canonicalize_name(o) in dists for o in owners)
  } | {'idm_jax'}


# Run in a fresh interpreter: importing a top-level module installed in site-packages by a
# distribution outside install_requires fails, as it would after a plain `pip install .`.
_BASE_ONLY = r"""
import importlib.abc, importlib.machinery, json, os, site, sys
ALLOWED = set(json.loads(sys.argv[1]))
SITE = tuple(os.path.realpath(p) + os.sep for p in site.getsitepackages())
blocked = set()

class OnlyInstallRequires(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if '.' in name or name in ALLOWED:   # a submodule follows its top-level package
      return None
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    where = [spec.origin] + list(spec.submodule_search_locations or []) if spec else []
    if not any(w and os.path.realpath(w).startswith(SITE) for w in where):
      return None   # the standard library, a builtin, or not installed at all
    blocked.add(name)
    raise ModuleNotFoundError(f'No module named {name!r} (not in install_requires)', name=name)

sys.meta_path.insert(0, OnlyInstallRequires())
try:
  import matplotlib
except ModuleNotFoundError:
  pass
else:
  raise SystemExit('the blocker let matplotlib through')

import idm_jax.main   # everything the driver imports at start
from idm_jax.runtime import configlib
from idm_jax.data import sources
data = configlib.load('configs/demo.py').data   # the demo's faces, as its training reads them
train = sources.make_source(data, 'train')
val = sources.make_source(data, 'validation')
names = [train[i]['name'] for i in range(len(train))]
assert all(train[i]['image'].shape == (32, 32, 3) for i in range(len(train)))
print(json.dumps({'train': len(train), 'validation': len(val),
                  'stems': sorted({n.split('/')[-1].rsplit('_', 1)[0] for n in names}),
                  'blocked': sorted(blocked)}))
"""


def test_demo_faces_need_only_install_requires():
  """The demo's built-in faces (and the driver's imports) with every module outside
  install_requires unimportable: they once read Grace Hopper from matplotlib's sample data,
  and matplotlib is only in the [test] extra."""
  allowed = _base_modules()
  assert {'jax', 'skimage', 'PIL', 'numpy', 'cv2'} <= allowed
  assert not {'matplotlib', 'pytest', 'selenium', 'nbclient'} & allowed
  out = subprocess.run(
    [sys.executable, '-c', _BASE_ONLY, json.dumps(sorted(allowed))],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result['train'] == 64 and result['validation'] == 8
  assert result['stems'] == ['astronaut', 'camera', 'grace_hopper']  # the three people


@pytest.mark.slow
def test_demo_from_a_plain_install(tmp_path):
  """A fresh virtual environment, `pip install .` (no extras: what a user or the pod launcher's
  `.[gcs]` brings, from PyPI), then the README's demo command for a few steps."""
  src = tmp_path / 'src'  # what `pip install .` reads, copied: a build writes into its source
  listed = (
    subprocess.run(
      [
        'git',
        'ls-files',
        '-z',
        '--cached',
        '--others',
        '--exclude-standard',
        '--',
        'setup.cfg',
        'pyproject.toml',
        'README.md',
        'idm_jax',
        'configs',
      ],
      cwd=REPO,
      capture_output=True,
      check=True,
    )
    .stdout.decode()
    .split('\0')
  )
  for rel in filter(None, listed):
    if (REPO / rel).is_file():
      (src / rel).parent.mkdir(parents=True, exist_ok=True)
      (src / rel).write_bytes((REPO / rel).read_bytes())
  venv = tmp_path / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True, timeout=300)
  python = str(venv / 'bin' / 'python')
  start = time.time()
  install = subprocess.run(
    [python, '-m', 'pip', 'install', '-q', str(src)], capture_output=True, text=True, timeout=1800
  )
  assert install.returncode == 0, install.stderr[-3000:]
  print(f'pip install . took {time.time() - start:.0f} s')
  # A base environment indeed: the [test] extra's matplotlib, which the faces once needed, is absent.
  probe = subprocess.run([python, '-c', 'import matplotlib'], capture_output=True, text=True)
  assert probe.returncode != 0 and 'matplotlib' in probe.stderr
  # The installed package (not the source tree: run from elsewhere) carries its demo face.
  faces = subprocess.run(
    [
      python,
      '-c',
      'import idm_jax; from idm_jax.data import sources; '
      'print(idm_jax.__file__, len(sources.builtin_faces("train", 32)))',
    ],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert faces.returncode == 0, faces.stderr[-3000:]
  where, count = faces.stdout.split()
  assert str(venv) in where and count == '64'
  # The README's command, from the checkout as a user runs it, a few steps long.
  start = time.time()
  demo = subprocess.run(
    [python, *README_DEMO.split()[1:], *SHORT], cwd=src, capture_output=True, text=True, timeout=900
  )
  assert demo.returncode == 0, demo.stderr[-3000:]
  print(f'the demo, {SHORT[0]}, took {time.time() - start:.0f} s')
  workdir = src / 'workdirs' / 'demo'
  assert (workdir / 'checkpoints' / '4').is_dir()
  assert sorted(p.name for p in workdir.glob('samples_*.png')) == [
    'samples_0000002.png',
    'samples_0000004.png',
  ]
