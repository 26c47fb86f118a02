"""A PNG a person can look at: pristine | contaminated | cleaned for the first N contaminated
faces that the cleaning chose, each row one version, from a finished contamination experiment.

  python bench/cleaning_grid.py WORKDIR OUT.png [--n 10] [--cleaned WORKDIR/rounds/round_1/dataset]
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from idm_jax import files  # noqa: E402
from idm_jax import images  # noqa: E402
from idm_jax import reporting  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('work')
  p.add_argument('out')
  p.add_argument('--n', type=int, default=10)
  p.add_argument('--cleaned', default=None)
  a = p.parse_args(argv)
  cleaned = a.cleaned or os.path.join(a.work, 'rounds', 'round_1', 'dataset')
  with open(os.path.join(a.work, 'results', 'cleaning.json')) as f:
    names = json.load(f).get('contaminated_and_cleaned', {}).get('names', [])[:a.n]
  if not names:
    print('no contaminated face was cleaned: no grid to show', file=sys.stderr)
    return 0
  with open(os.path.join(cleaned, 'manifest.json')) as f:
    by_name = {r['name']: r['file'] for r in json.load(f)['records']}
  rows = [np.stack([images.read(os.path.join(d, 'images', f)) for f in files_])
          for d, files_ in ((os.path.join(a.work, 'pristine'), names),
                            (os.path.join(a.work, 'contaminated'), names),
                            (cleaned, [by_name[n] for n in names]))]
  files.save_image(a.out, reporting.image_grid(rows))
  print(f'{a.out}: pristine | contaminated | cleaned, {len(names)} faces')
  return 0


if __name__ == '__main__':
  sys.exit(main())
