"""Scoring sets of images: every metric per image and its mean, differences between two
results with paired-bootstrap intervals, and distribution scores of a sample set (generation).

The library under the evaluation CLI (idm_jax.score), the --config.mode=evaluate validation,
cleaning_eval and the experiments; metrics.reports writes what it returns. A metric that cannot
be computed (no weights file, dlib missing, images too small) is unavailable with its reason,
never a stand-in number.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from idm_jax.metrics import bootstrap
from idm_jax.metrics import fidelity
from idm_jax.metrics import identity as identity_lib
from idm_jax.metrics import niqe as niqe_lib
from idm_jax.metrics import resize


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
      f'(e.g. {small[0][0]}x{small[0][1]}) at niqe_upscale={upscale}; raise niqe_upscale'
    )
  scores = [
    niqe_lib.niqe_score(resize.upscale_lanczos(im, upscale), params)
    for im in progress(images, desc='NIQE')
  ]
  return _available(scores, upscale=upscale)


def _check_images(images, name: str) -> None:
  for i, im in enumerate(images):
    if not isinstance(im, np.ndarray) or im.dtype != np.uint8 or im.ndim != 3 or im.shape[-1] != 3:
      desc = f'{im.dtype} {im.shape}' if isinstance(im, np.ndarray) else type(im).__name__
      raise ValueError(f'{name}[{i}]: expected a uint8 RGB array (H, W, 3), got {desc}')


def evaluate_images(
  pred: list[np.ndarray],
  gt: list[np.ndarray] | None,
  lq: list[np.ndarray] | None = None,
  *,
  niqe_params: str | os.PathLike | niqe_lib.NiqeParams | None,
  niqe_upscale: int = 1,
  identity: bool = True,
  lpips_weights: str | os.PathLike | None = None,
  consistency_scale: int = 4,
  names: Sequence[str] | None = None,
  progress: bool = True,
) -> dict:
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
        raise ValueError(
          f'{label(i)}: pred is {p.shape[1]}x{p.shape[0]} but gt is {g.shape[1]}x{g.shape[0]}'
        )

  def bar(it, desc):
    return tqdm(it, desc=desc, total=n, disable=not progress, leave=False)

  metrics: dict[str, Any] = {}
  if gt is not None:
    rows = [
      (
        fidelity.psnr(p, g),
        fidelity.ssim(p, g),
        fidelity.psnr(p, g, y_channel=True),
        fidelity.ssim(p, g, y_channel=True),
      )
      for p, g in bar(list(zip(pred, gt)), 'PSNR/SSIM')
    ]
    for j, key in enumerate(('psnr', 'ssim', 'psnr_y', 'ssim_y')):
      metrics[key] = _available([r[j] for r in rows])
    if lpips_weights is None:
      metrics['lpips'] = _unavailable(
        'no LPIPS weights file given (--lpips_weights); convert '
        'one with python -m idm_jax.metrics.convert_weights'
      )
    else:
      from idm_jax.metrics import lpips  # noqa: PLC0415 (keeps --help fast: imports jax)

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
      [
        fidelity.consistency(p, q, scale=consistency_scale)
        for p, q in bar(list(zip(pred, lq)), 'consistency')
      ],
      scale=consistency_scale,
    )
  metrics['niqe'] = _niqe_metric(pred, niqe_params, niqe_upscale, bar)
  return {'num_images': n, 'names': list(names) if names is not None else None, 'metrics': metrics}


def add_delta(result: dict, reference: dict, reference_name: str, *, seed: int = 0) -> dict:
  """Adds result['delta']: for every metric with per-image values in both results, the mean
  per-image difference result - reference with its paired-bootstrap 95% interval (seeded).

  Both results must score the same images in the same order. Returns `result`.
  """
  if result['num_images'] != reference['num_images']:
    raise ValueError(
      f'add_delta: {result["num_images"]} images against '
      f'{reference["num_images"]} in {reference_name!r}; the pairs must match'
    )
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


def compare_sets(
  pred_imgs: list[np.ndarray],
  ref_imgs: list[np.ndarray],
  *,
  niqe_params=None,
  niqe_upscale: int = 1,
  inception_weights=None,
  names=None,
  progress: bool = True,
) -> dict:
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
    ((h, w),) = sizes
    resized_to = f'{w}x{h}'
    ref_imgs = [np.asarray(Image.fromarray(im).resize((w, h), Image.BOX)) for im in ref_imgs]
  bar = lambda it, desc: tqdm(it, desc=desc, leave=False, disable=not progress)  # noqa: E731
  metrics: dict[str, Any] = {}
  if inception_weights:
    from idm_jax.metrics import fid  # noqa: PLC0415 (keeps --help fast: imports jax)

    f_pred = fid.inception_features(pred_imgs, inception_weights, progress=tqdm)
    f_ref = fid.inception_features(ref_imgs, inception_weights, progress=tqdm)
    metrics['fid'] = {'mean': fid.fid_from_features(f_pred, f_ref), 'per_image': None}
  else:
    metrics['fid'] = _unavailable(
      'no Inception weights given (--inception_weights); the offline scores below stand in'
    )
  reason = identity_lib.unavailable_reason()
  if reason:
    for key in ('fd_dlib', 'face_rate', 'face_rate_ref'):
      metrics[key] = _unavailable(reason)
  else:
    from idm_jax.metrics import fid  # noqa: PLC0415 (keeps --help fast: imports jax)

    f_pred, found_pred = identity_lib.face_descriptors(pred_imgs, lambda it: bar(it, 'dlib'))
    f_ref, found_ref = identity_lib.face_descriptors(ref_imgs, lambda it: bar(it, 'dlib ref'))
    metrics['fd_dlib'] = {'mean': fid.fid_from_features(f_pred, f_ref), 'per_image': None}
    metrics['face_rate'] = _available(found_pred.astype(float))
    metrics['face_rate_ref'] = _available(found_ref.astype(float))
  metrics['niqe'] = _niqe_metric(pred_imgs, niqe_params, niqe_upscale, bar)
  metrics['niqe_ref'] = _niqe_metric(ref_imgs, niqe_params, niqe_upscale, bar)
  out = {
    'num_images': len(pred_imgs),
    'num_ref_images': len(ref_imgs),
    'names': list(names) if names is not None else None,
    'metrics': metrics,
  }
  if resized_to:
    out['ref_resized_to'] = resized_to
  return out
