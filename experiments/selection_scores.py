"""How well each cleaning score finds a known contamination, before any model is involved.

python experiments/selection_scores.py CONTAMINATED_DIR [--num-val 100] [--out FILE.json]
A selection script (docs/PROTOCOL.md): CONTAMINATED_DIR must come from the dev view
(experiments/split_view.py --eval dev); a set holding a face of the test split is refused.
Ranks the training split of a contaminate.py dataset by every score of config.clean.score,
selects the same share that is contaminated, and prints precision (= recall, since the
selection is the size of the truth) overall and by defect kind.
"""

import argparse
import json
import os

from split_view import refuse_test_faces

from idm_jax.data import contaminate
from idm_jax.data import sources
from idm_jax.extrinsic import cleaning
from idm_jax.extrinsic import cleaning_eval
from idm_jax.metrics import niqe
from idm_jax.runtime import configlib
from idm_jax.storage import images as images_lib


def main():
  p = argparse.ArgumentParser()
  p.add_argument('contaminated')
  p.add_argument('--num-val', type=int, default=100)
  p.add_argument('--out', default='')
  p.add_argument('--splits', default='docs/results/splits.json')
  a = p.parse_args()
  with open(os.path.join(a.contaminated, contaminate.MANIFEST)) as f:
    manifest = json.load(f)
  refuse_test_faces([r['file'] for r in manifest['records']], a.splits)
  res = int(manifest['resolution'])
  images = os.path.join(a.contaminated, contaminate.IMAGES)
  paths = sources.folder_split(tuple(images_lib.list_images(images)), a.num_val, 'train')
  source = sources.FolderSource(tuple(paths), res, root=images)
  universe = {source.name(i) for i in range(len(source))}
  truth = contaminate.contaminated_names(manifest) & universe
  kinds = {r['file']: r['defect']['kind'] for r in manifest['records'] if 'defect' in r}
  results = {}
  for kind in configlib.CLEAN_SCORES:
    scores = (
      cleaning.niqe_scores(source, niqe.load_default(), res)
      if kind == 'niqe'
      else cleaning.artifact_scores(source)
    )
    chosen = cleaning.select_worst(scores, len(truth) / len(universe))
    s = cleaning_eval.selection_scores(chosen, truth, universe)
    s['found_by_kind'] = {
      k: sum(kinds[n] == k for n in chosen & truth) for k in sorted(set(kinds.values()))
    }
    results[kind] = s
  by_kind = sorted(set(kinds.values()))
  counts = {k: sum(kinds[n] == k for n in truth) for k in by_kind}
  print(
    f'{len(truth)} of {len(universe)} training images contaminated; selecting the worst '
    f'{len(truth)} by each score\n'
  )
  print(
    '| score | precision = recall | '
    + ' | '.join(f'{k} found (of {counts[k]})' for k in by_kind)
    + ' |'
  )
  print('| --- | --- |' + ' --- |' * len(by_kind))
  for kind, s in results.items():
    print(
      f'| {kind} | {s["precision"]:.3f} | '
      + ' | '.join(str(s['found_by_kind'][k]) for k in by_kind)
      + ' |'
    )
  print(f'\nchance: {len(truth) / len(universe):.3f}')
  if a.out:
    with open(a.out, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
