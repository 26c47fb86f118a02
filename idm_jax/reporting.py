"""What a user sees of a run: progress bar, metrics (stdout, metrics.jsonl, TensorBoard), PNG grids.

Only process 0 writes; on other processes every method is a no-op, so callers need no `if`.
TensorBoard event files come from tensorboardX, which needs no TensorFlow.
"""
from __future__ import annotations

import json
import os

from absl import logging
import numpy as np

from idm_jax import files


def image_grid(rows: list[np.ndarray], pad: int = 2) -> np.ndarray:
  """rows: equal-shaped (N, H, W, 3) uint8 arrays -> one image, a row of N images per array."""
  n, h, w, _ = rows[0].shape
  grid = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, np.uint8)
  for r, images in enumerate(rows):
    for c in range(n):
      y, x = pad + r * (h + pad), pad + c * (w + pad)
      grid[y:y + h, x:x + w] = images[c]
  return grid


def progress(start: int, end: int, enabled: bool = True, desc: str = 'train'):
  from tqdm import tqdm
  return tqdm(total=end, initial=start, desc=desc, disable=not enabled, dynamic_ncols=True,
              unit='step', smoothing=0.1)


def shorten_to_budget(bar, step: int, end: int, seconds_left: float | None) -> None:
  """Under a time budget, the bar's total becomes the step the budget will end at (from the
  recent rate), or `end` if that comes first, so its ETA is the time the run will really stop."""
  if seconds_left is None or bar.disable:
    return
  info = bar.format_dict
  # tqdm's smoothed steps/s; before it has one (it updates every 0.1 s), the average so far.
  rate = info.get('rate') or (bar.n - bar.initial) / max(info['elapsed'], 1e-9)
  if not rate:
    return
  reachable = step + max(0, int(seconds_left * rate))
  total = max(step, min(end, reachable))
  if total != bar.total:
    bar.total = total
    bar.refresh()


class Writer:
  """metrics.jsonl + TensorBoard + absl log lines, and sample grids as PNG."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.workdir = workdir
    self.enabled = enabled
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def scalars(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    logging.info('step %d: %s', step, ', '.join(f'{k}={v:.5g}' for k, v in metrics.items()))
    with open(os.path.join(self.workdir, 'metrics.jsonl'), 'a') as f:
      f.write(json.dumps({'step': step, **metrics}) + '\n')
    for k, v in metrics.items():
      self._tb.add_scalar(k, v, step)
    self._tb.flush()

  def sample_grid(self, step: int, batch: dict, samples: np.ndarray, conditional: bool) -> dict:
    """Saves samples_<step>.png (LQ | EMA sample | HQ rows); logs PSNR/SSIM vs HQ if restoring."""
    if not self.enabled:
      return {}
    metrics = {}
    if conditional:
      from idm_jax.metrics import fidelity
      rows = [batch['lq'], samples, batch['hq']]
      metrics = dict(
          vis_psnr=float(np.mean([fidelity.psnr(s, h) for s, h in zip(samples, batch['hq'])])),
          vis_ssim=float(np.mean([fidelity.ssim(s, h) for s, h in zip(samples, batch['hq'])])))
    else:
      rows = [samples]
    # Small models (the demo's 32 px) are hard to see: show them at least 128 px wide.
    zoom = max(1, 128 // samples.shape[1])
    grid = image_grid([np.repeat(np.repeat(np.asarray(r), zoom, 1), zoom, 2) for r in rows])
    files.save_image(os.path.join(self.workdir, f'samples_{step:07d}.png'), grid)
    self._tb.add_image('samples', grid, step, dataformats='HWC')
    if metrics:
      self.scalars(step, metrics)
    return metrics

  def close(self):
    if self._tb is not None:
      self._tb.close()
