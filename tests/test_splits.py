"""The train/dev/test split of docs/PROTOCOL.md: the committed file, the views the runs read, and
that no selection script can read the test split."""

import json
import os
import re
import subprocess
import sys

from conftest import REPO
import pytest

EXPERIMENTS = REPO / 'experiments'
SPLITS = REPO / 'docs' / 'results' / 'splits.json'
# Scripts that choose something (recipe, dose, t_start, draws, step count, selector, detector
# settings): dev only. Scripts that score a claim may take EVAL=test. Every script that touches
# the split must be in one of the two lists, so a new one has to be classified.
SELECTION_SCRIPTS = (
  'ablation_64.sh',
  'cleaning_fidelity.sh',
  'selection_scores.py',
  'detector_quality.py',
)
CLAIM_SCRIPTS = ('extrinsic_experiment.sh',)
SPLIT_TOOLS = ('make_splits.py', 'split_view.py')

sys.path.insert(0, str(EXPERIMENTS))
import make_splits  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import split_view  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def _code(text: str) -> str:
  """The script without its comment lines: what runs."""
  return '\n'.join(line for line in text.splitlines() if not line.lstrip().startswith('#'))


def _violations(name: str, text: str) -> list[str]:
  """Why a selection script could read the test split ([] if it cannot)."""
  code = _code(text)
  if name.endswith('.py'):
    # Python scripts docstrings may say what the split is; check every line but the docstring.
    code = re.sub(r'^""".*?"""', '', code, count=1, flags=re.S)
  problems = []
  if re.search(r'\btest\b', code, re.I):
    problems.append('names the test split')
  if re.search(r'\$\{?EVAL\b', code):
    problems.append('takes the evaluation split from the environment (EVAL)')
  for call in re.findall(r'split_view\.py[^\n]*', code):
    evals = re.findall(r'--eval[= ]+(\S+)', call)
    if evals != ['dev']:
      problems.append(f'builds a view with --eval {evals}')
  if name.endswith('.py') and 'refuse_test_faces(' not in code:
    problems.append('does not refuse test faces (split_view.refuse_test_faces)')
  if name.endswith('.sh') and 'split_view.py' not in code:
    problems.append('reads faces without a split view')
  return problems


@pytest.mark.parametrize('name', SELECTION_SCRIPTS)
def test_no_selection_script_reads_the_test_split(name):
  assert _violations(name, (EXPERIMENTS / name).read_text()) == []


def test_the_check_fails_when_a_selection_script_names_the_test_split():
  text = (EXPERIMENTS / 'cleaning_fidelity.sh').read_text()
  assert _violations('cleaning_fidelity.sh', text.replace('--eval dev', '--eval test'))
  assert _violations('cleaning_fidelity.sh', text.replace('--eval dev', '--eval "$EVAL"'))
  ablation = (EXPERIMENTS / 'ablation_64.sh').read_text()
  assert _violations('ablation_64.sh', ablation.replace('split_view.py', 'other.py'))
  py = (EXPERIMENTS / 'selection_scores.py').read_text()
  assert _violations('selection_scores.py', py + "\nheld_out = splits['test']\n")
  assert _violations('selection_scores.py', py.replace('refuse_test_faces(', 'print('))


def test_every_script_that_touches_the_split_is_classified():
  for path in sorted(EXPERIMENTS.iterdir()):
    if path.suffix not in ('.sh', '.py') or path.name in SPLIT_TOOLS:
      continue
    code = _code(path.read_text())
    if 'split_view' in code or 'splits.json' in code or 'SPLITS' in code:
      assert path.name in SELECTION_SCRIPTS + CLAIM_SCRIPTS, path.name
  for name in SELECTION_SCRIPTS + CLAIM_SCRIPTS:
    assert (EXPERIMENTS / name).exists(), name


def test_committed_split_is_what_make_splits_draws():
  splits = json.loads(SPLITS.read_text())
  train, dev, held_out = splits['train'], splits['dev'], splits['test']
  assert (len(train), len(dev), len(held_out)) == (700, 100, 100)
  names = sorted(train + dev + held_out)
  assert len(set(names)) == 900
  assert make_splits.make_splits(names) == splits  # deterministic, byte for byte
  assert dev == names[-100:]  # the faces every earlier choice used
  # No test face was contaminated in any earlier contamination (they were scored then).
  from idm_jax.data import contaminate

  pool = names[:-100]
  for fraction, seed in make_splits.EARLIER_CONTAMINATIONS:
    touched = {pool[i] for i in contaminate.choose(len(pool), fraction, seed)}
    assert not touched & set(held_out)
  manifest = json.loads(
    (
      REPO / 'docs' / 'results' / 'extrinsic64_doses' / 'dose40' / 'contamination_manifest.json'
    ).read_text()
  )
  hit = {os.path.splitext(n)[0] for n in contaminate.contaminated_names(manifest)}
  assert len(hit) == 320 and not hit & {os.path.splitext(n)[0] for n in held_out}


def _toy(tmp_path):
  src = tmp_path / 'src'
  src.mkdir()
  names = [f'{i:03d}.jpg' for i in range(10)]
  for n in names:
    (src / n).write_bytes(b'x')
  splits = dict(train=names[:6], dev=names[8:], test=names[6:8])
  path = tmp_path / 'splits.json'
  path.write_text(json.dumps(splits))
  return src, splits, path


def test_a_view_holds_train_and_one_split_that_split_last(tmp_path):
  src, splits, path = _toy(tmp_path)
  dst = tmp_path / 'view'
  assert split_view.make_view(splits, str(src), str(dst), 'dev') == 2
  got = sorted(os.listdir(dst))
  assert got == [f'a_{n}' for n in splits['train']] + [f'b_{n}' for n in splits['dev']]
  assert os.path.realpath(dst / 'b_008.jpg') == str(src / '008.jpg')
  assert split_view.make_view(splits, str(src), str(dst), 'dev') == 2  # a rerun is a no-op
  with pytest.raises(ValueError, match='not the test view'):
    split_view.make_view(splits, str(src), str(dst), 'test')
  with pytest.raises(ValueError, match='choose one of'):
    split_view.make_view(splits, str(src), str(tmp_path / 'v2'), 'train')
  r = subprocess.run(
    [
      sys.executable,
      'experiments/split_view.py',
      '--eval',
      'test',
      '--dst',
      str(tmp_path / 'v3'),
      '--splits',
      str(path),
      '--src',
      str(src),
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert r.returncode == 0 and r.stdout.strip() == '2'
  assert sorted(os.listdir(tmp_path / 'v3'))[-2:] == ['b_006.jpg', 'b_007.jpg']


def test_selection_scripts_refuse_test_faces_at_run_time(tmp_path):
  _, splits, path = _toy(tmp_path)
  split_view.refuse_test_faces(['a_000.png', 'b_008.png', '009.jpg'], str(path))
  with pytest.raises(SystemExit, match='test split'):
    split_view.refuse_test_faces(['a_000.png', 'a_006.png'], str(path))
  with pytest.raises(SystemExit, match='test split'):
    split_view.refuse_test_faces(['/x/007.jpg'], str(path))
  faces = tmp_path / 'faces'
  faces.mkdir()
  (faces / '007.jpg').write_bytes(b'x')
  r = subprocess.run(
    [
      sys.executable,
      'experiments/detector_quality.py',
      '--faces',
      str(faces),
      '--splits',
      str(path),
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert r.returncode != 0 and 'test split' in r.stderr
