"""The contamination experiment's summary (experiments/extrinsic_experiment.sh step 5), as markdown.

python experiments/extrinsic_summary.py RESULTS_DIR
Restoration: round 0 (contaminated data), round 1 (cleaned data, where it ran), the oracle
(pristine data) and the control (pristine data through round 0's cleaner, where it ran) on the
same pristine evaluation faces, at each evaluated step count, per training seed; the
differences from round 0 (and round 1 − control, control − oracle) with 95% intervals over seeds
and faces (bootstrap.seeds_and_faces_interval); then docs/PROTOCOL.md's contrasts with the
seed-level t-interval over the seed means (bootstrap.seed_t_interval, the primary interval) and
the share of the oracle's lead that round 1 wins back, also net of the cleaner's output where
the control ran, as a ratio only where the lead's seed-level interval excludes zero (Fieller's
interval over the seed means, bootstrap.fieller_ratio_interval).
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
ARMS = {
  'round_0': 'round 0 (contaminated data)',
  'round_1': 'round 1 (cleaned data)',
  'oracle': 'oracle (pristine data)',
  'control': 'control (pristine data through the cleaner)',
}


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
      k.split(', ')[-1]: v for k, v in table.items() if k.startswith('restored')
    }
    lq[int(seed)] = table['LQ input']
  return {a: arms[a] for a in ARMS if a in arms}, lq


def scores(arm_rows, seeds, sampling, metric):
  """(seeds, faces) per-image scores of one arm; faces in one order for every arm."""
  return np.array([arm_rows[s][sampling]['metrics'][metric]['per_image'] for s in seeds])


def _t_cell(r, digits=4, ratio=False):
  """A difference signed, bold where its interval excludes 0; a ratio unsigned, bold where its
  interval excludes 1."""
  sign = '' if ratio else '+'
  text = f'{r["mean"]:{sign}.{digits}f} [{r["low"]:{sign}.{digits}f}, {r["high"]:{sign}.{digits}f}]'
  bold = not r['low'] <= 1 <= r['high'] if ratio else r['excludes_zero']
  return f'**{text}**' if bold else text


def contrasts(arms, lq, seeds, sampling, m):
  """PROTOCOL.md's contrasts as (label, per-seed values), for the arms that ran."""
  mean = lambda a: scores(arms[a], seeds, sampling, m).mean(axis=1)  # noqa: E731
  lq_mean = np.array([np.mean(lq[s]['metrics'][m]['per_image']) for s in seeds])
  out = [
    ('oracle − LQ', mean('oracle') - lq_mean),
    ('G = oracle − round 0', mean('oracle') - mean('round_0')),
  ]
  if 'round_1' in arms:
    out += [
      ('R = round 1 − round 0', mean('round_1') - mean('round_0')),
      ('round 1 − oracle', mean('round_1') - mean('oracle')),
    ]
  if 'control' in arms and 'round_1' in arms:
    k = mean('control') - mean('oracle')
    out += [
      ('K = control − oracle', k),
      (
        "N = R − K (the harm removed, net of the cleaner's output)",
        mean('round_1') - mean('round_0') - k,
      ),
    ]
  return out


def seed_level(arms, lq, seeds, samplings):
  """The protocol's contrasts with t-intervals over the seed means, and Fieller shares."""
  print(
    f"\nThe contrasts of docs/PROTOCOL.md, each seed's mean over the faces, with the 95% "
    f't-interval over the {len(seeds)} seed means (the primary interval; bold where it '
    'excludes 0):\n'
  )
  if len(seeds) < 2:
    print('One training seed: no seed-level interval.')
    return
  print(
    '| contrast | sampling | ' + ' | '.join(reports.metric_label(m, {}) for m in METRICS) + ' |'
  )
  print('| --- | --- |' + ' --- |' * len(METRICS))
  for sampling in samplings:
    table = {m: contrasts(arms, lq, seeds, sampling, m) for m in METRICS}
    for i, (label, _) in enumerate(table[METRICS[0]]):
      cells = [_t_cell(bootstrap.seed_t_interval(table[m][i][1])) for m in METRICS]
      print(f'| {label} | {sampling} | ' + ' | '.join(cells) + ' |')
  if 'round_1' not in arms:
    return
  control = 'control' in arms
  print(
    "\nShare of the oracle's lead that round 1 wins back, R / G, and net of the cleaner's "
    "output, N / G = 1 − (control − round 1) / G: a ratio only where G's seed-level interval "
    'excludes 0, with Fieller\'s 95% interval over the seed means ("unbounded" where that '
    'interval is not bounded); otherwise read round 1 − oracle and N above:\n'
  )
  print(
    '| sampling | metric | G = oracle − round 0 | share won back |'
    + (" share net of the cleaner's output |" if control else '')
  )
  print('| --- | --- | --- | --- |' + (' --- |' if control else ''))
  for sampling in samplings:
    for m in METRICS:
      c = dict(contrasts(arms, lq, seeds, sampling, m))
      gap = c['G = oracle − round 0']
      g = bootstrap.seed_t_interval(gap)
      nums = [c['R = round 1 − round 0']]
      if control:
        nums.append(c["N = R − K (the harm removed, net of the cleaner's output)"])
      cells = []
      for num in nums:
        if not g['excludes_zero']:
          cells.append("not given: the lead's interval includes 0")
          continue
        f = bootstrap.fieller_ratio_interval(num, gap)
        cells.append(
          f'{f["mean"]:+.2f} [{f["low"]:+.2f}, {f["high"]:+.2f}]'
          if f['bounded']
          else f'{f["mean"]:+.2f}, unbounded'
        )
      print(
        f'| {sampling} | {reports.metric_label(m, {})} | {_t_cell(g)} | ' + ' | '.join(cells) + ' |'
      )


def cleaning_seed_level(out):
  """PROTOCOL.md's (F): each seed's cleaning, cleaned − contaminated against the originals and
  the cleaned faces' sharpness as a share of the pristine faces', t-intervals over the seeds."""
  rows = {}
  for path in sorted(glob.glob(os.path.join(out, 'cleaning_seed_*', 'cleaning.json'))):
    seed = int(os.path.basename(os.path.dirname(path)).split('_')[-1])
    report = _load(path)
    c = report.get('contaminated_and_cleaned')
    if not c:
      continue
    row = {
      f'{m}: cleaned − contaminated': c['delta'][m]['mean'] for m in METRICS if m in c['delta']
    }
    for key, what in (('contaminated_and_cleaned', 'damaged'), ('clean_but_cleaned', 'undamaged')):
      q = (report.get(key) or {}).get('quality')
      if q:
        for k, v in q['cleaned_over_pristine'].items():
          row[f'{k}, {what} faces: cleaned / pristine'] = v
        if 'niqe' in q['means']['cleaned']:
          row[f'niqe, {what} faces: cleaned − pristine'] = (
            q['means']['cleaned']['niqe'] - q['means']['pristine']['niqe']
          )
    rows[seed] = row
  if len(rows) < 2:
    return
  seeds = sorted(rows)
  keys = [k for k in rows[seeds[0]] if all(k in rows[s] for s in seeds)]
  print(
    f"\n## The cleanings over the {len(seeds)} seeds\n\nEach seed's round-0 model cleaning "
    'its own training faces: the mean over the faces per seed, then the 95% t-interval over '
    'the seeds (bold where it excludes 0; for a ratio, where it excludes 1):\n'
  )
  print('| measure | ' + ' | '.join(f'seed {s}' for s in seeds) + ' | over the seeds |')
  print('| --- |' + ' --- |' * (len(seeds) + 1))
  for k in keys:
    values = [rows[s][k] for s in seeds]
    ratio = ' / ' in k
    print(
      f'| {k} | '
      + ' | '.join(f'{v:.4f}' if ratio else f'{v:+.4f}' for v in values)
      + ' | '
      + _t_cell(bootstrap.seed_t_interval(values), ratio=ratio)
      + ' |'
    )


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
  print(
    f'## Restoration on the pristine evaluation faces ({len(seeds)} training seeds: '
    f'{", ".join(map(str, seeds))})\n'
  )
  print(
    '| arm | sampling | seed | ' + ' | '.join(reports.metric_label(m, {}) for m in METRICS) + ' |'
  )
  print('| --- | --- | --- |' + ' --- |' * len(METRICS))
  for s in seeds:
    print(
      f'| LQ input | | {s} | '
      + ' | '.join(f'{lq[s]["metrics"][m]["mean"]:.4f}' for m in METRICS)
      + ' |'
    )
  for sampling in samplings:
    for a, rows in arms.items():
      for s in seeds:
        print(
          f'| {ARMS[a]} | {sampling} | {s} | '
          + ' | '.join(f'{rows[s][sampling]["metrics"][m]["mean"]:.4f}' for m in METRICS)
          + ' |'
        )
  print(
    '\nDifference from round 0 (mean; 95% interval resampling training seeds and faces, '
    'paired; bold where it excludes 0):\n'
  )
  print('| | sampling | ' + ' | '.join(reports.metric_label(m, {}) for m in METRICS) + ' |')
  print('| --- | --- |' + ' --- |' * len(METRICS))
  for sampling in samplings:
    base = {m: scores(arms['round_0'], seeds, sampling, m) for m in METRICS}
    for a in [a for a in arms if a != 'round_0']:
      cells = [
        reports.format_delta(
          bootstrap.seeds_and_faces_interval(scores(arms[a], seeds, sampling, m), base[m])
        )
        for m in METRICS
      ]
      print(f'| {ARMS[a]} − round 0 | {sampling} | ' + ' | '.join(cells) + ' |')
  if 'control' in arms and 'round_1' in arms:
    print(
      '\nThe control against round 1 and the oracle (same resampling): round 1 − control is '
      'what the contamination still costs after cleaning, both arms having trained on the '
      "cleaner's output; control − oracle is what training on that output does to pristine "
      'faces:\n'
    )
    print('| | sampling | ' + ' | '.join(reports.metric_label(m, {}) for m in METRICS) + ' |')
    print('| --- | --- |' + ' --- |' * len(METRICS))
    for sampling in samplings:
      for a, b in (('round_1', 'control'), ('control', 'oracle')):
        cells = [
          reports.format_delta(
            bootstrap.seeds_and_faces_interval(
              scores(arms[a], seeds, sampling, m), scores(arms[b], seeds, sampling, m)
            )
          )
          for m in METRICS
        ]
        print(f'| {ARMS[a]} − {ARMS[b]} | {sampling} | ' + ' | '.join(cells) + ' |')
  seed_level(arms, lq, seeds, samplings)
  for path in sorted(glob.glob(os.path.join(out, 'cleaning_seed_*', 'cleaning.md'))):
    seed = os.path.basename(os.path.dirname(path)).split('_')[-1]
    with open(path) as f:
      print(
        '\n' + f.read().replace('# Cleaning', f'## Cleaning by the round-0 model of seed {seed}', 1)
      )
  cleaning_seed_level(out)
  keys = ('fd_dlib', 'face_rate', 'niqe')
  gens = {
    v: os.path.join(out, f'generator_{v}_metrics.json')
    for v in ('contaminated', 'cleaned', 'pristine')
  }
  gens = {v: p for v, p in gens.items() if os.path.exists(p)}
  if gens:
    print('## Generators trained on each version of the training faces\n')
    print('| trained on | ' + ' | '.join(reports.metric_label(k, {}) for k in keys) + ' |')
    print('| --- |' + ' --- |' * len(keys))
    for v, path in gens.items():
      m = _load(path)['metrics']
      print(
        f'| {v} | '
        + ' | '.join('n/a' if m[k]['mean'] is None else f'{m[k]["mean"]:.4f}' for k in keys)
        + ' |'
      )


if __name__ == '__main__':
  main(sys.argv[1])
