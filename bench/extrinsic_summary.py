"""The contamination experiment's summary (bench/extrinsic_experiment.sh step 5), as markdown.

python bench/extrinsic_summary.py WORKDIR
Restoration: round 0 (contaminated data), round 1 (cleaned data) and the oracle (pristine data)
on the same pristine validation faces, at each evaluated step count, with paired-bootstrap
intervals of round 1 - round 0 and oracle - round 0 per image. Then the cleaning report and the
generators' offline distribution scores.
"""
import glob
import json
import os
import sys

from idm_jax.metrics import bootstrap
from idm_jax.metrics import reports

METRICS = ('psnr', 'ssim', 'identity')


def restored_rows(path):
  """{sampling label: row} of an evaluation's metrics.json (e.g. '1 steps'), and the LQ row."""
  with open(path) as f:
    table = json.load(f)
  rows = {k.split(', ')[-1]: v for k, v in table.items() if k.startswith('restored')}
  return rows, table['LQ input']


def main(work):
  arms = {'round 0 (contaminated data)': f'{work}/rounds/round_0/eval/metrics.json',
          'round 1 (cleaned data)': f'{work}/rounds/round_1/eval/metrics.json',
          'oracle (pristine data)': sorted(glob.glob(f'{work}/oracle/eval/step_*/metrics.json'))[-1]}
  rows = {name: restored_rows(path) for name, path in arms.items()}
  lq = next(iter(rows.values()))[1]
  samplings = list(next(iter(rows.values()))[0])
  print('## Restoration on the pristine validation faces\n')
  print('| arm | sampling | ' + ' | '.join(reports.metric_label(m, {}) for m in METRICS) + ' |')
  print('| --- | --- |' + ' --- |' * len(METRICS))
  print('| LQ input | | ' + ' | '.join(f"{lq['metrics'][m]['mean']:.4f}" for m in METRICS) + ' |')
  for sampling in samplings:
    for name, (arm_rows, _) in rows.items():
      print(f'| {name} | {sampling} | ' + ' | '.join(
          f"{arm_rows[sampling]['metrics'][m]['mean']:.4f}" for m in METRICS) + ' |')
  print('\nPer-image difference against round 0 (mean, paired-bootstrap 95% interval):\n')
  print('| | sampling | ' + ' | '.join(reports.metric_label(m, {}) for m in METRICS) + ' |')
  print('| --- | --- |' + ' --- |' * len(METRICS))
  for sampling in samplings:
    base = rows['round 0 (contaminated data)'][0][sampling]
    for name in list(rows)[1:]:
      row = rows[name][0][sampling]
      cells = [reports.format_delta(bootstrap.paired_interval(
          row['metrics'][m]['per_image'], base['metrics'][m]['per_image'])) for m in METRICS]
      print(f'| {name} - round 0 | {sampling} | ' + ' | '.join(cells) + ' |')
  print()
  with open(f'{work}/results/cleaning.md') as f:
    print(f.read().replace('# Cleaning', '## Cleaning'))
  print('## Generators trained on each version of the training faces\n')
  keys = ('fd_dlib', 'face_rate', 'niqe')
  print('| trained on | ' + ' | '.join(reports.metric_label(k, {}) for k in keys) + ' |')
  print('| --- |' + ' --- |' * len(keys))
  for v in ('contaminated', 'cleaned', 'pristine'):
    path = f'{work}/eval_gen_{v}/metrics.json'
    if not os.path.exists(path):
      continue
    with open(path) as f:
      m = json.load(f)['metrics']
    print(f'| {v} | ' + ' | '.join('n/a' if m[k]['mean'] is None else f"{m[k]['mean']:.4f}"
                                   for k in keys) + ' |')


if __name__ == '__main__':
  main(sys.argv[1])
