r"""Scores a cleaned dataset against the ground truth of a controlled contamination.

  python -m idm_jax.extrinsic.cleaning_eval --cleaned ROUND1/dataset --contaminated C/ --pristine P/ \
      --out report/

C/ and P/ come from `idm_jax.data.contaminate` with the same source and resolution (P/ with
--fraction 0), so P/images/x.png is the truth for C/images/x.png. The cleaned dataset (the
output of `--config.mode=clean` or an extrinsic round) cleaned C/'s training split. Every folder
may be local or in a bucket (gs://...), where `--config.mode=clean` writes into a bucket workdir.
Reported:
  selection  precision and recall of the images the cleaning chose against the contaminated set;
  cleaning   on the contaminated images it chose: PSNR / SSIM / identity of the cleaned image
             against the pristine original, next to the contaminated image against the same
             original, with paired-bootstrap intervals of the difference (did cleaning move them
             toward the truth?); on the chosen images that were never contaminated: how far
             cleaning moved a good image from itself;
  quality    of the same images in each version (pristine, contaminated, cleaned): NIQE (with
             --niqe_params) and two sharpness measures (metrics/sharpness.py), with the cleaned
             version's differences from the others and its sharpness as a share of the pristine
             version's: a cleaning can gain PSNR by smoothing (averaging draws does), and only
             these show it.
"""

from __future__ import annotations

import json
import sys
from typing import Sequence

import numpy as np

from idm_jax.data import contaminate
from idm_jax.data import sources
from idm_jax.extrinsic import cleaned_dataset
from idm_jax.metrics import bootstrap
from idm_jax.metrics import niqe
from idm_jax.metrics import reports
from idm_jax.metrics import scoring
from idm_jax.metrics import sharpness
from idm_jax.runtime import cli
from idm_jax.storage import files
from idm_jax.storage import images

# The no-reference measures of each version of the cleaned images; the first two always exist.
QUALITY = ('sharpness_lapvar', 'sharpness_grad', 'niqe')
QUALITY_LABELS = dict(
  sharpness_lapvar='Laplacian variance ↑ sharper',
  sharpness_grad='gradient magnitude ↑ sharper',
  niqe='NIQE ↓',
)


def selection_scores(selected: set[str], contaminated: set[str], universe: set[str]) -> dict:
  """Precision and recall of `selected` as a detector of `contaminated`, within `universe`."""
  selected, contaminated = selected & universe, contaminated & universe
  tp = len(selected & contaminated)
  precision = tp / len(selected) if selected else None
  recall = tp / len(contaminated) if contaminated else None
  f1 = (
    2 * precision * recall / (precision + recall)
    if precision and recall
    else (0.0 if precision is not None and recall is not None else None)
  )
  return dict(
    precision=precision,
    recall=recall,
    f1=f1,
    true_positives=tp,
    selected=len(selected),
    contaminated=len(contaminated),
    universe=len(universe),
    chance_precision=len(contaminated) / len(universe) if universe else None,
  )


def _load(directory: str, names: Sequence[str], resolution: int) -> list[np.ndarray]:
  """The images as training reads them (all are PNGs at the contamination's resolution)."""
  return [sources.load_image(files.join(directory, n), resolution) for n in names]


def quality(imgs: Sequence[np.ndarray], niqe_params=None) -> dict:
  """Per-image sharpness (both measures) and, with niqe_params, NIQE at the usual upscale."""
  out = dict(
    sharpness_lapvar=[sharpness.laplacian_variance(x) for x in imgs],
    sharpness_grad=[sharpness.gradient_magnitude(x) for x in imgs],
  )
  if niqe_params is not None:
    up = niqe.upscale_for(min(imgs[0].shape[:2]))
    r = scoring.evaluate_images(
      list(imgs), None, niqe_params=niqe_params, niqe_upscale=up, identity=False, progress=False
    )
    if r['metrics']['niqe'].get('per_image') is not None:
      out['niqe'] = r['metrics']['niqe']['per_image']
      out['niqe_upscale'] = up
  return out


def compare_versions(versions: dict[str, dict], *, seed: int = 0) -> dict:
  """Means of each version's quality measures, and the cleaned version against the others.

  versions: {'pristine': quality(...), 'cleaned': ..., ['contaminated': ...]} of the same
  images in the same order. Adds, per measure, cleaned − other with its paired interval, and
  for the sharpness measures cleaned / pristine (the ratio of the means).
  """
  out = dict(
    means={v: {k: float(np.mean(q[k])) for k in QUALITY if k in q} for v, q in versions.items()}
  )
  cleaned = versions['cleaned']
  for other in ('pristine', 'contaminated'):
    if other in versions:
      out[f'cleaned_minus_{other}'] = {
        k: bootstrap.paired_interval(cleaned[k], versions[other][k], seed=seed)
        for k in QUALITY
        if k in cleaned and k in versions[other]
      }
  out['cleaned_over_pristine'] = {
    k: out['means']['cleaned'][k] / out['means']['pristine'][k]
    for k in ('sharpness_lapvar', 'sharpness_grad')
    if out['means']['pristine'][k]
  }
  return out


def score(
  cleaned_dir: str,
  contaminated_dir: str,
  pristine_dir: str,
  *,
  identity: bool = True,
  seed: int = 0,
  niqe_params=None,
) -> dict:
  """The report as a dict (see the module docstring)."""
  cleaned = _read_json(files.join(cleaned_dir, cleaned_dataset.MANIFEST))
  contam = _read_json(files.join(contaminated_dir, contaminate.MANIFEST))
  pristine = _read_json(files.join(pristine_dir, contaminate.MANIFEST))
  if (
    pristine['num_contaminated']
    or pristine['resolution'] != contam['resolution']
    or [r['file'] for r in pristine['records']] != [r['file'] for r in contam['records']]
  ):
    raise ValueError(
      f'{pristine_dir} is not the pristine twin of {contaminated_dir}: make it '
      'with the same --src and --resolution and --fraction 0'
    )
  by_name = {r['name']: r for r in cleaned['records']}
  universe = set(by_name)
  chosen = {n for n, r in by_name.items() if r['action'] == 'cleaned'}
  truth = contaminate.contaminated_names(contam)
  report = dict(
    selection=selection_scores(chosen, truth, universe),
    selection_score=cleaned.get('settings', {}).get('score', 'niqe'),
  )
  kinds = {r['file']: r['defect']['kind'] for r in contam['records'] if 'defect' in r}
  report['selection']['found_by_kind'] = {
    k: sum(1 for n in chosen & truth if kinds[n] == k) for k in sorted(set(kinds.values()))
  }
  report['selection']['contaminated_by_kind'] = {
    k: sum(1 for v in kinds.values() if v == k) for k in sorted(set(kinds.values()))
  }
  img = lambda d: files.join(d, contaminate.IMAGES)  # noqa: E731
  res = int(contam['resolution'])
  kw = dict(niqe_params=None, identity=identity, progress=False)
  hit = sorted(chosen & truth)
  if hit:
    truth_imgs = _load(img(pristine_dir), hit, res)
    damaged = _load(img(contaminated_dir), hit, res)
    cleaned_imgs = _load(img(cleaned_dir), [by_name[n]['file'] for n in hit], res)
    before = scoring.evaluate_images(damaged, truth_imgs, **kw)
    after = scoring.evaluate_images(cleaned_imgs, truth_imgs, **kw)
    scoring.add_delta(after, before, 'contaminated image', seed=seed)
    report['contaminated_and_cleaned'] = dict(
      names=hit,
      kinds=[kinds[n] for n in hit],
      before=_means(before),
      after=_means(after),
      delta=after['delta']['metrics'],
      per_image=dict(before=_per_image(before), after=_per_image(after)),
      versions=dict(
        pristine=quality(truth_imgs, niqe_params),
        contaminated=quality(damaged, niqe_params),
        cleaned=quality(cleaned_imgs, niqe_params),
      ),
    )
    report['contaminated_and_cleaned']['quality'] = compare_versions(
      report['contaminated_and_cleaned']['versions'], seed=seed
    )
  false = sorted(chosen - truth)
  if false:
    truth_imgs = _load(img(pristine_dir), false, res)
    cleaned_imgs = _load(img(cleaned_dir), [by_name[n]['file'] for n in false], res)
    after = scoring.evaluate_images(cleaned_imgs, truth_imgs, **kw)
    versions = dict(
      pristine=quality(truth_imgs, niqe_params), cleaned=quality(cleaned_imgs, niqe_params)
    )
    report['clean_but_cleaned'] = dict(
      names=false,
      after=_means(after),
      per_image=dict(after=_per_image(after)),
      versions=versions,
      quality=compare_versions(versions, seed=seed),
    )
  return report


def _means(result: dict) -> dict:
  return {k: v['mean'] for k, v in result['metrics'].items() if v.get('mean') is not None}


def _per_image(result: dict) -> dict:
  """Each metric's values in the order of the report's names (to compare two cleanings)."""
  return {k: v['per_image'] for k, v in result['metrics'].items() if v.get('per_image')}


def _read_json(path: str) -> dict:
  if not files.isfile(path):
    raise FileNotFoundError(f'{path} is missing: is that folder a finished dataset?')
  return json.loads(files.read_text(path))


def markdown(report: dict) -> str:
  s = report['selection']
  pct = lambda x: 'n/a' if x is None else f'{x:.3f}'  # noqa: E731
  lines = [
    '# Cleaning against the ground truth',
    '',
    f'Selection by {report["selection_score"]}: {s["selected"]} of {s["universe"]} '
    f'training images chosen, {s["contaminated"]} contaminated.',
    '',
    *reports.table(
      ['precision', 'recall', 'F1', 'chance precision'],
      [[pct(s[k]) for k in ('precision', 'recall', 'f1', 'chance_precision')]],
    ),
    '',
    'Found by kind: '
    + ', '.join(
      f'{k} {s["found_by_kind"][k]} of {s["contaminated_by_kind"][k]}'
      for k in s['contaminated_by_kind']
    ),
  ]
  c = report.get('contaminated_and_cleaned')
  if c:
    names = list(c['delta'])
    lines += [
      '',
      f'Contaminated images that were cleaned ({len(c["names"])}), against their '
      'pristine originals:',
      '',
      *reports.table(
        [''] + [reports.metric_label(n, {}) for n in names],
        [
          ['contaminated'] + [f'{c["before"][n]:.4f}' for n in names],
          ['cleaned'] + [f'{c["after"][n]:.4f}' for n in names],
          ['cleaned - contaminated (95% interval)']
          + [reports.format_delta(c['delta'][n]) for n in names],
        ],
      ),
    ]
  f = report.get('clean_but_cleaned')
  if f:
    lines += [
      '',
      f'Pristine images that were cleaned anyway ({len(f["names"])}), cleaned '
      'against the original: '
      + ', '.join(f'{reports.metric_label(k, {})} {v:.4f}' for k, v in f['after'].items()),
    ]
  for key, what in (
    ('contaminated_and_cleaned', 'contaminated images that were cleaned'),
    ('clean_but_cleaned', 'pristine images that were cleaned anyway'),
  ):
    q = (report.get(key) or {}).get('quality')
    if q:
      names = [k for k in QUALITY if k in q['means']['cleaned']]
      rows = [[v] + [f'{q["means"][v][k]:.3f}' for k in names] for v in q['means']]
      for other in ('pristine', 'contaminated'):
        d = q.get(f'cleaned_minus_{other}')
        if d:
          rows.append(
            [f'cleaned − {other} (95% interval)'] + [reports.format_delta(d[k]) for k in names]
          )
      rows.append(
        ['cleaned / pristine']
        + [
          f'{q["cleaned_over_pristine"][k]:.3f}' if k in q['cleaned_over_pristine'] else ''
          for k in names
        ]
      )
      lines += [
        '',
        f'Sharpness and NIQE of the {what}, each version:',
        '',
        *reports.table([''] + [QUALITY_LABELS[k] for k in names], rows),
      ]
  return '\n'.join(lines) + '\n'


def main(argv: Sequence[str] | None = None) -> int:
  p = cli.ArgumentParser(
    prog='python -m idm_jax.extrinsic.cleaning_eval', description=__doc__.split('\n\n')[0]
  )
  p.add_argument('--cleaned', required=True, help='the cleaned dataset (manifest.json, images/)')
  p.add_argument('--contaminated', required=True, help='contaminate.py output it was made from')
  p.add_argument('--pristine', required=True, help='contaminate.py --fraction 0 twin')
  p.add_argument(
    '--out', required=True, help='where cleaning.json and cleaning.md go (a folder, local or gs://)'
  )
  p.add_argument('--no_identity', action='store_true')
  p.add_argument(
    '--niqe_params',
    default=None,
    help='NIQE model (.npz, e.g. ../shared/data/niqe_pris_params.npz): NIQE of each '
    'version beside the sharpness measures; without it, sharpness only',
  )
  p.add_argument('--seed', type=int, default=0, help='bootstrap seed')
  a = p.parse_args(argv)
  try:
    files.check_writable(a.out)  # an unwritable --out is said before the scoring, not after
    report = score(
      a.cleaned,
      a.contaminated,
      a.pristine,
      identity=not a.no_identity,
      seed=a.seed,
      niqe_params=a.niqe_params,
    )
  except (FileNotFoundError, ValueError, images.BadImage, files.StorageError) as e:
    return cli.fail(e)
  files.write_text(files.join(a.out, 'cleaning.json'), json.dumps(report, indent=1))
  md = markdown(report)
  files.write_text(files.join(a.out, 'cleaning.md'), md)
  print(md)
  return 0


if __name__ == '__main__':
  sys.exit(main())
