"""The contamination experiment's summary (experiments/extrinsic_experiment.sh step 5), as markdown.

python experiments/extrinsic_summary.py RESULTS_DIR
Restoration: round 0 (contaminated data), round 1 (cleaned data, where it ran), the oracle
(pristine data) and the control (pristine data through round 0's cleaner, where it ran) on the
same pristine validation faces, at each evaluated step count, per training seed; the
differences from round 0 (and round 1 − control, control − oracle) with 95% intervals over seeds
and faces (bootstrap.seeds_and_faces_interval), and the share of the oracle's lead that round 1
wins back (bootstrap.gap_share_interval), also net of the cleaner's output where the control ran.
Then each seed's cleaning against the truth and the generators'
offline distribution scores.
"""
import glob
import json
import os
import re
import sys

import numpy as np

from idm_jax.metrics import bootstrap
from idm_jax.metrics import reports

METRICS = ('psnr', 'ssim', 'identity')
ARMS = {'round_0': 'round 0 (contaminated data)', 'round_1': 'round 1 (cleaned data)',
        'oracle': 'oracle (pristine data)',
        'control': 'control (pristine data through the cleaner)'}


def _load(path):
  with open(path) as f:
    return json.load(f)


def load_arms(out):
  """{arm: {seed: {sampling label ('1 steps'): evaluate_images result}}}, and the LQ rows."""
  arms, lq = {}, {}
  for path in sorted(glob.glob(os.path.join(out, '*_seed_*_metrics.json'))):
    arm, seed = re.fullmatch(r'(.+)_seed_(\d+)_metrics\.json', os.path.basename(path)).groups()
    table = _load(path)
    arms.setdefault(arm, {})[int(seed)] = {
        k.split(', ')[-1]: v for k, v in table.items() if k.startswith('restored')}
    lq[int(seed)] = table['LQ input']
  return {a: arms[a] for a in ARMS if a in arms}, lq


def scores(arm_rows, seeds, sampling, metric):
  """(seeds, faces) per-image scores of one arm; faces in one order for every arm."""
  return np.array([arm_rows[s][sampling]['metrics'][metric]['per_image'] for s in seeds])


def main(out):
  arms, lq = load_arms(out)
  if 'round_0' not in arms or 'oracle' not in arms:
    raise SystemExit(f'{out}: no round 0 or oracle metrics (*_seed_*_metrics.json)')
  seeds = sorted(set(arms['round_0']) & set(arms['oracle']))
  samplings = list(arms['round_0'][seeds[0]])
  for a, rows in arms.items():
    for s in seeds:
      if rows[s][samplings[0]]['names'] != arms['round_0'][s][samplings[0]]['names']:
        raise SystemExit(f'{out}: {a} seed {s} was scored on other faces than round 0')
  print(f'## Restoration on the pristine validation faces ({len(seeds)} training seeds: '
        f'{", ".join(map(str, seeds))})\n')
  print('| arm | sampling | seed | ' + ' | '.join(reports.metric_label(m, {}) for m in METRICS)
        + ' |')
  print('| --- | --- | --- |' + ' --- |' * len(METRICS))
  for s in seeds:
    print(f'| LQ input | | {s} | ' + ' | '.join(f"{lq[s]['metrics'][m]['mean']:.4f}"
                                              for m in METRICS) + ' |')
  for sampling in samplings:
    for a, rows in arms.items():
      for s in seeds:
        print(f'| {ARMS[a]} | {sampling} | {s} | ' + ' | '.join(
            f"{rows[s][sampling]['metrics'][m]['mean']:.4f}" for m in METRICS) + ' |')
  print('\nDifference from round 0 (mean; 95% interval resampling training seeds and faces, '
        'paired; bold where it excludes 0):\n')
  print('| | sampling | ' + ' | '.join(reports.metric_label(m, {}) for m in METRICS) + ' |')
  print('| --- | --- |' + ' --- |' * len(METRICS))
  for sampling in samplings:
    base = {m: scores(arms['round_0'], seeds, sampling, m) for m in METRICS}
    for a in [a for a in arms if a != 'round_0']:
      cells = [reports.format_delta(bootstrap.seeds_and_faces_interval(
          scores(arms[a], seeds, sampling, m), base[m])) for m in METRICS]
      print(f'| {ARMS[a]} − round 0 | {sampling} | ' + ' | '.join(cells) + ' |')
  if 'control' in arms and 'round_1' in arms:
    print('\nThe control against round 1 and the oracle (same resampling): round 1 − control is '
          'what the contamination still costs after cleaning, both arms having trained on the '
          'cleaner\'s output; control − oracle is what training on that output does to pristine '
          'faces:\n')
    print('| | sampling | ' + ' | '.join(reports.metric_label(m, {}) for m in METRICS) + ' |')
    print('| --- | --- |' + ' --- |' * len(METRICS))
    for sampling in samplings:
      for a, b in (('round_1', 'control'), ('control', 'oracle')):
        cells = [reports.format_delta(bootstrap.seeds_and_faces_interval(
            scores(arms[a], seeds, sampling, m), scores(arms[b], seeds, sampling, m)))
            for m in METRICS]
        print(f'| {ARMS[a]} − {ARMS[b]} | {sampling} | ' + ' | '.join(cells) + ' |')
  if 'round_1' in arms:
    control = 'control' in arms
    print('\nShare of the oracle\'s lead that round 1 wins back, (round 1 − round 0) / '
          '(oracle − round 0), with its 95% interval (same resampling); it means something only '
          'where the lead\'s own interval excludes 0' + (
              '. Net of the cleaner\'s output: the same with round 1 less what that output does '
              'to pristine faces (control − oracle), i.e. 1 − (control − round 1) / (oracle − '
              'round 0), the share of the contamination\'s harm that cleaning removed' if control
              else '') + ':\n')
    print('| sampling | metric | oracle − round 0 | share won back |'
          + (' share net of the cleaner\'s output |' if control else ''))
    print('| --- | --- | --- | --- |' + (' --- |' if control else ''))
    for sampling in samplings:
      for m in METRICS:
        r0, r1, orc = (scores(arms[a], seeds, sampling, m) for a in ('round_0', 'round_1', 'oracle'))
        shares = [bootstrap.gap_share_interval(r0, r1, orc)]
        if control:
          shares.append(bootstrap.gap_share_interval(
              r0, r1 - (scores(arms['control'], seeds, sampling, m) - orc), orc))
        lead = reports.format_delta(shares[0]['gap'])
        cells = [f"{g['mean']:+.2f} [{g['low']:+.2f}, {g['high']:+.2f}]"
                 if g['gap']['excludes_zero'] else 'no lead to win back' for g in shares]
        print(f'| {sampling} | {reports.metric_label(m, {})} | {lead} | ' + ' | '.join(cells)
              + ' |')
  for path in sorted(glob.glob(os.path.join(out, 'cleaning_seed_*', 'cleaning.md'))):
    seed = os.path.basename(os.path.dirname(path)).split('_')[-1]
    with open(path) as f:
      print('\n' + f.read().replace('# Cleaning', f'## Cleaning by the round-0 model of seed '
                                                 f'{seed}', 1))
  keys = ('fd_dlib', 'face_rate', 'niqe')
  gens = {v: os.path.join(out, f'generator_{v}_metrics.json')
          for v in ('contaminated', 'cleaned', 'pristine')}
  gens = {v: p for v, p in gens.items() if os.path.exists(p)}
  if gens:
    print('## Generators trained on each version of the training faces\n')
    print('| trained on | ' + ' | '.join(reports.metric_label(k, {}) for k in keys) + ' |')
    print('| --- |' + ' --- |' * len(keys))
    for v, path in gens.items():
      m = _load(path)['metrics']
      print(f'| {v} | ' + ' | '.join('n/a' if m[k]['mean'] is None else f"{m[k]['mean']:.4f}"
                                     for k in keys) + ' |')


if __name__ == '__main__':
  main(sys.argv[1])
