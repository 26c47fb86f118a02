"""The three-way split of the 900 faces (docs/PROTOCOL.md): train, dev, test.

    python experiments/make_splits.py [--src ../shared/data/celeba_hq128_dev] \
        [--out docs/results/splits.json]

Deterministic: the same folder gives the same file, byte for byte.
  dev    the last 100 files by name: the validation faces every earlier choice (parameterisation,
         step count, t_start, number of draws, dose) was scored on, so they can only be dev;
  test   100 faces drawn with numpy's default_rng(SEED) from the first 800, among those no
         earlier contamination touched (15% at seeds 0 and 1, 40% at seed 0: their contaminated
         faces were scored against their originals while the cleaning was designed). The
         contaminations were random draws, so leaving their faces out does not bias the rest;
         faces an earlier *score* picked for cleaning are not left out, since that would;
  train  the other 700.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import numpy as np

from idm_jax.data import contaminate
from idm_jax.storage import images

SEED = 20261206
NUM_DEV = 100
NUM_TEST = 100
# (fraction, seed) of every contamination an earlier result scored, over the first 800 faces.
EARLIER_CONTAMINATIONS = ((0.15, 0), (0.15, 1), (0.40, 0))


def make_splits(names: list[str]) -> dict:
  names = sorted(names)
  if len(names) <= NUM_DEV + NUM_TEST:
    raise ValueError(f'{len(names)} faces cannot make a train, dev and test split')
  dev = names[-NUM_DEV:]
  pool = names[:-NUM_DEV]
  touched = set()
  for fraction, seed in EARLIER_CONTAMINATIONS:
    touched |= set(contaminate.choose(len(pool), fraction, seed).tolist())
  eligible = [i for i in range(len(pool)) if i not in touched]
  if len(eligible) < NUM_TEST:
    raise ValueError(f'only {len(eligible)} faces were never contaminated; need {NUM_TEST}')
  rng = np.random.default_rng(SEED)
  test_idx = set(rng.choice(eligible, size=NUM_TEST, replace=False).tolist())
  test = [pool[i] for i in sorted(test_idx)]
  train = [pool[i] for i in range(len(pool)) if i not in test_idx]
  digest = hashlib.sha256('\n'.join(names).encode()).hexdigest()
  return dict(
    format='idm_jax/splits/1',
    seed=SEED,
    num_faces=len(names),
    names_sha256=digest,
    never_contaminated_before=len(eligible),
    rule=(
      'dev: the last 100 names (every earlier choice was scored on them); test: 100 '
      'drawn by numpy default_rng(seed).choice among the first 800 that no earlier '
      'contamination (15% seeds 0 and 1, 40% seed 0) touched; train: the rest'
    ),
    train=train,
    dev=dev,
    test=test,
  )


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--src', default='../shared/data/celeba_hq128_dev')
  p.add_argument('--out', default='docs/results/splits.json')
  a = p.parse_args(argv)
  names = [os.path.relpath(x, a.src) for x in images.list_images(a.src)]
  splits = make_splits(names)
  with open(a.out, 'w') as f:
    json.dump(splits, f, indent=1)
    f.write('\n')
  print(
    f'{a.out}: train {len(splits["train"])}, dev {len(splits["dev"])}, '
    f'test {len(splits["test"])} (from {splits["never_contaminated_before"]} never '
    'contaminated)'
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
