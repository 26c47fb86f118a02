"""`--config.mode=generate`: N samples of an unconditional model as PNGs (the "beyond" experiment).

Sample i always comes from key fold_in(seed, i), so the set does not depend on the batch size or
the number of hosts; each host writes the indices i with i % process_count == process_index,
all of them sampling in lockstep on one program over every chip (host_shares.lockstep_chunks);
process 0 then draws the grid of the first 16.
"""

from __future__ import annotations

from absl import logging
import jax
import numpy as np
from tqdm import tqdm

from idm_jax.inference import engine
from idm_jax.runtime import host_shares
from idm_jax.runtime import parallel
from idm_jax.storage import files
from idm_jax.storage import images
from idm_jax.training import run_log


def run(config, workdir: str) -> str:
  restorer, _ = engine.load(workdir, config)
  config = restorer.config
  if config.model.conditional:
    raise ValueError(
      'config.mode=generate needs an unconditional model '
      '(configs/ffhq_generation.py); this checkpoint is a restoration model'
    )
  out_dir = config.generate.out_dir or files.join(workdir, 'generated')
  g = config.generate
  pi = jax.process_index()
  done = set(files.listdir(out_dir)) if files.isdir(out_dir) else set()  # one listing
  todo = np.array(
    [i for i in host_shares.host_share(g.num_samples) if f'{i:06d}.png' not in done], np.int64
  )
  bs = g.batch_size
  sample = lambda idx: restorer.generate_batch(idx, seed=config.seed)
  # Empty chunks once this host is done: it fills the others' batches.
  for (idx,) in tqdm(
    list(host_shares.lockstep_chunks(bs, restorer.lockstep, todo)), desc='generate', disable=pi != 0
  ):
    samples = host_shares.call_padded(sample, bs, idx)
    for i, img in zip(idx, samples):
      images.save(files.join(out_dir, f'{i:06d}.png'), img)
  # The grid shows the first samples whichever host drew them: on shared storage (a bucket, as
  # on a pod) every host's; where each host writes to its own disk, those this one can see.
  parallel.barrier('generate: every sample written')
  if pi == 0:
    present = set(files.listdir(out_dir))
    first = [
      images.read(files.join(out_dir, f'{i:06d}.png'))
      for i in range(min(16, g.num_samples))
      if f'{i:06d}.png' in present
    ]
    if first:
      images.save(files.join(workdir, 'generated_grid.png'), run_log.image_grid([np.stack(first)]))
  logging.info('%d samples in %s', g.num_samples, out_dir)
  return out_dir
