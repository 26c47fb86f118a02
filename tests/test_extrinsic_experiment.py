"""bench/extrinsic_experiment.sh end to end at toy scale: contaminate, rounds, oracle, scores."""
import json
import os
import shutil
import subprocess

import pytest

from conftest import REPO

# A residual model (it restores to its input at init), tiny, 32 px, one or two steps per arm.
RESTORER = ('--config.data.source=folder --config.data.resolution=32 '
            '--config.model.channels=16 --config.model.channel_mult=(1,2) '
            '--config.model.attention_resolutions=(16,) --config.model.head_channels=16 '
            '--config.model.num_groups=8 --config.model.lq_encoder_channels=8 '
            '--config.train.batch_size=4 --config.train.log_every=1 --config.train.ckpt_every=2 '
            '--config.eval.num_images=4 --config.eval.steps=(2,) --config.eval.batch_size=4 '
            '--config.clean.steps=2 --config.clean.batch_size=4 --config.clean.fraction=0.25 '
            '--config.train.num_vis=4 --config.train.vis_steps=2 --config.diffusion.residual=True')
GENERATOR = ('--config.model.conditional=False --config.model.lq_concat=False '
             '--config.model.lq_encoder=False --config.generate.num_samples=4 '
             '--config.generate.batch_size=4 --config.train.batch_size=4 '
             '--config.train.ckpt_every=2 --config.sample.steps=2 --config.sample.batch_size=4 '
             '--config.train.num_vis=4 --config.train.vis_steps=2')


@pytest.mark.slow
def test_experiment_script_end_to_end(tmp_path, celeba_dir):
  src = tmp_path / 'faces'
  src.mkdir()
  for p in sorted(celeba_dir.glob('*.jpg'))[:20]:
    shutil.copy(p, src / p.name)
  work = tmp_path / 'exp'
  # The restorers run on a step budget, the generators on a time budget: both kinds are used.
  env = dict(os.environ, SRC=str(src), RES='32', VAL='4', RESTORE_STEPS='2',
             GEN_SECONDS='1', CONFIG='configs/test.py', GEN_CONFIG='configs/test.py',
             EXTRA=RESTORER, GEN_EXTRA=GENERATOR, FRACTION='0.25')
  cmd = ['bash', 'bench/extrinsic_experiment.sh', str(work)]
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  results = work / 'results'
  assert '## Restoration on the pristine validation faces' in out.stdout
  assert 'round 1 (cleaned data) - round 0' in out.stdout
  contamination = json.loads((results / 'contamination_manifest.json').read_text())
  assert contamination['num_contaminated'] == 4          # 25% of the 16 training faces
  cleaned = json.loads((results / 'cleaned_manifest.json').read_text())
  assert cleaned['counts'] == {'cleaned': 4, 'copied': 12, 'failed': 0}
  report = json.loads((results / 'cleaning.json').read_text())
  assert report['selection']['selected'] == 4 and report['selection']['contaminated'] == 4
  for name in ('round_0', 'round_1', 'oracle'):
    table = json.loads((results / f'{name}_metrics.json').read_text())
    assert 'delta' in table['restored, 2 steps']           # intervals against the LQ
  for v in ('contaminated', 'cleaned', 'pristine'):
    assert (results / f'generator_{v}_grid.png').exists()
  for grid in ('round_0_grid', 'round_1_grid', 'oracle_grid'):
    assert (results / f'{grid}.png').exists(), grid
  # The pristine | contaminated | cleaned grid exists when a contaminated face was cleaned.
  assert (results / 'pristine_contaminated_cleaned.png').exists() == \
      ('contaminated_and_cleaned' in report)
  # Every arm stopped at its budget (two steps for the restorers), and a rerun trains nothing
  # more.
  steps = ('oracle', 'gen_pristine')
  before = {p: sorted(os.listdir(work / p / 'checkpoints')) for p in steps}
  assert before['oracle'][-1] == '2'
  assert json.loads((work / 'oracle' / 'config_train.json').read_text())['train']['num_steps'] == 2
  again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
  assert again.returncode == 0, again.stderr[-3000:]
  assert {p: sorted(os.listdir(work / p / 'checkpoints')) for p in steps} == before
  # The oracle trained on the pristine copy, round 1 on the cleaned one.
  assert json.loads((work / 'oracle' / 'config_train.json').read_text())['data']['dir'] == \
      str(work / 'pristine' / 'images')
  r1 = json.loads((work / 'rounds' / 'round_1' / 'config.json').read_text())
  assert r1['data']['dir'] == str(work / 'rounds' / 'round_1' / 'dataset' / 'images')
  assert r1['train']['init_from'] == ''                  # from scratch: the same budget
