#!/bin/bash
# Alternating A/B of the allocator: glibc's malloc (default) against TCMalloc (Debian's
# libtcmalloc-minimal4, LD_PRELOAD), both sides (JAX and PyTorch) under the same environment.
cd /work/main
export PYTHONPATH=/work/main JAX_PLATFORMS=cpu
for i in 1 2; do
  for mode in default tcmalloc; do
    if [ $mode = tcmalloc ]; then export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4; else unset LD_PRELOAD; fi
    echo "== round $i $mode $(date +%H:%M:%S)"
    .venv/bin/python -m bench.cpu_parity --rounds 1 --steps 5 --json /tmp/alloc/parity_ab.jsonl 2>&1 | grep -v "^[WI][0-9]" | tail -3
  done
done
