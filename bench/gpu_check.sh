#!/usr/bin/env bash
# One command for a GPU machine: the accelerator-only tests, then train-step and restoration
# benchmarks for the parity configs and configs/ffhq.py; prints a table last.
#   bash bench/gpu_check.sh [OUT_DIR]          (about 6-8 minutes on one H100/H200)
#   ONLY="tests train256 train512 trainffhq sampleffhq" bash bench/gpu_check.sh   (a subset)
#   ONLY="parts256 update256 train256" ...   also times adm_sr_256's gradient and update halves
#   apart, and its update in four forms (bench/update_variants.py; about a minute)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT_DIR=${1:-${OUT:-bench_out}}
mkdir -p "$OUT_DIR"
JSON="$OUT_DIR/bench.jsonl"
ONLY=${ONLY:-"tests train256 train512 trainffhq sampleffhq"}
export PYTHONUNBUFFERED=1
want() { [[ " $ONLY " == *" $1 "* ]]; }
status=0
run() { echo "+ $*"; "$@" || { echo "FAILED: $*"; status=1; }; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
want tests && run python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
want parts256 && for part in grads update; do
  run python3 -m bench.train_step --config=configs/adm_sr_256.py --part $part --json "$JSON"
done
want update256 && run python3 -m bench.update_variants --config=configs/adm_sr_256.py --json "$JSON"
want train256 && run python3 -m bench.train_step --config=configs/adm_sr_256.py --json "$JSON"
want train512 && run python3 -m bench.train_step --config=configs/adm_sr_512.py --json "$JSON"
want trainffhq && run python3 -m bench.train_step --config=configs/ffhq.py --json "$JSON"
want sampleffhq && run python3 -m bench.sample --config=configs/ffhq.py --steps 25 --batch 16 \
  --json "$JSON"
[ -f "$JSON" ] && python3 bench/table.py "$JSON"
exit $status
