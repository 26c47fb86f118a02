"""A PNG a person can look at: pristine | contaminated | cleaned for the first N contaminated
faces that a cleaning chose, each row one version.

  python experiments/cleaning_grid.py OUT.png --report CLEANING_JSON --pristine P --contaminated C \
      --cleaned CLEANED [--n 10]

CLEANING_JSON is cleaning_eval's report (its contaminated-and-cleaned names); P and C the
contaminate CLI's pristine and contaminated folders; CLEANED the cleaned dataset.
"""

import argparse
import json
import os
import sys

import numpy as np

from idm_jax.storage import images
from idm_jax.training import run_log


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('out')
  p.add_argument('--report', required=True)
  p.add_argument('--pristine', required=True)
  p.add_argument('--contaminated', required=True)
  p.add_argument('--cleaned', required=True)
  p.add_argument('--n', type=int, default=10)
  a = p.parse_args(argv)
  with open(a.report) as f:
    names = json.load(f).get('contaminated_and_cleaned', {}).get('names', [])[: a.n]
  if not names:
    print('no contaminated face was cleaned: no grid to show', file=sys.stderr)
    return 0
  with open(os.path.join(a.cleaned, 'manifest.json')) as f:
    by_name = {r['name']: r['file'] for r in json.load(f)['records']}
  rows = [
    np.stack([images.read(os.path.join(d, 'images', f)) for f in files_])
    for d, files_ in (
      (a.pristine, names),
      (a.contaminated, names),
      (a.cleaned, [by_name[n] for n in names]),
    )
  ]
  images.save(a.out, run_log.image_grid(rows))
  print(f'{a.out}: pristine | contaminated | cleaned, {len(names)} faces')
  return 0


if __name__ == '__main__':
  sys.exit(main())
