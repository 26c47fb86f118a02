r"""Evaluate restored faces: library API and CLI.

  python -m idm_jax.evaluate --pred results/ --gt hq/ [--lq lq/] \
      [--niqe_params niqe_pris_params.npz] [--niqe_upscale 2] [--lpips_weights lpips.npz] \
      --out eval/
  python -m idm_jax.evaluate --fid --pred samples/ --ref real/ \
      [--inception_weights inception.npz] [--niqe_params F] --out eval/

Files are matched by name stem (pred/0001.png <-> gt/0001.jpg). Writes metrics.json and
metrics.md into --out. Every folder may be local or in a bucket (gs://...). A metric that cannot
be computed (no weights file, dlib missing, images too small) is reported as unavailable with the
reason, never as a stand-in number.

Library: `evaluate_images(pred, gt, lq, ...)` returns the metrics dict, and
`metrics.reports.write_report` writes it.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Sequence

from etils import epath
import numpy as np
from PIL import Image
from tqdm import tqdm

from idm_jax import cli
from idm_jax import files
from idm_jax import images as images_lib
from idm_jax.metrics import bootstrap
from idm_jax.metrics import fidelity
from idm_jax.metrics import identity as identity_lib
from idm_jax.metrics import niqe as niqe_lib
from idm_jax.metrics import reports
from idm_jax.metrics import resize



# ----------------------------------------------------------------------------- results


def _available(values: Sequence[float], **extra) -> dict:
  values = [float(v) for v in values]
  return {'mean': float(np.mean(values)) if values else None, 'per_image': values, **extra}


def _unavailable(reason: str) -> dict:
  return {'mean': None, 'per_image': None, 'reason': reason}


def _niqe_metric(images, params, upscale: int, progress: Callable) -> dict:
  """NIQE mean/per-image, or unavailable (no params file, images too small)."""
  if params is None:
    return _unavailable('no NIQE parameters file given (--niqe_params / niqe_params)')
  if isinstance(params, (str, os.PathLike)):
    params = niqe_lib.load_niqe_params(params)
  if upscale < 1:
    raise ValueError(f'niqe_upscale must be >= 1, got {upscale}')
  small = [im.shape[:2] for im in images if min(im.shape[:2]) * upscale < niqe_lib.MIN_SIZE]
  if small:
    return _unavailable(
        f'NIQE needs at least {niqe_lib.MIN_SIZE} px per side; {len(small)} images are smaller '
        f'(e.g. {small[0][0]}x{small[0][1]}) at niqe_upscale={upscale}; raise niqe_upscale')
  scores = [niqe_lib.niqe_score(resize.upscale_lanczos(im, upscale), params)
            for im in progress(images, desc='NIQE')]
  return _available(scores, upscale=upscale)


def _check_images(images, name: str) -> None:
  for i, im in enumerate(images):
    if not isinstance(im, np.ndarray) or im.dtype != np.uint8 or im.ndim != 3 \
        or im.shape[-1] != 3:
      desc = f'{im.dtype} {im.shape}' if isinstance(im, np.ndarray) else type(im).__name__
      raise ValueError(f'{name}[{i}]: expected a uint8 RGB array (H, W, 3), got {desc}')


def evaluate_images(pred: list[np.ndarray], gt: list[np.ndarray] | None,
                    lq: list[np.ndarray] | None = None, *,
                    niqe_params: str | os.PathLike | niqe_lib.NiqeParams | None,
                    niqe_upscale: int = 1, identity: bool = True,
                    lpips_weights: str | os.PathLike | None = None,
                    consistency_scale: int = 4, names: Sequence[str] | None = None,
                    progress: bool = True) -> dict:
  """Every available metric of restored images `pred` against `gt` (and `lq`).

  Images are uint8 RGB (H, W, 3); pred[i] and gt[i] must have the same size; lq[i] may be
  smaller (consistency degrades pred to its size). With gt=None only the no-reference metrics
  (NIQE, and consistency when lq is given) are computed.

  Returns {'num_images', 'names', 'metrics': {name: {'mean', 'per_image', ...}}} where an
  unavailable metric has mean None and a 'reason'. Metric names are those of reports.METRIC_INFO.
  """
  _check_images(pred, 'pred')
  n = len(pred)
  if n == 0:
    raise ValueError('evaluate_images: no images to evaluate')
  for other, name in ((gt, 'gt'), (lq, 'lq')):
    if other is not None:
      _check_images(other, name)
      if len(other) != n:
        raise ValueError(f'evaluate_images: {n} pred images but {len(other)} {name} images')
  label = (lambda i: names[i]) if names is not None else (lambda i: f'#{i}')
  if gt is not None:
    for i, (p, g) in enumerate(zip(pred, gt)):
      if p.shape != g.shape:
        raise ValueError(f'{label(i)}: pred is {p.shape[1]}x{p.shape[0]} but gt is '
                         f'{g.shape[1]}x{g.shape[0]}')

  def bar(it, desc):
    return tqdm(it, desc=desc, total=n, disable=not progress, leave=False)

  metrics: dict[str, Any] = {}
  if gt is not None:
    rows = [(fidelity.psnr(p, g), fidelity.ssim(p, g),
             fidelity.psnr(p, g, y_channel=True), fidelity.ssim(p, g, y_channel=True))
            for p, g in bar(list(zip(pred, gt)), 'PSNR/SSIM')]
    for j, key in enumerate(('psnr', 'ssim', 'psnr_y', 'ssim_y')):
      metrics[key] = _available([r[j] for r in rows])
    if lpips_weights is None:
      metrics['lpips'] = _unavailable('no LPIPS weights file given (--lpips_weights); convert '
                                      'one with python -m idm_jax.metrics.convert_weights')
    else:
      from idm_jax.metrics import lpips  # pylint: disable=g-import-not-at-top
      metrics['lpips'] = _available(lpips.lpips_distances(pred, gt, lpips_weights))
    if not identity:
      metrics['identity'] = _unavailable('identity disabled')
    else:
      reason = identity_lib.unavailable_reason()
      if reason:
        metrics['identity'] = _unavailable(reason)
      else:
        r = identity_lib.identity_scores(pred, gt, progress=lambda it: bar(it, 'identity'))
        metrics['identity'] = _available(r['per_image'], fallbacks=r['fallbacks'])
  else:
    for key in ('psnr', 'ssim', 'psnr_y', 'ssim_y', 'lpips', 'identity'):
      metrics[key] = _unavailable('no ground truth given')
  if lq is not None:
    metrics['consistency'] = _available(
        [fidelity.consistency(p, q, scale=consistency_scale)
         for p, q in bar(list(zip(pred, lq)), 'consistency')], scale=consistency_scale)
  metrics['niqe'] = _niqe_metric(pred, niqe_params, niqe_upscale, bar)
  return {'num_images': n, 'names': list(names) if names is not None else None,
          'metrics': metrics}


def add_delta(result: dict, reference: dict, reference_name: str, *, seed: int = 0) -> dict:
  """Adds result['delta']: for every metric with per-image values in both results, the mean
  per-image difference result - reference with its paired-bootstrap 95% interval (seeded).

  Both results must score the same images in the same order. Returns `result`.
  """
  if result['num_images'] != reference['num_images']:
    raise ValueError(f'add_delta: {result["num_images"]} images against '
                     f'{reference["num_images"]} in {reference_name!r}; the pairs must match')
  deltas = {}
  for name, entry in result['metrics'].items():
    ref = reference['metrics'].get(name) or {}
    if entry.get('per_image') is None or ref.get('per_image') is None:
      continue
    try:
      deltas[name] = bootstrap.paired_interval(entry['per_image'], ref['per_image'], seed=seed)
    except ValueError:  # no finite pair (e.g. every image identical to its reference)
      continue
  result['delta'] = {'reference': reference_name, 'metrics': deltas}
  return result


def add_deltas(rows: dict[str, dict], reference_name: str, *, seed: int = 0) -> dict:
  """add_delta for every row of a {row name: result} table against its row `reference_name`."""
  ref = rows[reference_name]
  for name, result in rows.items():
    if name != reference_name:
      add_delta(result, ref, reference_name, seed=seed)
  return rows


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
  for p in map(files.path, paths):   # a local or a gs:// path, with .stem and .name
    if p.stem in found:
      raise EvalError(f'--{what}: two images share the name stem {p.stem!r}: '
                      f'{found[p.stem]} and {p}')
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
      parts.append(f'{len(missing)} pred images have no --{what} file (e.g. '
                   f'{[str(pred[s].name) for s in missing[:5]]})')
    if extra:
      parts.append(f'{len(extra)} --{what} images have no pred (e.g. '
                   f'{[str(other[s].name) for s in extra[:5]]})')
    raise EvalError('; '.join(parts))


def _check_out(out: str, protected: dict[str, str | None]) -> None:
  """--out must not be (inside) an input folder whose contents we must not touch, and must be
  writable: a missing bucket is said before any image is read, not after every metric."""
  for flag, folder in protected.items():
    if folder is not None and files.is_within(out, folder):
      raise EvalError(f'--out {files.absolute(out)!r} is inside --{flag} {folder!r}; choose '
                      'another folder so the dataset is left untouched')
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
      raise EvalError(f'size mismatch: {str(pred[s])!r} is {p.shape[1]}x{p.shape[0]} but '
                      f'{str(gt[s])!r} is {g.shape[1]}x{g.shape[0]}')
  common = dict(niqe_params=args.niqe_params, niqe_upscale=args.niqe_upscale,
                identity=not args.no_identity, lpips_weights=args.lpips_weights, names=stems)
  result = evaluate_images(pred_imgs, gt_imgs, lq_imgs,
                           consistency_scale=args.consistency_scale, **common)
  if lq_imgs is not None:
    # The same metrics of the LQ inputs (upsampled to the HQ size where smaller), so the
    # report says how much the restoration gained, with intervals.
    lq_big = [l if l.shape == g.shape else
              np.asarray(Image.fromarray(l).resize(g.shape[1::-1], Image.BICUBIC))
              for l, g in zip(lq_imgs, gt_imgs)]
    lq_result = evaluate_images(lq_big, gt_imgs, None, **common)
    add_delta(result, lq_result, 'LQ input', seed=args.seed)
    result['lq_metrics'] = {k: {'mean': v['mean']} for k, v in lq_result['metrics'].items()}
  return result


def _run_fid(args) -> dict:
  pred = list_images(args.pred, 'pred')
  ref = list_images(args.ref, 'ref')
  pred_imgs = _read_all([pred[s] for s in sorted(pred)], 'pred')
  ref_imgs = _read_all([ref[s] for s in sorted(ref)], 'ref')
  return compare_sets(pred_imgs, ref_imgs, niqe_params=args.niqe_params,
                      niqe_upscale=args.niqe_upscale, inception_weights=args.inception_weights,
                      names=sorted(pred))


def compare_sets(pred_imgs: list[np.ndarray], ref_imgs: list[np.ndarray], *, niqe_params=None,
                 niqe_upscale: int = 1, inception_weights=None, names=None,
                 progress: bool = True) -> dict:
  """Distribution scores of a sample set against a reference set (generation, no pairs).

  FID needs the user's Inception weights. Offline, always: the Frechet distance between the
  sets' dlib face descriptors (FID's arithmetic on a face-recognition embedding, so it measures
  how face-like and how varied the samples are), the share of images in which dlib's detector
  finds a face, and NIQE of both. When every sample has one size and the reference images
  another, the references are area-resized to the samples' size first, so both sets lose the
  same detail and the scores compare the distributions, not the resolutions.
  """
  _check_images(pred_imgs, 'pred')
  _check_images(ref_imgs, 'ref')
  sizes = {im.shape[:2] for im in pred_imgs}
  resized_to = None
  if len(sizes) == 1 and any(im.shape[:2] not in sizes for im in ref_imgs):
    (h, w), = sizes
    resized_to = f'{w}x{h}'
    ref_imgs = [np.asarray(Image.fromarray(im).resize((w, h), Image.BOX)) for im in ref_imgs]
  bar = lambda it, desc: tqdm(it, desc=desc, leave=False, disable=not progress)  # noqa: E731
  metrics: dict[str, Any] = {}
  if inception_weights:
    from idm_jax.metrics import fid  # pylint: disable=g-import-not-at-top
    f_pred = fid.inception_features(pred_imgs, inception_weights, progress=tqdm)
    f_ref = fid.inception_features(ref_imgs, inception_weights, progress=tqdm)
    metrics['fid'] = {'mean': fid.fid_from_features(f_pred, f_ref), 'per_image': None}
  else:
    metrics['fid'] = _unavailable('no Inception weights given (--inception_weights); the '
                                  'offline scores below stand in')
  reason = identity_lib.unavailable_reason()
  if reason:
    for key in ('fd_dlib', 'face_rate', 'face_rate_ref'):
      metrics[key] = _unavailable(reason)
  else:
    from idm_jax.metrics import fid  # pylint: disable=g-import-not-at-top
    f_pred, found_pred = identity_lib.face_descriptors(pred_imgs, lambda it: bar(it, 'dlib'))
    f_ref, found_ref = identity_lib.face_descriptors(ref_imgs, lambda it: bar(it, 'dlib ref'))
    metrics['fd_dlib'] = {'mean': fid.fid_from_features(f_pred, f_ref), 'per_image': None}
    metrics['face_rate'] = _available(found_pred.astype(float))
    metrics['face_rate_ref'] = _available(found_ref.astype(float))
  metrics['niqe'] = _niqe_metric(pred_imgs, niqe_params, niqe_upscale, bar)
  metrics['niqe_ref'] = _niqe_metric(ref_imgs, niqe_params, niqe_upscale, bar)
  out = {'num_images': len(pred_imgs), 'num_ref_images': len(ref_imgs),
         'names': list(names) if names is not None else None, 'metrics': metrics}
  if resized_to:
    out['ref_resized_to'] = resized_to
  return out


def parse_args(argv):
  p = cli.ArgumentParser(prog='python -m idm_jax.evaluate',
                              description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--pred', required=True, help='restored (or sampled) images')
  p.add_argument('--gt', help='ground-truth HQ images, matched to --pred by name stem')
  p.add_argument('--lq', help='LQ inputs: the consistency metric, and every metric\'s '
                 'per-image difference against the LQ with a paired-bootstrap interval')
  p.add_argument('--seed', type=int, default=0, help='seed of the bootstrap resampling')
  p.add_argument('--out', required=True,
                 help='where metrics.json and metrics.md go (a folder, local or gs://)')
  p.add_argument('--title', default=None, help='report title')
  p.add_argument('--niqe_params', default=niqe_lib.default_params_path(),
                 help='NIQE pristine parameters .npz (mu_pris_param, cov_pris_param, '
                      'gaussian_window); default: the ones shipped with the package')
  p.add_argument('--niqe_upscale', type=int, default=1,
                 help='evaluate NIQE on Lanczos upscales by this factor (2 for 128 px faces)')
  p.add_argument('--lpips_weights', default=None, help='LPIPS .npz from convert_weights')
  p.add_argument('--no_identity', action='store_true', help='skip the dlib identity metric')
  p.add_argument('--consistency_scale', type=int, default=4,
                 help='downsampling factor of the consistency metric when LQ and pred have '
                      'the same size')
  p.add_argument('--fid', action='store_true',
                 help='compare the --pred set with the --ref set (FID with --inception_weights; '
                      'offline: Frechet distance of dlib face descriptors, face detection rate, '
                      'NIQE of both)')
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
    title = args.title or (f'FID: {args.pred} vs {args.ref}' if args.fid
                           else f'Evaluation of {args.pred} against {args.gt}')
    reports.write_report(metrics, out, title)
  except (EvalError, FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(files.read_text(files.join(out, 'metrics.md')))
  return 0


if __name__ == '__main__':
  sys.exit(main())
