"""The extrinsic rounds (`--config.mode=extrinsic`): train, clean, train on the cleaned set, ...

WORKDIR/round_k/ holds model M_k (checkpoints/), the dataset D_k it trained on (dataset/, k >= 1;
D_0 is the source), and eval/. M_k cleans D_k into D_{k+1} (cleaning.py). rounds.md gets a row
per round on the same fixed validation set; a stopped run resumes where it was.
"""

from __future__ import annotations

import json

from absl import logging
import jax

from idm_jax.extrinsic import cleaned_dataset
from idm_jax.extrinsic import cleaning
from idm_jax.inference import engine
from idm_jax.inference import validation
from idm_jax.metrics import reports
from idm_jax.runtime import configlib
from idm_jax.storage import files
from idm_jax.training import train


def round_config(config, workdir: str, r: int):
  """Round r's config: D_r (the source for r = 0), fine-tuned from M_{r-1} if asked."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    if r > 0:
      c.data.update(
        source='folder',
        dir=files.join(workdir, f'round_{r}', 'dataset', cleaned_dataset.IMAGES),
        num_val=0,
        max_examples=0,
      )
      if config.extrinsic.init == 'finetune':
        c.train.init_from = files.join(workdir, f'round_{r - 1}')
    if config.extrinsic.steps_per_round:
      c.train.num_steps = int(config.extrinsic.steps_per_round)
  return c


ROUND_METRICS = (('PSNR', 'psnr'), ('SSIM', 'ssim'), ('identity', 'identity'), ('NIQE', 'niqe'))


def _rounds_table(results: dict) -> str:
  rows = [
    [r, results[r]['data']]
    + [
      'n/a' if results[r]['metrics'].get(key) is None else f'{results[r]["metrics"][key]:.4f}'
      for _, key in ROUND_METRICS
    ]
    for r in sorted(results, key=int)
  ]
  lines = [
    '# Extrinsic rounds',
    '',
    'Each round evaluated on the same fixed validation set (fixed degradations).',
    '',
    *reports.table(['round', 'trained on'] + [h for h, _ in ROUND_METRICS], rows),
  ]
  return '\n'.join(lines) + '\n'


def run_rounds(config, workdir: str) -> dict:
  """Train round 0, clean, train round 1, ...; resumes wherever it was stopped."""
  files.makedirs(workdir)
  results_path = files.join(workdir, 'rounds.json')
  results = {}
  if files.exists(results_path):
    results = json.loads(files.read_text(results_path))
  for r in range(int(config.extrinsic.rounds)):
    rdir = files.join(workdir, f'round_{r}')
    cfg = round_config(config, workdir, r)
    if r > 0:
      prev = round_config(config, workdir, r - 1)
      cleaning.clean_with_model(
        prev, files.join(workdir, f'round_{r - 1}'), files.join(rdir, 'dataset')
      )
    files.makedirs(rdir)
    if jax.process_index() == 0:
      files.write_atomic(files.join(rdir, 'config.json'), configlib.to_json(cfg).encode())
    logging.info('extrinsic round %d: training on %s', r, cfg.data.dir or cfg.data.source)
    train.train_and_evaluate(cfg, rdir, vis_data=config.data)
    if str(r) not in results:
      restorer, _ = engine.load(rdir, config)  # the ORIGINAL validation set
      rows = validation.evaluate_restorer(restorer.config, restorer, files.join(rdir, 'eval'))
      last = list(rows)[-1]
      results[str(r)] = dict(
        data='source' if r == 0 else f'round_{r}/dataset', metrics=_summary(rows[last])
      )
      if jax.process_index() == 0:
        files.write_atomic(results_path, json.dumps(results, indent=1).encode())
        files.write_atomic(files.join(workdir, 'rounds.md'), _rounds_table(results).encode())
  return results


def _summary(result: dict) -> dict:
  """Means of the round-table metrics from an evaluate_images result (None if unavailable)."""
  return {key: result['metrics'].get(key, {}).get('mean') for _, key in ROUND_METRICS}
