"""`--config.mode=evaluate` and `--config.mode=sample`: a trained model on the fixed validation set.

The validation LQ images come from `pipeline.eval_batches` (degradations seeded per example), so
every evaluation (every checkpoint, every extrinsic round) sees identical inputs.
Writes WORKDIR/eval/<step>/{lq,hq,restored_<n>steps}/*.png, grid.png, metrics.json, metrics.md.
"""

from __future__ import annotations

import os

from absl import logging
import jax
import numpy as np

from idm_jax.data import pipeline
from idm_jax.inference import engine
from idm_jax.metrics import niqe as niqe_lib
from idm_jax.metrics import reports
from idm_jax.metrics import scoring
from idm_jax.runtime import host_shares
from idm_jax.storage import files
from idm_jax.storage import images
from idm_jax.training import run_log


def niqe_params_path(config) -> str:
  """config.eval.niqe_params (an override, which must exist), else the shipped parameters."""
  return config.eval.niqe_params or niqe_lib.default_params_path()


def validation_set(config) -> dict:
  """The fixed validation pairs as {'hq', 'lq': uint8 (N, R, R, 3), 'name': [...]}."""
  batches = pipeline.eval_batches(config, config.eval.num_images, config.eval.batch_size)
  return {
    'hq': np.concatenate([b['hq'] for b in batches]),
    'lq': np.concatenate([b['lq'] for b in batches]),
    'name': [n for b in batches for n in b['name']],
  }


def restore_all(
  restorer: engine.Restorer, lq: np.ndarray, batch_size: int, seed: int, **settings
) -> np.ndarray:
  """Restores in batches of `batch_size`; every process returns all of them.

  Example i always gets the key fold_in(seed, i), so the result does not depend on the batching
  or on the number of hosts. With several processes, each feeds every process_count-th image
  to the Restorer's program over all of their devices (in lockstep), and the processes then
  exchange their results.
  """
  mine = host_shares.host_share(len(lq))
  out = engine.restore_in_batches(restorer, lq[mine], mine, batch_size, seed=seed, **settings)
  return host_shares.gather_shares(out, len(lq))


def evaluate_restorer(
  config, restorer: engine.Restorer, out_dir: str, *, write_metrics: bool = True
) -> dict:
  """Restores the validation set at each of config.eval.steps; returns {row name: metrics}."""
  val = validation_set(config)
  write = jax.process_index() == 0
  if write:
    for sub in ('lq', 'hq'):
      _save_all(files.join(out_dir, sub), val['name'], val[sub])
  niqe = niqe_params_path(config)
  niqe_upscale = niqe_lib.upscale_for(config.data.resolution)  # NIQE needs >= 192 px
  rows, grid_rows = {}, [val['lq'][:8]]
  if write_metrics:
    rows['LQ input'] = scoring.evaluate_images(
      list(val['lq']),
      list(val['hq']),
      None,
      niqe_params=niqe,
      niqe_upscale=niqe_upscale,
      identity=config.eval.identity,
    )
  for steps in config.eval.steps:
    restored = restore_all(
      restorer, val['lq'], config.eval.batch_size, config.seed, steps=int(steps)
    )
    grid_rows.append(restored[:8])
    if write:
      _save_all(files.join(out_dir, f'restored_{steps}steps'), val['name'], restored)
    if write_metrics:
      rows[f'restored, {steps} steps'] = scoring.evaluate_images(
        list(restored),
        list(val['hq']),
        list(val['lq']),
        niqe_params=niqe,
        niqe_upscale=niqe_upscale,
        identity=config.eval.identity,
      )
  grid_rows.append(val['hq'][:8])
  if write_metrics:
    scoring.add_deltas(rows, 'LQ input', seed=config.seed)
  if write:
    images.save(files.join(out_dir, 'grid.png'), run_log.image_grid(grid_rows))
    if write_metrics:
      reports.write_report(
        rows,
        out_dir,
        title=f'Validation ({len(val["hq"])} images, {config.degradation.preset} degradations)',
      )
  return rows


def _save_all(directory: str, names, batch) -> None:
  for name, img in zip(names, batch):
    stem = os.path.splitext(os.path.basename(name))[0]
    images.save(files.join(directory, f'{stem}.png'), img)


def run(config, workdir: str, *, write_metrics: bool = True) -> dict:
  restorer, step = engine.load(workdir, config)
  config = restorer.config
  name = f'step_{step}'
  if config.sample.t_start < 1:  # a different starting point is a different evaluation
    name += f'_tstart{config.sample.t_start:g}'
  out_dir = files.join(workdir, 'eval' if write_metrics else 'samples', name)
  rows = evaluate_restorer(config, restorer, out_dir, write_metrics=write_metrics)
  logging.info('wrote %s', out_dir)
  return rows
