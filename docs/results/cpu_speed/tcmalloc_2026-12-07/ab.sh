#!/bin/bash
# The allocator A/B as users get it: the same commands with IDM_JAX_MALLOC=system (glibc's malloc)
# and without it (the driver's TCMalloc, idm_jax/runtime/allocator.py), alternating, on idle cores.
# The recipe's step (bench.train_step), then the parity layout with PyTorch's step beside ours
# (bench.cpu_parity runs both sides under the same allocator).
cd /work/main
export PYTHONPATH=/work/main JAX_PLATFORMS=cpu
OUT=docs/results/cpu_speed/tcmalloc_2026-12-07
for i in 1 2 3 4; do
  for mode in system tcmalloc; do
    if [ $mode = system ]; then export IDM_JAX_MALLOC=system; else unset IDM_JAX_MALLOC; fi
    echo "== celeba_64_cpu round $i $mode $(date +%H:%M:%S)"
    .venv/bin/python -m bench.train_step --config=configs/celeba_64_cpu.py --steps=7 --warmup=2 \
      --json $OUT/recipe_ab.jsonl 2>&1 | grep '^{' | tail -1 | cut -c1-200
  done
done
for i in 1 2 3; do
  for mode in system tcmalloc; do
    if [ $mode = system ]; then export IDM_JAX_MALLOC=system; else unset IDM_JAX_MALLOC; fi
    echo "== parity round $i $mode $(date +%H:%M:%S)"
    .venv/bin/python -m bench.cpu_parity --rounds 1 --steps 5 --json $OUT/parity_ab.jsonl 2>&1 \
      | grep '^{' | tail -1
  done
done
