"""The ablation table of docs/RESULTS.md from experiments/ablation_64.sh's workdirs.

python experiments/ablation_table.py ROOT ARM[=label] ...
One row per arm and sampler setting: PSNR, SSIM and identity, each as the per-image difference
against the LQ input with its paired-bootstrap 95% interval (bold where it excludes 0).
"""

import glob
import json
import sys

from idm_jax.metrics import reports

METRICS = ('psnr', 'ssim', 'identity')


def rows(root, arm):
  """(eval folder, {row name: result}) of each evaluation of an arm, oldest first."""
  out = []
  # A workdir's eval/<step>/metrics.json, or the copies kept in docs/results (metrics_<step>.json).
  paths = [(p, p.split('/')[-2]) for p in glob.glob(f'{root}/{arm}/eval/*/metrics.json')]
  paths += [
    (p, p.split('/')[-1][len('metrics_') : -len('.json')])
    for p in glob.glob(f'{root}/{arm}/metrics_*.json')
  ]
  for path, step_dir in sorted(paths, key=lambda x: x[1]):
    with open(path) as f:
      table = json.load(f)
    out.append((step_dir, {k: v for k, v in table.items() if isinstance(v, dict)}))
  return out


def main(root, arms):
  lq = None
  print(
    '| arm | sampling | '
    + ' | '.join(f'{reports.metric_label(m, {})} - LQ' for m in METRICS)
    + ' |'
  )
  print('| --- | --- |' + ' --- |' * len(METRICS))
  for spec in arms:
    arm, _, label = spec.partition('=')
    for step_dir, table in rows(root, arm):
      lq = table['LQ input']
      for name, result in table.items():
        if name == 'LQ input':
          continue
        d = result['delta']['metrics']
        cells = [reports.format_delta(d[m]) if m in d else 'n/a' for m in METRICS]
        print(
          f'| {label or arm} ({step_dir.replace("_", " ")}) | {name} | ' + ' | '.join(cells) + ' |'
        )
  if lq:
    print(
      '\nLQ input: '
      + ', '.join(f'{reports.metric_label(m, {})} {lq["metrics"][m]["mean"]:.4f}' for m in METRICS)
    )


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2:])
