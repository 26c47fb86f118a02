"""experiments/cleaning_fidelity.sh's summary, as markdown: each arm's three measures, and each arm
against the first (the reference) with paired-bootstrap 95% intervals over the faces.

python experiments/cleaning_fidelity_summary.py OUT ARM [ARM...]
(an ARM is the name given to cleaning_fidelity.sh; a path's last component is taken as its name.)
The cleaning section adds, where the reports have them (cleaning_eval since the sharpness
measures), the cleaned faces' sharpness and NIQE against the pristine and contaminated ones.
"""

import json
import os
import sys

import numpy as np

from idm_jax.metrics import bootstrap
from idm_jax.metrics import reports

METRICS = ('psnr', 'ssim', 'identity')


def _load(path):
  with open(path) as f:
    return json.load(f)


def _interval(values):
  """The mean of `values` with its bootstrap interval (the difference from zero)."""
  values = np.asarray(values, np.float64)
  return bootstrap.paired_interval(values, np.zeros_like(values))


def _cell(d, digits=3):
  return f'{d["mean"]:.{digits}f} [{d["low"]:.{digits}f}, {d["high"]:.{digits}f}]'


def _per_image(metrics, m):
  return metrics[m]['per_image']


def main(out, workdirs):
  arms = [os.path.basename(w.rstrip('/')) for w in workdirs]
  self_ = _every(out, arms, 'self/metrics.json')
  clean = _every(out, arms, 'cleaning/cleaning.json')
  heavy = _every(out, arms, 'heavy_metrics.json')
  if self_:
    _self_section(arms, {a: m['metrics'] for a, m in self_.items()})
  if clean:
    _clean_section(arms, clean)
  if heavy:
    _heavy_section(arms, heavy)


def _every(out, arms, path):
  """{arm: that file of the arm}, or {} unless every arm has it (a measure not taken)."""
  paths = {a: os.path.join(out, a, path) for a in arms}
  return {a: _load(p) for a, p in paths.items()} if all(map(os.path.exists, paths.values())) else {}


def _self_section(arms, self_):
  ref = arms[0]
  print('## 1. Pristine validation faces given as their own LQ, output against the face\n')
  print('| arm | ' + ' | '.join(reports.metric_label(m, {}) for m in METRICS) + ' |')
  print('| --- |' + ' --- |' * len(METRICS))
  for a in arms:
    print(
      f'| {a} | ' + ' | '.join(_cell(_interval(_per_image(self_[a], m))) for m in METRICS) + ' |'
    )
  for a in arms[1:]:
    print(
      f'| {a} − {ref} | '
      + ' | '.join(
        reports.format_delta(
          bootstrap.paired_interval(_per_image(self_[a], m), _per_image(self_[ref], m))
        )
        for m in METRICS
      )
      + ' |'
    )


def _clean_section(arms, clean):
  ref = arms[0]
  print('\n## 2. Cleaning the contaminated training set, against the pristine originals\n')
  sel = clean[ref]['selection']
  print(
    f'Selection ({clean[ref]["selection_score"]} score): precision {sel["precision"]:.3f}, '
    f'{sel["true_positives"]} of {sel["selected"]} selected faces were contaminated '
    f'(chance {sel["chance_precision"]:.3f}).\n'
  )
  print(
    '| arm | '
    + ' | '.join(f'{reports.metric_label(m, {})}: cleaned − contaminated' for m in METRICS)
    + ' | faces improved (PSNR) | pristine faces '
    'cleaned anyway, PSNR against themselves |'
  )
  print('| --- |' + ' --- |' * (len(METRICS) + 2))
  for a in arms:
    c = clean[a]['contaminated_and_cleaned']['per_image']
    cells = [
      reports.format_delta(bootstrap.paired_interval(c['after'][m], c['before'][m]))
      for m in METRICS
    ]
    d = bootstrap.paired_interval(c['after']['psnr'], c['before']['psnr'])
    anyway = (
      clean[a].get('clean_but_cleaned', {}).get('per_image', {}).get('after', {}).get('psnr', [])
    )
    anyway_cell = _cell(_interval(anyway), 2) + f' (n={len(anyway)})' if anyway else 'none'
    print(
      f'| {a} | ' + ' | '.join(cells) + f' | {round(d["improved"] * d["n"])} of {d["n"]} | '
      f'{anyway_cell} |'
    )
  for a in arms[1:]:
    ca, cr = clean[a]['contaminated_and_cleaned'], clean[ref]['contaminated_and_cleaned']
    if ca['names'] == cr['names']:
      print(
        f'| {a} − {ref} (cleaned faces) | '
        + ' | '.join(
          reports.format_delta(
            bootstrap.paired_interval(ca['per_image']['after'][m], cr['per_image']['after'][m])
          )
          for m in METRICS
        )
        + ' | | |'
      )
  _quality_table(arms, clean)
  kinds = clean[ref]['contaminated_and_cleaned'].get('kinds')
  if kinds:
    print('\nPSNR, cleaned − contaminated, by defect:\n')
    print('| arm | ' + ' | '.join(f'{k} ({kinds.count(k)})' for k in sorted(set(kinds))) + ' |')
    print('| --- |' + ' --- |' * len(set(kinds)))
    for a in arms:
      c = clean[a]['contaminated_and_cleaned']
      d = np.subtract(c['per_image']['after']['psnr'], c['per_image']['before']['psnr'])
      print(
        f'| {a} | '
        + ' | '.join(
          reports.format_delta(
            bootstrap.paired_interval(d[np.equal(c['kinds'], k)], np.zeros(kinds.count(k)))
          )
          for k in sorted(set(kinds))
        )
        + ' |'
      )


def _quality_table(arms, clean):
  """Sharpness (and NIQE) of the cleaned faces against the pristine and contaminated ones."""
  rows = []
  for a in arms:
    for key, what in (('contaminated_and_cleaned', 'damaged'), ('clean_but_cleaned', 'undamaged')):
      q = (clean[a].get(key) or {}).get('quality')
      if not q:
        continue
      for k in ('sharpness_lapvar', 'sharpness_grad', 'niqe'):
        if k not in q['means']['cleaned']:
          continue
        ratio = q['cleaned_over_pristine'].get(k)
        vs = [
          reports.format_delta(q[f'cleaned_minus_{o}'][k]) if f'cleaned_minus_{o}' in q else ''
          for o in ('pristine', 'contaminated')
        ]
        rows.append(
          f'| {a} | {what} | {k} | {q["means"]["pristine"][k]:.3f} | '
          f'{q["means"]["cleaned"][k]:.3f} | {vs[0]} | {vs[1]} | '
          + (f'{ratio:.3f}' if ratio is not None else '')
          + ' |'
        )
  if rows:
    print(
      '\nWhat cleaning does to sharpness (Laplacian variance, gradient magnitude: higher is '
      'sharper) and NIQE (lower is better):\n'
    )
    print(
      '| arm | faces | measure | pristine | cleaned | cleaned − pristine | '
      'cleaned − contaminated | cleaned / pristine |'
    )
    print('| --- | --- | --- | --- | --- | --- | --- | --- |')
    print('\n'.join(rows))


def _heavy_section(arms, heavy):
  ref = arms[0]
  print('\n## 3. The heavily degraded validation set (the usual evaluation)\n')
  samplings = [k for k in heavy[ref] if k.startswith('restored')]
  print('| arm | sampling | ' + ' | '.join(reports.metric_label(m, {}) for m in METRICS) + ' |')
  print('| --- | --- |' + ' --- |' * len(METRICS))
  lq = heavy[ref]['LQ input']['metrics']
  print('| LQ input | | ' + ' | '.join(f'{lq[m]["mean"]:.4f}' for m in METRICS) + ' |')
  for s in samplings:
    for a in arms:
      print(
        f'| {a} | {s} | '
        + ' | '.join(f'{heavy[a][s]["metrics"][m]["mean"]:.4f}' for m in METRICS)
        + ' |'
      )
    for a in arms[1:]:
      print(
        f'| {a} − {ref} | {s} | '
        + ' | '.join(
          reports.format_delta(
            bootstrap.paired_interval(
              _per_image(heavy[a][s]['metrics'], m), _per_image(heavy[ref][s]['metrics'], m)
            )
          )
          for m in METRICS
        )
        + ' |'
      )


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2:])
