#!/usr/bin/env bash
# The 64 px CPU ablation of docs/RESULTS.md: each arm trains configs/celeba_64_cpu.py with its
# overrides for the same number of steps (the same compute: every arm has the same network,
# except where its steps are scaled by its measured step time), then restores and scores the
# fixed validation set (the dev faces, GFPGAN-preset degradations) at EVAL_STEPS.
#   bash experiments/ablation_64.sh WORKDIR ARM STEPS [--config.x=y ...]
# A selection script (docs/PROTOCOL.md): it trains on the train faces and scores the dev faces of
# SPLITS (default docs/results/splits.json), through WORKDIR/faces_dev, never the test faces.
# (The committed ablation ran before the split: on the first 800 faces, scored on the last 100,
# which are now the dev split.)
# Rerunning resumes: a finished arm is not retrained. CORE=n pins the arm to one core, so two
# arms can run side by side under the same conditions.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$1; ARM=$2; STEPS=$3; shift 3
EVAL_STEPS=${EVAL_STEPS:-'(1,4,10)'}
SRC=${SRC:-../shared/data/celeba_hq128_dev}
SPLITS=${SPLITS:-docs/results/splits.json}
WORK=$ROOT/$ARM
mkdir -p "$WORK"
VAL=$(python3 experiments/split_view.py --eval dev --splits "$SPLITS" --src "$SRC" --dst "$ROOT/faces_dev")
pin=()
if [ -n "${CORE:-}" ]; then pin=(taskset -c "$CORE"); fi
common=(--config=configs/celeba_64_cpu.py --workdir="$WORK" --config.data.dir="$ROOT/faces_dev"
        --config.data.num_val="$VAL" --config.eval.num_images="$VAL" "$@")
start=$(date +%s)
"${pin[@]}" python3 -m idm_jax.main "${common[@]}" --config.train.num_steps="$STEPS" \
  --config.train.sample_every=100000 > "$WORK/train.log" 2>&1
mid=$(date +%s)
"${pin[@]}" python3 -m idm_jax.main "${common[@]}" --config.mode=evaluate \
  --config.eval.steps="$EVAL_STEPS" > "$WORK/eval.log" 2>&1
end=$(date +%s)
echo "$ARM: train $((mid - start)) s, evaluate $((end - mid)) s" | tee -a "$ROOT/times.txt"
