"""Compile what a config runs for a Cloud TPU topology on a CPU host: no TPU needed.

  python -m idm_jax.aot --config=configs/ffhq.py --topology=v5e:16x16 [--num_slices=2]
      [--max_batch] [--config.x=y ...]

libtpu (pip install -e ".[tpu]") describes a TPU slice as abstract devices; the mesh over them
goes through the same `parallel.make_mesh` and logical-axis rules as training, and the programs
are the ones config.mode runs. XLA's TPU compiler then gives the executable a real run would
get: its per-chip HBM, FLOPs and collectives. A config that cannot run on the slice fails here as
it would there, with the field to change. Measured numbers live in docs/TPU.md.

  chips.py     the chips (HBM, bf16 peak), topology names, a slice's abstract devices
  programs.py  compiling the train step, grid sampler and Restorer; their memory; fits
  check.py     the check: what config.mode runs on a topology, its report and verdict
  search.py    --max_batch: the largest per-chip batch whose train step fits
  hlo.py       the collectives in an optimized HLO module's text
  __main__.py  the command line
"""

import os

# Before jax loads (MaxText and AXLearn do the same): compile on the CPU host without touching
# any local accelerator, and let libtpu skip the GCE metadata query it makes off a TPU VM.
# Compiling needs no TPU, so several compiles (tests, a preflight beside a job) may share libtpu
# instead of queueing on its one-process lock file. Here rather than in a module: Python runs a
# package's __init__ before any of its modules, and they import jax.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
