"""CLI: a folder of HQ faces -> a fixed LQ/HQ test set with its degradation parameters.

  python -m idm_jax.data.make_testset --src HQ_DIR --dst OUT --seed 0 \
      [--preset gfpgan] [--resolution 512] [--replay params.jsonl] [--overwrite]

Writes OUT/hq/NAME.png, OUT/lq/NAME.png and OUT/params.jsonl, one line per written image:
{"name": NAME, "source": relative/path.jpg, "params": {...}}. Image i of the sorted file list
gets np.random.default_rng([seed, i]), so a set is reproducible and a bad file does not shift the
others. --replay applies recorded params instead of sampling: replaying a set's params.jsonl on
the same sources gives byte-identical pixels. Test sets are never flipped.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile

from absl import logging
import numpy as np
from tqdm import tqdm

from idm_jax import configlib
from idm_jax import files
from idm_jax import images
from idm_jax.data import degradations
from idm_jax.data import sources

# How the summary counts skipped files, by images.BadImage.kind.
_SKIP_WORDS = {images.EMPTY: 'zero bytes', images.TOO_SMALL: 'too small',
               images.TOO_LARGE: 'too large', images.UNREADABLE: 'cannot read'}


def list_images(src: pathlib.Path) -> list[pathlib.Path]:
  """Image files under `src` (recursive), sorted by relative path for a stable order."""
  try:
    return [pathlib.Path(p) for p in images.list_images(src)]
  except FileNotFoundError:
    return []   # main reports "written 0"


def output_name(src: pathlib.Path, path: pathlib.Path) -> str:
  """NAME for OUT/hq/NAME.png: the relative path without extension, '/' -> '_'."""
  return path.relative_to(src).with_suffix('').as_posix().replace('/', '_')


def load_square(path: pathlib.Path, resolution: int, name: str | None = None) -> np.ndarray:
  """`path` as the training data reads it: uint8 RGB (resolution, resolution, 3), centre-cropped.

  The test set's HQ must be the pixels training would see, so this is `sources.load_image`
  (images.BadImage when the file cannot be used, too small included).
  """
  return sources.load_image(path, resolution, name)


def write_png(path: pathlib.Path, rgb: np.ndarray):
  """Writes uint8 RGB as PNG atomically (temp file, then rename)."""
  files.save_image(path, rgb)


def read_replay(path: pathlib.Path) -> dict[str, dict]:
  """params.jsonl -> {name: params}; errors name the file and line."""
  out = {}
  try:
    lines = path.read_text().splitlines()
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
  p = argparse.ArgumentParser(prog='python -m idm_jax.data.make_testset', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--src', required=True, type=pathlib.Path, help='folder of HQ images')
  p.add_argument('--dst', required=True, type=pathlib.Path, help='output folder')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--preset', default='gfpgan', choices=configlib.PRESETS)
  p.add_argument('--resolution', type=int, default=512)
  p.add_argument('--replay', type=pathlib.Path, default=None,
                 help='params.jsonl of an earlier set: apply its params instead of sampling')
  p.add_argument('--overwrite', action='store_true', help='allow writing into a non-empty --dst')
  return p.parse_args(argv)


def _is_within(child: pathlib.Path, parent: pathlib.Path) -> bool:
  return child == parent or parent in child.parents


def main(argv=None) -> int:
  """Runs the CLI. Returns 0 when at least one pair was written, 1 when none, 2 on refusal."""
  args = _parse(argv)
  logging.set_verbosity(logging.INFO)
  src, dst = args.src.resolve(), args.dst.resolve()
  if not src.is_dir():
    logging.error('--src %s is not a folder', args.src)
    return 2
  if args.resolution < 1:
    logging.error('--resolution %d must be positive', args.resolution)
    return 2
  if _is_within(dst, src):
    logging.error('refusing to write into the --src folder: --dst %s is inside --src %s', dst, src)
    return 2
  if dst.exists() and not dst.is_dir():
    logging.error('--dst %s exists and is not a folder', dst)
    return 2
  if dst.exists() and any(dst.iterdir()) and not args.overwrite:
    logging.error('--dst %s exists and is not empty; pass --overwrite to write into it', dst)
    return 2
  try:
    replay = read_replay(args.replay) if args.replay else None
  except ValueError as e:
    logging.error('%s', e)
    return 2
  cfg = configlib.degradation_config(args.preset)

  files = list_images(src)
  (dst / 'hq').mkdir(parents=True, exist_ok=True)
  (dst / 'lq').mkdir(parents=True, exist_ok=True)
  jsonl = dst / 'params.jsonl'
  fd, tmp_jsonl = tempfile.mkstemp(dir=dst, prefix='.params.jsonl.', suffix='.tmp')
  written, skipped, names = 0, [], set()

  def skip(rel: str, why: str, key: str | None = None):
    """Logs the file; the summary counts it under `key` (default: the words before a colon)."""
    skipped.append((rel, key or why.split(':')[0]))
    logging.warning('skipping %s: %s', rel, why)

  try:
    with os.fdopen(fd, 'w') as out:
      for index, path in enumerate(tqdm(files, desc='make_testset', unit='img')):
        rel = path.relative_to(src).as_posix()
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
        write_png(dst / 'hq' / f'{name}.png', hq)
        write_png(dst / 'lq' / f'{name}.png', lq)
        out.write(json.dumps({'name': name, 'source': rel, 'params': params}) + '\n')
        names.add(name)
        written += 1
    os.replace(tmp_jsonl, jsonl)
  except BaseException:
    if os.path.exists(tmp_jsonl):
      os.unlink(tmp_jsonl)
    raise

  if replay is not None:
    unused = sorted(set(replay) - names)
    if unused:
      logging.warning('%d --replay entries had no source image, e.g. %s', len(unused), unused[:5])
  reasons = {}
  for _, key in skipped:
    reasons[key] = reasons.get(key, 0) + 1
  detail = ', '.join(f'{k}: {v}' for k, v in sorted(reasons.items()))
  print(f'make_testset: written {written}, skipped {len(skipped)}'
        f'{f" ({detail})" if detail else ""} -> {dst}', flush=True)
  return 0 if written else 1


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
