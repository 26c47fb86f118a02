"""The contamination experiments end to end at toy scale: experiments/extrinsic_experiment.sh
(contaminate, rounds, oracle, scores, seeds, doses) and experiments/cleaning_fidelity.sh."""

import json
import os
import shutil
import subprocess
import sys

from conftest import REPO
import pytest

# A residual model (it restores to its input at init), tiny, 32 px, one or two steps per arm.
RESTORER = (
  '--config.data.source=folder --config.data.resolution=32 '
  '--config.model.channels=16 --config.model.channel_mult=(1,2) '
  '--config.model.attention_resolutions=(16,) --config.model.head_channels=16 '
  '--config.model.num_groups=8 --config.model.lq_encoder_channels=8 '
  '--config.train.batch_size=4 --config.train.log_every=1 --config.train.ckpt_every=2 '
  '--config.eval.num_images=4 --config.eval.steps=(2,) --config.eval.batch_size=4 '
  '--config.clean.steps=2 --config.clean.batch_size=4 --config.clean.fraction=0.25 '
  '--config.train.num_vis=4 --config.train.vis_steps=2 --config.diffusion.residual=True'
)
GENERATOR = (
  '--config.model.conditional=False --config.model.lq_concat=False '
  '--config.model.lq_encoder=False --config.generate.num_samples=4 '
  '--config.generate.batch_size=4 --config.train.batch_size=4 '
  '--config.train.ckpt_every=2 --config.sample.steps=2 --config.sample.batch_size=4 '
  '--config.train.num_vis=4 --config.train.vis_steps=2'
)


def _toy_faces(tmp_path, celeba_dir):
  """20 faces and their split (16 train, the last 4 dev, none test), as docs/results/splits.json."""
  src = tmp_path / 'faces'
  src.mkdir()
  names = []
  for p in sorted(celeba_dir.glob('*.jpg'))[:20]:
    shutil.copy(p, src / p.name)
    names.append(p.name)
  splits = tmp_path / 'splits.json'
  splits.write_text(json.dumps(dict(train=names[:16], dev=names[16:], test=[])))
  return src, splits


@pytest.mark.slow
def test_experiment_script_end_to_end(tmp_path, celeba_dir):
  src, splits = _toy_faces(tmp_path, celeba_dir)
  work = tmp_path / 'exp'
  # The restorers run on a step budget, the generators on a time budget: both kinds are used.
  env = dict(
    os.environ,
    SRC=str(src),
    SPLITS=str(splits),
    RES='32',
    RESTORE_STEPS='2',
    GEN_SECONDS='1',
    CONFIG='configs/test.py',
    GEN_CONFIG='configs/test.py',
    EXTRA=RESTORER,
    GEN_EXTRA=GENERATOR,
    FRACTION='0.25',
    SEEDS='0 1',
    CONTROL='1',
  )
  cmd = ['bash', 'experiments/extrinsic_experiment.sh', str(work)]
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  results = work / 'results'
  assert '## Restoration on the pristine evaluation faces (2 training seeds: 0, 1)' in out.stdout
  assert 'round 1 (cleaned data) − round 0' in out.stdout
  assert 'share won back' in out.stdout
  assert 'control (pristine data through the cleaner) − round 0' in out.stdout
  assert 'round 1 (cleaned data) − control (pristine data through the cleaner)' in out.stdout
  contamination = json.loads((results / 'contamination_manifest.json').read_text())
  assert contamination['num_contaminated'] == 4  # 25% of the 16 training faces
  for seed in (0, 1):
    cleaned = json.loads(
      (work / 'rounds' / f'seed_{seed}' / 'round_1' / 'dataset' / 'manifest.json').read_text()
    )
    assert cleaned['counts'] == {'cleaned': 4, 'copied': 12, 'failed': 0}
    report = json.loads((results / f'cleaning_seed_{seed}' / 'cleaning.json').read_text())
    assert report['selection']['selected'] == 4 and report['selection']['contaminated'] == 4
    for name in ('round_0', 'round_1', 'oracle', 'control'):
      table = json.loads((results / f'{name}_seed_{seed}_metrics.json').read_text())
      assert 'delta' in table['restored, 2 steps']  # intervals against the LQ
      assert (results / f'{name}_seed_{seed}_grid.png').exists()
    # The pristine | contaminated | cleaned grid exists when a contaminated face was cleaned.
    assert (results / f'pristine_contaminated_cleaned_seed_{seed}.png').exists() == (
      'contaminated_and_cleaned' in report
    )
  # Two seeds train two different models on the same data.
  r0 = [
    json.loads((results / f'round_0_seed_{s}_metrics.json').read_text())['restored, 2 steps'][
      'metrics'
    ]['psnr']['per_image']
    for s in (0, 1)
  ]
  assert r0[0] != r0[1]
  for v in ('contaminated', 'cleaned', 'pristine'):
    assert (results / f'generator_{v}_grid.png').exists()
  # Every arm stopped at its budget (two steps for the restorers), and a rerun trains nothing
  # more.
  oracle = work / 'oracle' / 'seed_1'
  control = work / 'control' / 'seed_1'
  steps = (oracle, control, work / 'gen_pristine')
  before = {p: sorted(os.listdir(p / 'checkpoints')) for p in steps}
  assert before[oracle][-1] == '2'
  assert json.loads((oracle / 'config_train.json').read_text())['train']['num_steps'] == 2
  again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
  assert again.returncode == 0, again.stderr[-3000:]
  assert {p: sorted(os.listdir(p / 'checkpoints')) for p in steps} == before
  # The oracle trained on the pristine copy, round 1 on the cleaned one, each with its seed.
  config = json.loads((oracle / 'config_train.json').read_text())
  assert config['data']['dir'] == str(work / 'oracle' / 'pristine' / 'images')
  assert config['seed'] == 1
  r1 = json.loads((work / 'rounds' / 'seed_1' / 'round_1' / 'config.json').read_text())
  assert r1['data']['dir'] == str(work / 'rounds' / 'seed_1' / 'round_1' / 'dataset' / 'images')
  assert r1['train']['init_from'] == '' and r1['seed'] == 1  # from scratch: the same budget
  # The control trained on the pristine training faces put through round 0's cleaner (same
  # selection share) and on the pristine validation faces as they are.
  config = json.loads((control / 'config_train.json').read_text())
  assert config['data']['dir'] == str(control / 'faces') and config['seed'] == 1
  through = json.loads((control / 'cleaned' / 'manifest.json').read_text())
  assert through['counts'] == {'cleaned': 4, 'copied': 12, 'failed': 0}
  assert through['model']['workdir'].endswith(os.path.join('rounds', 'seed_1', 'round_0'))
  pristine = work / 'oracle' / 'pristine' / 'images'
  faces = sorted(os.listdir(control / 'faces'))
  assert faces == sorted(os.listdir(pristine))
  for name in faces[-4:]:  # the validation faces, untouched
    assert (control / 'faces' / name).read_bytes() == (pristine / name).read_bytes()
  # Results kept from a run (as in docs/results/) resume a phase in a fresh workdir at its last
  # finished arm: here every arm of seed 0 and seed 1's rounds were kept, so only seed 1's oracle
  # trains again, and the summary covers both seeds.
  fresh = tmp_path / 'fresh'
  shutil.copytree(results, fresh / 'results')
  for name in ('oracle_seed_1_metrics.json', 'oracle_seed_1_grid.png', 'summary.md'):
    (fresh / 'results' / name).unlink()
  resumed = subprocess.run(
    ['bash', 'experiments/extrinsic_experiment.sh', str(fresh)],
    cwd=REPO,
    env=dict(env, GENERATORS='0'),
    capture_output=True,
    text=True,
    timeout=1500,
  )
  assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
  for seed in (0, 1):
    assert f"seed {seed}: the rounds' results are in" in resumed.stdout
  assert "seed 0: the oracle's results are in" in resumed.stdout
  assert 'seed 1: oracle on the pristine faces' in resumed.stdout
  assert not (fresh / 'rounds').exists() and not (fresh / 'control').exists()
  assert not (fresh / 'oracle' / 'seed_0').exists()
  assert sorted(os.listdir(fresh / 'oracle' / 'seed_1' / 'checkpoints'))[-1] == '2'
  assert (fresh / 'results' / 'oracle_seed_1_grid.png').exists()
  assert '(2 training seeds: 0, 1)' in (fresh / 'results' / 'summary.md').read_text()
  # A second dose shares the first's oracle (nothing retrains) and stops at round 0.
  dose2 = tmp_path / 'dose2'
  env2 = dict(
    env, FRACTION='0.5', SEEDS='1', ROUNDS='1', GENERATORS='0', ORACLE=str(work / 'oracle')
  )
  out2 = subprocess.run(
    ['bash', 'experiments/extrinsic_experiment.sh', str(dose2)],
    cwd=REPO,
    env=env2,
    capture_output=True,
    text=True,
    timeout=1500,
  )
  assert out2.returncode == 0, out2.stdout[-2000:] + out2.stderr[-3000:]
  assert sorted(os.listdir(oracle / 'checkpoints')) == before[oracle]
  assert (
    json.loads((dose2 / 'results' / 'contamination_manifest.json').read_text())['num_contaminated']
    == 8
  )
  assert not (dose2 / 'rounds' / 'seed_1' / 'round_1').exists()
  assert 'oracle (pristine data) − round 0' in out2.stdout and 'share won back' not in out2.stdout


@pytest.mark.slow
def test_cleaning_fidelity_script_end_to_end(tmp_path, celeba_dir):
  """experiments/cleaning_fidelity.sh on two tiny restorers, each trained on the contaminated set
  it cleans: the three measures, the summary's tables (each arm against the first, by defect),
  resuming, MEASURES / T_START, and the dev contamination seeds only."""
  src, splits = _toy_faces(tmp_path, celeba_dir)
  out = tmp_path / 'fidelity'
  env = dict(
    os.environ,
    SRC=str(src),
    SPLITS=str(splits),
    RES='32',
    FRACTION='0.25',
    CONFIG='configs/test.py',
    EXTRA=RESTORER,
    TRAIN_STEPS='2',
  )
  for name, mix in (('earlier', 0.0), ('mix', 0.3)):
    r = subprocess.run(
      ['bash', 'experiments/cleaning_fidelity.sh', str(out), name],
      cwd=REPO,
      env=dict(env, ARM_FLAGS=f'--config.degradation.mild_share={mix}'),
      capture_output=True,
      text=True,
      timeout=1500,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  cmd = [sys.executable, 'experiments/cleaning_fidelity_summary.py', str(out), 'earlier', 'mix']
  r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  for section in (
    '## 1. Pristine validation faces',
    '## 2. Cleaning the contaminated',
    'by defect',
    '## 3. The heavily degraded validation set',
    '| mix − earlier |',
    '| mix − earlier (cleaned faces) |',
    '| mix | damaged | sharpness_lapvar |',
    'cleaned / pristine |',
  ):
    assert section in r.stdout, section
  for arm, mix in (('earlier', 0.0), ('mix', 0.3)):
    # The cleaner trained on the contaminated faces it cleaned, not on their pristine twins.
    config = json.loads((out / arm / 'model' / 'config_train.json').read_text())
    assert config['data']['dir'] == str(out / 'data' / 'C' / 'images')
    assert config['degradation']['mild_share'] == mix and config['train']['num_steps'] == 2
    self_ = json.loads((out / arm / 'self' / 'metrics.json').read_text())
    assert self_['num_images'] == 4  # the pristine dev faces
    report = json.loads((out / arm / 'cleaning' / 'cleaning.json').read_text())
    assert report['selection']['selected'] == 4  # clean.fraction 0.25 of the 16
    assert 'sharpness_lapvar' in report['contaminated_and_cleaned']['versions']['cleaned']
    assert (out / arm / 'heavy_metrics.json').exists()
  # Only train and dev faces are in the view the runs read.
  assert sorted(os.listdir(out / 'data' / 'faces')) == sorted(
    [f'a_{n}' for n in json.loads(splits.read_text())['train']]
    + [f'b_{n}' for n in json.loads(splits.read_text())['dev']]
  )
  # A rerun measures nothing again; another OUT takes only the measures asked for.
  stages = (out / 'timeline.txt').read_text().count(': ')
  r = subprocess.run(
    ['bash', 'experiments/cleaning_fidelity.sh', str(out), 'mix'],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert r.returncode == 0 and (out / 'timeline.txt').read_text().count(': ') == stages
  other = tmp_path / 'self_only'
  r = subprocess.run(
    ['bash', 'experiments/cleaning_fidelity.sh', str(other), 'mix'],
    cwd=REPO,
    env=dict(env, MEASURES='self', T_START='0.5', DATA=str(out / 'data')),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert '--t_start 0.5' in (other / 'timeline.txt').read_text()
  assert (other / 'mix' / 'self' / 'metrics.json').exists()
  assert not (other / 'mix' / 'cleaning').exists() and '## 2.' not in r.stdout
  # The protocol's contamination seed is refused.
  r = subprocess.run(
    ['bash', 'experiments/cleaning_fidelity.sh', str(tmp_path / 'x'), 'mix'],
    cwd=REPO,
    env=dict(env, CSEED='2'),
    capture_output=True,
    text=True,
  )
  assert r.returncode == 2 and 'dev contamination seeds' in r.stderr


def test_prepare_only_builds_the_split_view_and_contaminates_train_faces_only(tmp_path, celeba_dir):
  """PREPARE_ONLY=1 with EVAL=test: the faces are the train split and the test split (test last),
  the contamination falls on train faces only, and an ORACLE made for another split is refused."""
  src, splits = _toy_faces(tmp_path, celeba_dir)
  names = [p.name for p in sorted(src.iterdir())]
  splits.write_text(json.dumps(dict(train=names[:12], dev=names[12:16], test=names[16:])))
  work = tmp_path / 'exp'
  env = dict(
    os.environ,
    SRC=str(src),
    SPLITS=str(splits),
    RES='32',
    FRACTION='0.5',
    EVAL='test',
    PREPARE_ONLY='1',
  )
  cmd = ['bash', 'experiments/extrinsic_experiment.sh', str(work)]
  r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  assert sorted(os.listdir(work / 'faces_test')) == (
    [f'a_{n}' for n in names[:12]] + [f'b_{n}' for n in names[16:]]
  )
  manifest = json.loads((work / 'contaminated' / 'manifest.json').read_text())
  assert manifest['skip_last'] == 4 and manifest['num_contaminated'] == 6  # half of 12 train
  contaminated = {r['file'] for r in manifest['records'] if 'defect' in r}
  assert len(contaminated) == 6 and all(f.startswith('a_') for f in contaminated)
  assert (work / 'results' / 'splits.json').read_text() == splits.read_text()
  assert not (work / 'rounds').exists()  # prepared, nothing trained
  assert 'evaluation on test (4 faces)' in (work / 'results' / 'timeline.txt').read_text()
  # Another split's run may not share this oracle's pristine faces.
  r = subprocess.run(
    ['bash', 'experiments/extrinsic_experiment.sh', str(tmp_path / 'dev')],
    cwd=REPO,
    env=dict(env, EVAL='dev', ORACLE=str(work / 'oracle')),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert r.returncode == 2 and 'another split' in r.stderr


def test_a_training_stopped_by_a_signal_stops_the_script(tmp_path, celeba_dir):
  """A stopped training exits 0 with its stop line (the pod launcher's convention): the script
  stops there (exit 3) instead of evaluating the part-trained arm and going on to the next. The
  rounds' training is a stand-in `python3` that prints that line; everything else is real."""
  src, splits = _toy_faces(tmp_path, celeba_dir)
  shim = tmp_path / 'bin'
  shim.mkdir()
  (shim / 'python3').write_text(
    '#!/bin/bash\n'
    'if [[ "$1 $2" == "-m idm_jax.main" && "$*" == *--config.mode=extrinsic* ]]; then\n'
    "  echo 'W0 train.py] run: stopped at step 3 after SIGTERM; checkpoint saved'; exit 0\n"
    'fi\n'
    f'exec {sys.executable} "$@"\n'
  )
  (shim / 'python3').chmod(0o755)
  work = tmp_path / 'exp'
  env = dict(
    os.environ,
    PATH=f'{shim}:{os.environ["PATH"]}',
    SRC=str(src),
    SPLITS=str(splits),
    RES='32',
    FRACTION='0.5',
    RESTORE_STEPS='2',
  )
  cmd = ['bash', 'experiments/extrinsic_experiment.sh', str(work)]
  r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-3000:]
  timeline = (work / 'results' / 'timeline.txt').read_text()
  assert 'stopped by a signal' in timeline and 'rerun the same command to resume' in timeline
  assert 'oracle' not in timeline and not (work / 'oracle' / 'seed_0').exists()
