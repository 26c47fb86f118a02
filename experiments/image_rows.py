"""A PNG a person can look at: the first N images (by name) of each folder, one folder per row.

  python experiments/image_rows.py OUT.png FOLDER [FOLDER...] [--n 8]

Every folder must hold the first folder's first N names (file stems; extensions may differ), so
a column is one face: e.g. LQ | round 0 | round 1 | oracle | HQ from the evaluations' folders.
"""

import argparse
import os
import sys

import numpy as np

from idm_jax.storage import images
from idm_jax.training import run_log


def _by_stem(folder):
  return {os.path.splitext(f)[0]: os.path.join(folder, f) for f in sorted(os.listdir(folder))}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('out')
  p.add_argument('folders', nargs='+')
  p.add_argument('--n', type=int, default=8)
  a = p.parse_args(argv)
  stems = sorted(_by_stem(a.folders[0]))[: a.n]
  rows = []
  for folder in a.folders:
    found = _by_stem(folder)
    missing = [s for s in stems if s not in found]
    if missing:
      print(
        f"{folder}: no image named {missing[0]} (of the first folder's first {a.n})",
        file=sys.stderr,
      )
      return 1
    rows.append(np.stack([images.read(found[s]) for s in stems]))
  images.save(a.out, run_log.image_grid(rows))
  print(f'{a.out}: {len(rows)} rows of {len(stems)} images')
  return 0


if __name__ == '__main__':
  sys.exit(main())
