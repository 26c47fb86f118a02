"""CLI: a folder of HQ faces -> a fixed LQ/HQ test set with its degradation parameters.

  python -m idm_jax.data.make_testset --src HQ_DIR --dst OUT --seed 0 \
      [--preset gfpgan] [--resolution 512] [--replay params.jsonl] [--overwrite]

Writes OUT/hq/NAME.png, OUT/lq/NAME.png and OUT/params.jsonl, one line per written image:
{"name": NAME, "source": relative/path.jpg, "params": {...}}. Image i of the sorted file list
gets np.random.default_rng([seed, i]), so a set is reproducible and a bad file does not shift the
others. --replay applies recorded params instead of sampling: replaying a set's params.jsonl on
the same sources gives byte-identical pixels. Test sets are never flipped. HQ_DIR, OUT and
params.jsonl may be local or in a bucket (gs://...).
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import sys

from absl import logging
import numpy as np
from tqdm import tqdm

from idm_jax.data import degradations
from idm_jax.data import sources
from idm_jax.runtime import cli
from idm_jax.runtime import configlib
from idm_jax.storage import files
from idm_jax.storage import images

# How the summary counts skipped files, by images.BadImage.kind.
_SKIP_WORDS = {
  images.EMPTY: 'zero bytes',
  images.TOO_SMALL: 'too small',
  images.TOO_LARGE: 'too large',
  images.UNREADABLE: 'cannot read',
}


def list_images(src: str | os.PathLike) -> list[str]:
  """Image files under `src` (recursive, local or gs://), sorted by relative path for a stable
  order."""
  try:
    return images.list_images(src)
  except FileNotFoundError:
    return []  # main reports "written 0"


def source_name(src: str | os.PathLike, path: str) -> str:
  """`path` relative to `src`, '/'-separated: the "source" of its params.jsonl line."""
  return files.relpath(path, src).replace(os.sep, '/')


def output_name(src: str | os.PathLike, path: str) -> str:
  """NAME for OUT/hq/NAME.png: the relative path without extension, '/' -> '_'."""
  return posixpath.splitext(source_name(src, path))[0].replace('/', '_')


def load_square(path: str | os.PathLike, resolution: int, name: str | None = None) -> np.ndarray:
  """`path` as the training data reads it: uint8 RGB (resolution, resolution, 3), centre-cropped.

  The test set's HQ must be the pixels training would see, so this is `sources.load_image`
  (images.BadImage when the file cannot be used, too small included).
  """
  return sources.load_image(path, resolution, name)


def write_png(path: str, rgb: np.ndarray):
  """Writes uint8 RGB as PNG atomically (a temp file and a rename; in a bucket one upload)."""
  images.save(path, rgb)


def read_replay(path: str | os.PathLike) -> dict[str, dict]:
  """params.jsonl -> {name: params}; errors name the file and line."""
  out = {}
  try:
    lines = files.read_text(path).splitlines()
  except OSError as e:
    raise ValueError(f'--replay {path}: cannot read: {e}') from e
  for i, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
      name, params = rec['name'], rec['params']
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ValueError(f'--replay {path}:{i}: not a {{"name", "params"}} JSON line: {e}') from e
    if name in out:
      raise ValueError(f'--replay {path}:{i}: name {name!r} appears twice')
    keys = params if isinstance(params, dict) else {}
    missing = [k for k in degradations.PARAM_KEYS if k not in keys]
    if missing:
      raise ValueError(f'--replay {path}:{i}: params for {name!r} lack {missing}')
    out[name] = params
  return out


def _parse(argv):
  p = cli.ArgumentParser(
    prog='python -m idm_jax.data.make_testset',
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument('--src', required=True, help='folder of HQ images (local or gs://)')
  p.add_argument('--dst', required=True, help='output folder (local or gs://)')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--preset', default='gfpgan', choices=configlib.PRESETS)
  p.add_argument('--resolution', type=int, default=512)
  p.add_argument(
    '--replay',
    default=None,
    help='params.jsonl of an earlier set: apply its params instead of sampling',
  )
  p.add_argument('--overwrite', action='store_true', help='allow writing into a non-empty --dst')
  return p.parse_args(argv)


def main(argv=None) -> int:
  """Runs the CLI. Returns 0 when at least one pair was written, 1 when none, 2 on refusal."""
  args = _parse(argv)
  logging.set_verbosity(logging.INFO)
  src, dst = files.absolute(args.src), files.absolute(args.dst)
  if not files.isdir(src):
    logging.error('--src %s is not a folder', args.src)
    return 2
  if args.resolution < 1:
    logging.error('--resolution %d must be positive', args.resolution)
    return 2
  if files.is_within(dst, src):
    logging.error('refusing to write into the --src folder: --dst %s is inside --src %s', dst, src)
    return 2
  if files.exists(dst) and not files.isdir(dst):
    logging.error('--dst %s exists and is not a folder', dst)
    return 2
  if files.isdir(dst) and files.listdir(dst) and not args.overwrite:
    logging.error('--dst %s exists and is not empty; pass --overwrite to write into it', dst)
    return 2
  try:  # a missing bucket or no permission: said before any image is made
    files.check_writable(dst)
  except files.StorageError as e:
    logging.error('--dst %s', e)
    return 2
  try:
    replay = read_replay(args.replay) if args.replay else None
  except ValueError as e:
    logging.error('%s', e)
    return 2
  cfg = configlib.degradation_config(args.preset)

  paths = list_images(src)
  files.makedirs(files.join(dst, 'hq'))
  files.makedirs(files.join(dst, 'lq'))
  # params.jsonl is written once, whole, at the end (a bucket has no appends): a run that stops
  # early leaves none, so a params.jsonl always describes a finished set.
  lines, written, skipped, names = [], 0, [], set()

  def skip(rel: str, why: str, key: str | None = None):
    """Logs the file; the summary counts it under `key` (default: the words before a colon)."""
    skipped.append((rel, key or why.split(':')[0]))
    logging.warning('skipping %s: %s', rel, why)

  for index, path in enumerate(tqdm(paths, desc='make_testset', unit='img')):
    rel = source_name(src, path)
    name = output_name(src, path)
    if name in names:
      skip(rel, f'output name {name!r} already used by another file')
      continue
    if replay is not None:
      if name not in replay:
        skip(rel, f'not in --replay {args.replay}')
        continue
      params = replay[name]
    else:
      rng = np.random.default_rng([args.seed, index])
      params = degradations.sample_params(rng, cfg, args.resolution)
      params['flip'] = False  # test sets are never flipped
    try:
      hq = load_square(path, args.resolution, rel)
    except images.BadImage as e:
      skip(rel, e.reason, _SKIP_WORDS.get(e.kind, 'cannot decode'))
      continue
    if params.get('flip'):  # a replayed training record: degrade the flipped pair
      hq = np.ascontiguousarray(hq[:, ::-1])
    lq = degradations.apply(hq, params)
    write_png(files.join(dst, 'hq', f'{name}.png'), hq)
    write_png(files.join(dst, 'lq', f'{name}.png'), lq)
    lines.append(json.dumps({'name': name, 'source': rel, 'params': params}) + '\n')
    names.add(name)
    written += 1
  files.write_text(files.join(dst, 'params.jsonl'), ''.join(lines))

  if replay is not None:
    unused = sorted(set(replay) - names)
    if unused:
      logging.warning('%d --replay entries had no source image, e.g. %s', len(unused), unused[:5])
  reasons = {}
  for _, key in skipped:
    reasons[key] = reasons.get(key, 0) + 1
  detail = ', '.join(f'{k}: {v}' for k, v in sorted(reasons.items()))
  print(
    f'make_testset: written {written}, skipped {len(skipped)}'
    f'{f" ({detail})" if detail else ""} -> {dst}',
    flush=True,
  )
  return 0 if written else 1


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
