"""Whether the allocator changes what a train step computes (PROTOCOL.md, amendment of 2026-12-07
13:37): runs N steps of a config's real train step and prints the loss and a hash of the whole
train state. Run it twice from the repository root, as it ran (both printed loss
0.6732129454612732, state sha256 3690b8755851b275):
  PYTHONPATH=. python docs/results/protocol/p2/allocator_bitcheck.py configs/celeba_64_cpu.py 4
  LD_PRELOAD=libtcmalloc_minimal.so.4 PYTHONPATH=. python docs/results/protocol/p2/allocator_bitcheck.py configs/celeba_64_cpu.py 4
"""

import hashlib, sys, jax, numpy as np
from bench import train_step
from idm_jax.runtime import allocator, configlib
config = configlib.load(sys.argv[1])
trainer, state, batch = train_step.setup(config)
fn, arg, arg_spec = train_step.part_program('step', trainer, batch, trainer.batch_spec(config.train.batch_size))
compiled = train_step.compile_part(fn, trainer, arg_spec)
for _ in range(int(sys.argv[2])):
  state, m = compiled(state, arg)
h = hashlib.sha256()
for leaf in jax.tree.leaves(state):
  h.update(np.asarray(leaf).tobytes())
print('malloc', 'tcmalloc' if allocator.loaded() else 'system', 'loss', float(m['loss']), 'state sha256', h.hexdigest()[:16])
