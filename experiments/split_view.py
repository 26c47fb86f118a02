"""A folder of links holding the train faces and one evaluation split (docs/PROTOCOL.md).

    python experiments/split_view.py --eval dev --dst DIR [--splits docs/results/splits.json] \
        [--src ../shared/data/celeba_hq128_dev]

The train faces are linked as a_NAME and the evaluation faces (dev or test) as b_NAME, so the
evaluation faces sort last: what config.data.num_val and `contaminate --skip_last` take as the
validation split. The other evaluation split is not in the folder, so a run given the dev view
cannot read a test face. Prints the number of evaluation faces (the VAL to pass on). Rerunning
with the same arguments is a no-op; a folder made for another split is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

EVAL_SPLITS = ('dev', 'test')
DEFAULT_SPLITS = os.path.join(
  os.path.dirname(os.path.abspath(__file__)), '..', 'docs', 'results', 'splits.json'
)


def _stem(name: str) -> str:
  """A face's name without the view's a_/b_ prefix and without its extension (the contaminate
  CLI writes x.jpg as x.png)."""
  base = os.path.splitext(os.path.basename(name))[0]
  return base[2:] if base[:2] in ('a_', 'b_') else base


def refuse_test_faces(names, splits_path: str = DEFAULT_SPLITS) -> None:
  """For selection scripts: exits naming the first test face among `names` (files or paths)."""
  with open(splits_path) as f:
    held_out = {_stem(n) for n in json.load(f)['test']}
  found = sorted(n for n in names if _stem(n) in held_out)
  if found:
    sys.exit(
      f'error: {len(found)} of these faces are in the test split of {splits_path} '
      f'({found[0]}, ...); choices are made on the dev view only '
      '(experiments/split_view.py --eval dev)'
    )


def make_view(splits: dict, src: str, dst: str, eval_split: str) -> int:
  if eval_split not in EVAL_SPLITS:
    raise ValueError(f'--eval {eval_split!r}: choose one of {EVAL_SPLITS}')
  want = {f'a_{n}': n for n in splits['train']}
  want.update({f'b_{n}': n for n in splits[eval_split]})
  os.makedirs(dst, exist_ok=True)
  have = set(os.listdir(dst))
  if have - set(want):
    raise ValueError(
      f'{dst} holds {len(have - set(want))} files that are not the {eval_split} '
      'view (made for another split?); use another --dst'
    )
  src = os.path.abspath(src)
  for link, name in want.items():
    target = os.path.join(src, name)
    if not os.path.isfile(target):
      raise FileNotFoundError(
        f'{target} is missing: --src is not the folder the split was made from'
      )
    path = os.path.join(dst, link)
    if link in have:
      if os.path.realpath(path) != os.path.realpath(target):
        raise ValueError(f'{path} points elsewhere than {target}')
      continue
    os.symlink(target, path)
  return len(splits[eval_split])


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--eval', required=True, choices=EVAL_SPLITS)
  p.add_argument('--dst', required=True)
  p.add_argument('--splits', default='docs/results/splits.json')
  p.add_argument('--src', default='../shared/data/celeba_hq128_dev')
  a = p.parse_args(argv)
  with open(a.splits) as f:
    splits = json.load(f)
  try:
    print(make_view(splits, a.src, a.dst, a.eval))
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
