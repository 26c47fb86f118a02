"""The contamination experiment's summary (bench/extrinsic_experiment.sh step 5), as markdown.

python bench/extrinsic_summary.py WORKDIR
Restoration: round 0 (contaminated data), round 1 (cleaned data) and the oracle (pristine data)
on the same pristine validation faces, each arm's last evaluated row, with paired-bootstrap
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


def last_row(path):
  """The last restored row of an evaluation's metrics.json, and the LQ row."""
  with open(path) as f:
    table = json.load(f)
  rows = [k for k in table if k.startswith('restored')]
  return table[rows[-1]], table['LQ input'], rows[-1]


def main(work):
  arms = {'round 0 (contaminated data)': f'{work}/rounds/round_0/eval/metrics.json',
          'round 1 (cleaned data)': f'{work}/rounds/round_1/eval/metrics.json',
          'oracle (pristine data)': sorted(glob.glob(f'{work}/oracle/eval/step_*/metrics.json'))[-1]}
  rows = {name: last_row(path) for name, path in arms.items()}
  lq = next(iter(rows.values()))[1]
  print('## Restoration on the pristine validation faces\n')
  print('| arm | ' + ' | '.join(reports.metric_label(m, {}) for m in METRICS) + ' |')
  print('| --- |' + ' --- |' * len(METRICS))
  print('| LQ input | ' + ' | '.join(f"{lq['metrics'][m]['mean']:.4f}" for m in METRICS) + ' |')
  for name, (row, _, label) in rows.items():
    print(f'| {name}, {label.split(", ")[-1]} | '
          + ' | '.join(f"{row['metrics'][m]['mean']:.4f}" for m in METRICS) + ' |')
  base = rows['round 0 (contaminated data)'][0]
  print('\nPer-image difference against round 0 (mean, paired-bootstrap 95% interval):\n')
  print('| | ' + ' | '.join(reports.metric_label(m, {}) for m in METRICS) + ' |')
  print('| --- |' + ' --- |' * len(METRICS))
  for name in list(rows)[1:]:
    row = rows[name][0]
    cells = [reports.format_delta(bootstrap.paired_interval(
        row['metrics'][m]['per_image'], base['metrics'][m]['per_image'])) for m in METRICS]
    print(f'| {name} - round 0 | ' + ' | '.join(cells) + ' |')
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
