r"""Evaluate restored faces in folders: the command line over metrics.scoring.

  python -m idm_jax.score --pred results/ --gt hq/ [--lq lq/] \
      [--niqe_params niqe_pris_params.npz] [--niqe_upscale 2] [--lpips_weights lpips.npz] \
      --out eval/
  python -m idm_jax.score --fid --pred samples/ --ref real/ \
      [--inception_weights inception.npz] [--niqe_params F] --out eval/

Files are matched by name stem (pred/0001.png <-> gt/0001.jpg). Writes metrics.json and
metrics.md into --out. Every folder may be local or in a bucket (gs://...). A metric that cannot
be computed (no weights file, dlib missing, images too small) is reported as unavailable with the
reason, never as a stand-in number.

Library: `scoring.evaluate_images(pred, gt, lq, ...)` returns the metrics dict, and
`metrics.reports.write_report` writes it.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from etils import epath
import numpy as np
from PIL import Image
from tqdm import tqdm

from idm_jax.metrics import niqe as niqe_lib
from idm_jax.metrics import reports
from idm_jax.metrics import scoring
from idm_jax.runtime import cli
from idm_jax.storage import files
from idm_jax.storage import images as images_lib

# ----------------------------------------------------------------------------- folders


class EvalError(Exception):
  """A problem with the user's input, reported as one line by the CLI."""


def list_images(folder: str | os.PathLike, what: str) -> dict[str, epath.Path]:
  """{stem: path} of the images directly in a folder; errors name the folder or the clashing files.

  Not recursive: files are matched across folders by name stem.
  """
  try:
    paths = images_lib.list_images(folder, recursive=False)
  except FileNotFoundError as e:
    raise EvalError(f'--{what}: {e}') from e
  found: dict[str, epath.Path] = {}
  for p in map(files.path, paths):  # a local or a gs:// path, with .stem and .name
    if p.stem in found:
      raise EvalError(
        f'--{what}: two images share the name stem {p.stem!r}: {found[p.stem]} and {p}'
      )
    found[p.stem] = p
  return found


def read_image(path: str | os.PathLike) -> np.ndarray:
  """uint8 RGB array of an image file, decoded as training decodes it (images.read); EvalError
  naming the file if it cannot be read."""
  try:
    return images_lib.read(path)
  except images_lib.BadImage as e:
    raise EvalError(f'cannot read image {str(path)!r}: {e.reason}') from e


def _match(pred: dict, other: dict, what: str) -> None:
  missing = sorted(set(pred) - set(other))
  extra = sorted(set(other) - set(pred))
  if missing or extra:
    parts = []
    if missing:
      parts.append(
        f'{len(missing)} pred images have no --{what} file (e.g. '
        f'{[str(pred[s].name) for s in missing[:5]]})'
      )
    if extra:
      parts.append(
        f'{len(extra)} --{what} images have no pred (e.g. '
        f'{[str(other[s].name) for s in extra[:5]]})'
      )
    raise EvalError('; '.join(parts))


def _check_out(out: str, protected: dict[str, str | None]) -> None:
  """--out must not be (inside) an input folder whose contents we must not touch, and must be
  writable: a missing bucket is said before any image is read, not after every metric."""
  for flag, folder in protected.items():
    if folder is not None and files.is_within(out, folder):
      raise EvalError(
        f'--out {files.absolute(out)!r} is inside --{flag} {folder!r}; choose '
        'another folder so the dataset is left untouched'
      )
  try:
    files.check_writable(out)
  except files.StorageError as e:
    raise EvalError(f'--out {e}') from e


def _read_all(paths: list[epath.Path], desc: str) -> list[np.ndarray]:
  return [read_image(p) for p in tqdm(paths, desc=f'reading {desc}', leave=False)]


def _run_pairs(args) -> dict:
  pred = list_images(args.pred, 'pred')
  gt = list_images(args.gt, 'gt')
  _match(pred, gt, 'gt')
  stems = sorted(pred)
  lq_imgs = None
  if args.lq:
    lq = list_images(args.lq, 'lq')
    _match(pred, lq, 'lq')
    lq_imgs = _read_all([lq[s] for s in stems], 'lq')
  pred_imgs = _read_all([pred[s] for s in stems], 'pred')
  gt_imgs = _read_all([gt[s] for s in stems], 'gt')
  for s, p, g in zip(stems, pred_imgs, gt_imgs):
    if p.shape != g.shape:
      raise EvalError(
        f'size mismatch: {str(pred[s])!r} is {p.shape[1]}x{p.shape[0]} but '
        f'{str(gt[s])!r} is {g.shape[1]}x{g.shape[0]}'
      )
  common = dict(
    niqe_params=args.niqe_params,
    niqe_upscale=args.niqe_upscale,
    identity=not args.no_identity,
    lpips_weights=args.lpips_weights,
    names=stems,
  )
  result = scoring.evaluate_images(
    pred_imgs, gt_imgs, lq_imgs, consistency_scale=args.consistency_scale, **common
  )
  if lq_imgs is not None:
    # The same metrics of the LQ inputs (upsampled to the HQ size where smaller), so the
    # report says how much the restoration gained, with intervals.
    lq_big = [
      l
      if l.shape == g.shape
      else np.asarray(Image.fromarray(l).resize(g.shape[1::-1], Image.BICUBIC))
      for l, g in zip(lq_imgs, gt_imgs)
    ]
    lq_result = scoring.evaluate_images(lq_big, gt_imgs, None, **common)
    scoring.add_delta(result, lq_result, 'LQ input', seed=args.seed)
    result['lq_metrics'] = {k: {'mean': v['mean']} for k, v in lq_result['metrics'].items()}
  return result


def _run_fid(args) -> dict:
  pred = list_images(args.pred, 'pred')
  ref = list_images(args.ref, 'ref')
  pred_imgs = _read_all([pred[s] for s in sorted(pred)], 'pred')
  ref_imgs = _read_all([ref[s] for s in sorted(ref)], 'ref')
  return scoring.compare_sets(
    pred_imgs,
    ref_imgs,
    niqe_params=args.niqe_params,
    niqe_upscale=args.niqe_upscale,
    inception_weights=args.inception_weights,
    names=sorted(pred),
  )


def parse_args(argv):
  p = cli.ArgumentParser(
    prog='python -m idm_jax.score',
    description=__doc__.split('\n\n')[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument('--pred', required=True, help='restored (or sampled) images')
  p.add_argument('--gt', help='ground-truth HQ images, matched to --pred by name stem')
  p.add_argument(
    '--lq',
    help="LQ inputs: the consistency metric, and every metric's "
    'per-image difference against the LQ with a paired-bootstrap interval',
  )
  p.add_argument('--seed', type=int, default=0, help='seed of the bootstrap resampling')
  p.add_argument(
    '--out', required=True, help='where metrics.json and metrics.md go (a folder, local or gs://)'
  )
  p.add_argument('--title', default=None, help='report title')
  p.add_argument(
    '--niqe_params',
    default=niqe_lib.default_params_path(),
    help='NIQE pristine parameters .npz (mu_pris_param, cov_pris_param, '
    'gaussian_window); default: the ones shipped with the package',
  )
  p.add_argument(
    '--niqe_upscale',
    type=int,
    default=1,
    help='evaluate NIQE on Lanczos upscales by this factor (2 for 128 px faces)',
  )
  p.add_argument('--lpips_weights', default=None, help='LPIPS .npz from convert_weights')
  p.add_argument('--no_identity', action='store_true', help='skip the dlib identity metric')
  p.add_argument(
    '--consistency_scale',
    type=int,
    default=4,
    help='downsampling factor of the consistency metric when LQ and pred have the same size',
  )
  p.add_argument(
    '--fid',
    action='store_true',
    help='compare the --pred set with the --ref set (FID with --inception_weights; '
    'offline: Frechet distance of dlib face descriptors, face detection rate, '
    'NIQE of both)',
  )
  p.add_argument('--ref', help='reference images for --fid')
  p.add_argument('--inception_weights', default=None, help='Inception .npz from convert_weights')
  args = p.parse_args(argv)
  if args.fid:
    if not args.ref:
      p.error('--fid needs --ref DIR')
  elif not args.gt:
    p.error('--gt DIR is required (or use --fid --ref DIR)')
  return args


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point; returns the exit status (0 ok, 2 bad input)."""
  args = parse_args(argv)
  out = args.out
  try:
    _check_out(out, {'gt': args.gt, 'lq': args.lq, 'ref': args.ref})
    if args.niqe_params:
      niqe_lib.load_niqe_params(args.niqe_params)  # fail before reading any image
    metrics = _run_fid(args) if args.fid else _run_pairs(args)
    title = args.title or (
      f'FID: {args.pred} vs {args.ref}'
      if args.fid
      else f'Evaluation of {args.pred} against {args.gt}'
    )
    reports.write_report(metrics, out, title)
  except (EvalError, FileNotFoundError, ValueError) as e:
    return cli.fail(e)
  print(files.read_text(files.join(out, 'metrics.md')))
  return 0


if __name__ == '__main__':
  sys.exit(main())
