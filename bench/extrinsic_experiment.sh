#!/usr/bin/env bash
# The controlled contamination experiment (docs/RESULTS.md, issue "Show that IDM works", part 2):
# a seeded 15% of the 800 training faces get a mild defect; round 0 trains on them, cleans its
# own training set, round 1 trains from scratch on the cleaned set; an oracle trains on the
# pristine set; every arm has the same time budget and is scored on the same pristine validation
# faces. Then the cleaning is scored against the truth, and an unconditional generator trains on
# the contaminated, cleaned and pristine faces with one budget each.
#   bash bench/extrinsic_experiment.sh [WORKDIR]
# Budgets (seconds of training per arm, compiles included): RESTORE_SECONDS (default 1800),
# GEN_SECONDS (default 900); the defaults fit in about three hours on two CPU cores. A step
# budget instead (RESTORE_STEPS, GEN_STEPS) keeps the arms equal when the cores are shared with
# other work, which a wall-clock budget cannot. CONTAMINATE passes flags to the contaminate CLI
# (--kinds, --<kind>-range) for heavier or other defects. Every stage
# resumes where it stopped when rerun (training from its checkpoints, cleaning from its journal,
# finished stages are skipped). The small results go to WORKDIR/results/: copy them to
# docs/results/ to keep them.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-workdirs/extrinsic_experiment}
SRC=${SRC:-../shared/data/celeba_hq128_dev}
RES=${RES:-64}
FRACTION=${FRACTION:-0.15}
SEED=${SEED:-0}
VAL=${VAL:-100}
RESTORE_SECONDS=${RESTORE_SECONDS:-1800}
GEN_SECONDS=${GEN_SECONDS:-900}
RESTORE_STEPS=${RESTORE_STEPS:-}
GEN_STEPS=${GEN_STEPS:-}
CONFIG=${CONFIG:-configs/celeba_64_cpu.py}
GEN_CONFIG=${GEN_CONFIG:-configs/generation_32_cpu.py}
read -r -a CONTAMINATE <<< "${CONTAMINATE:-}"  # e.g. "--blur-range 1.5 3 --kinds blur,jpeg"
read -r -a EXTRA <<< "${EXTRA:-}"          # more --config.x=y for the restoration arms
read -r -a GEN_EXTRA <<< "${GEN_EXTRA:-}"  # ... and for the generators
export PYTHONUNBUFFERED=1
OUT=$WORK/results
mkdir -p "$OUT"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/timeline.txt"; }

# 0. The pristine set and its contaminated twin, at the training resolution.
log "contaminate: fraction $FRACTION, seed $SEED, $RES px"
python3 -m idm_jax.data.contaminate --src "$SRC" --dst "$WORK/pristine" --fraction 0 \
  --resolution "$RES" --skip-last "$VAL" 2>/dev/null
python3 -m idm_jax.data.contaminate --src "$SRC" --dst "$WORK/contaminated" \
  --fraction "$FRACTION" --seed "$SEED" --resolution "$RES" --skip-last "$VAL" \
  "${CONTAMINATE[@]}" 2>/dev/null
cp "$WORK/contaminated/manifest.json" "$OUT/contamination_manifest.json"

# One budget per arm: N steps, or N seconds of training.
budget() {  # budget STEPS SECONDS
  if [ -n "$1" ]; then echo "--config.train.num_steps=$1 --config.train.max_seconds=0"
  else echo "--config.train.num_steps=100000000 --config.train.max_seconds=$2"; fi
}
read -r -a RESTORE_BUDGET <<< "$(budget "$RESTORE_STEPS" "$RESTORE_SECONDS")"
read -r -a GEN_BUDGET <<< "$(budget "$GEN_STEPS" "$GEN_SECONDS")"
RESTORE_LABEL=${RESTORE_STEPS:+$RESTORE_STEPS steps}; RESTORE_LABEL=${RESTORE_LABEL:-$RESTORE_SECONDS s}
GEN_LABEL=${GEN_STEPS:+$GEN_STEPS steps}; GEN_LABEL=${GEN_LABEL:-$GEN_SECONDS s}
arm=(--config="$CONFIG" "${RESTORE_BUDGET[@]}" "${EXTRA[@]}")

# 1. Round 0 on the contaminated faces, cleaning, round 1 from scratch on the cleaned faces.
log "rounds: train round 0, clean, train round 1 (${RESTORE_LABEL} each)"
python3 -m idm_jax.main "${arm[@]}" --workdir="$WORK/rounds" --config.mode=extrinsic \
  --config.data.dir="$WORK/contaminated/images" --config.data.num_val="$VAL" \
  --config.extrinsic.rounds=2 --config.extrinsic.init=scratch > "$WORK/rounds.log" 2>&1

# 2. The oracle: the same budget on the pristine faces, the same validation faces.
log "oracle: train on the pristine faces (${RESTORE_LABEL})"
python3 -m idm_jax.main "${arm[@]}" --workdir="$WORK/oracle" \
  --config.data.dir="$WORK/pristine/images" --config.data.num_val="$VAL" > "$WORK/oracle.log" 2>&1
if [ ! -f "$WORK/oracle/eval/done" ]; then
  python3 -m idm_jax.main "${arm[@]}" --workdir="$WORK/oracle" --config.mode=evaluate \
    --config.data.dir="$WORK/pristine/images" --config.data.num_val="$VAL" >> "$WORK/oracle.log" 2>&1
  touch "$WORK/oracle/eval/done"
fi

# 3. The cleaning against the truth.
log "score the cleaning against the pristine originals"
python3 -m idm_jax.cleaning_eval --cleaned "$WORK/rounds/round_1/dataset" \
  --contaminated "$WORK/contaminated" --pristine "$WORK/pristine" --out "$OUT" > /dev/null

# 4. Generators on the three versions of the training faces, one budget and seed each.
for version in contaminated cleaned pristine; do
  case $version in
    contaminated) data=(--config.data.dir="$WORK/contaminated/images" --config.data.num_val="$VAL") ;;
    cleaned) data=(--config.data.dir="$WORK/rounds/round_1/dataset/images" --config.data.num_val=0) ;;
    pristine) data=(--config.data.dir="$WORK/pristine/images" --config.data.num_val="$VAL") ;;
  esac
  gen=(--config="$GEN_CONFIG" --workdir="$WORK/gen_$version" --config.data.source=folder
       "${data[@]}" "${GEN_BUDGET[@]}" "${GEN_EXTRA[@]}")
  log "generator on the $version faces (${GEN_LABEL})"
  python3 -m idm_jax.main "${gen[@]}" > "$WORK/gen_$version.log" 2>&1
  python3 -m idm_jax.main "${gen[@]}" --config.mode=generate >> "$WORK/gen_$version.log" 2>&1
  up=$(python3 -c "import sys; from PIL import Image; from idm_jax.metrics import niqe
print(niqe.upscale_for(min(Image.open(sys.argv[1]).size)))" \
       "$WORK/gen_$version/generated/000000.png")
  python3 -m idm_jax.evaluate --fid --pred "$WORK/gen_$version/generated" \
    --ref "$WORK/pristine/images" --niqe-upscale "$up" --out "$WORK/eval_gen_$version" \
    --title "Samples of the generator trained on the $version faces" > /dev/null 2>&1
done

# 5. One summary of everything, and the small files worth keeping.
python3 bench/extrinsic_summary.py "$WORK" > "$OUT/summary.md"
for r in 0 1; do cp "$WORK/rounds/round_$r/eval/metrics.json" "$OUT/round_${r}_metrics.json"; done
cp "$WORK/oracle/eval/"step_*/metrics.json "$OUT/oracle_metrics.json"
cp "$WORK/rounds/round_1/dataset/manifest.json" "$OUT/cleaned_manifest.json"
python3 bench/cleaning_grid.py "$WORK" "$OUT/pristine_contaminated_cleaned.png" > /dev/null
for arm in rounds/round_0 rounds/round_1 oracle; do   # LQ | restored (1, 4 steps) | HQ
  grid=$(find "$WORK/$arm/eval" -name grid.png | sort | tail -1)
  if [ -n "$grid" ]; then cp "$grid" "$OUT/$(basename "$arm")_grid.png"; fi
done
for v in contaminated cleaned pristine; do
  cp "$WORK/eval_gen_$v/metrics.json" "$OUT/generator_${v}_metrics.json"
  cp "$WORK/gen_$v/generated_grid.png" "$OUT/generator_${v}_grid.png"
done
log "done"
cat "$OUT/summary.md"
