#!/bin/bash
# Alternating A/B of glibc's transparent-huge-page malloc tunable, both sides (JAX and PyTorch) under the same env.
cd /work/main
export PYTHONPATH=/work/main JAX_PLATFORMS=cpu
for i in 1 2; do
  for mode in default hugetlb; do
    if [ $mode = hugetlb ]; then export GLIBC_TUNABLES=glibc.malloc.hugetlb=1; else unset GLIBC_TUNABLES; fi
    echo "== round $i $mode $(date +%H:%M:%S)"
    .venv/bin/python -m bench.cpu_parity --rounds 1 --steps 5 --json /tmp/ab/thp/parity.jsonl 2>&1 | grep -v "^[WI][0-9]" | tail -3
  done
done
