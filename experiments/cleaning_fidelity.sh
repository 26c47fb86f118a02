#!/usr/bin/env bash
# Can a trained restorer clean a dataset? Three measures per trained workdir (docs/RESULTS.md,
# "A restorer that leaves clean faces alone"), all on faces the model never trained on or on
# the contaminated twin of its training set:
#   self   pristine validation faces given as their own LQ: PSNR/SSIM/identity of the output
#          against the face itself (a restorer that cannot return a clean face cannot clean a
#          dataset);
#   clean  cleaning the contaminated twin of the training set (the clean mode: the worst share by
#          the config's score), scored against the pristine originals;
#   heavy  the usual evaluation on the heavily degraded validation set (what the first two cost).
#   bash experiments/cleaning_fidelity.sh OUT WORKDIR [WORKDIR...]
# MEASURES (default "self clean heavy") picks some. T_START and STEPS (default: the config's
# clean settings) set how self and clean sample, the same for both. DATA (default OUT/data)
# receives the contaminated and pristine sets (contaminate CLI, seed CSEED 0, FRACTION 0.15 at
# RES 64 px, the last VAL 100 faces pristine): choose sampling settings on another CSEED than
# the one you report. CONFIG and EXTRA (more --config.x=y) as for training. Each stage is skipped
# when its output exists, so a rerun resumes. Then experiments/cleaning_fidelity_summary.py compares
# the workdirs (the first is the reference) with paired-bootstrap intervals.
set -euo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=$1; shift
SRC=${SRC:-../shared/data/celeba_hq128_dev}
DATA=${DATA:-$OUT/data}
CONFIG=${CONFIG:-configs/celeba_64_cpu.py}
VAL=${VAL:-100}
RES=${RES:-64}
FRACTION=${FRACTION:-0.15}
CSEED=${CSEED:-0}
MEASURES=${MEASURES:-self clean heavy}
read -r -a EXTRA <<< "${EXTRA:-}"
SAMPLING=(); CLEANING=()
if [ -n "${T_START:-}" ]; then SAMPLING+=(--t_start "$T_START"); CLEANING+=(--config.clean.t_start="$T_START"); fi
if [ -n "${STEPS:-}" ]; then SAMPLING+=(--steps "$STEPS"); CLEANING+=(--config.clean.steps="$STEPS"); fi
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/timeline.txt"; }
want() { [[ " $MEASURES " == *" $1 "* ]]; }

if [ ! -f "$DATA/P/manifest.json" ]; then
  python3 -m idm_jax.data.contaminate --src "$SRC" --dst "$DATA/P" --fraction 0 \
    --resolution "$RES" --skip_last "$VAL" 2>/dev/null
fi
if [ ! -f "$DATA/C/manifest.json" ]; then
  python3 -m idm_jax.data.contaminate --src "$SRC" --dst "$DATA/C" --fraction "$FRACTION" \
    --seed "$CSEED" --resolution "$RES" --skip_last "$VAL" 2>/dev/null
fi
mkdir -p "$DATA/val"   # the pristine validation faces: the last VAL files, by name
while read -r name; do
  ln -sfn "../P/images/$name" "$DATA/val/$name"
done < <(find "$DATA/P/images" -maxdepth 1 -type f -printf '%f\n' | sort | tail -n "$VAL")

for W in "$@"; do
  name=$(basename "$W")
  A=$OUT/$name
  mkdir -p "$A"
  run=(--config="$CONFIG" --workdir="$W" "${EXTRA[@]}")
  if want self && [ ! -f "$A/self/metrics.json" ]; then
    log "$name: the pristine validation faces as their own LQ ${SAMPLING[*]}"
    python3 -m idm_jax.restore --aligned -i "$DATA/val" -o "$A/self_restored" --checkpoint "$W" \
      --batch_size 50 "${SAMPLING[@]}" > "$A/self.log" 2>&1
    python3 -m idm_jax.evaluate --pred "$A/self_restored/restored_faces" --gt "$DATA/val" \
      --out "$A/self" --title "$name: pristine faces restored, against themselves" \
      >> "$A/self.log" 2>&1
  fi
  if want clean && [ ! -f "$A/cleaning/cleaning.json" ]; then
    log "$name: clean the contaminated training set, score against the pristine one ${CLEANING[*]}"
    python3 -m idm_jax.main "${run[@]}" --config.mode=clean --config.data.dir="$DATA/C/images" \
      --config.data.num_val="$VAL" --config.clean.out_dir="$A/cleaned" "${CLEANING[@]}" \
      > "$A/clean.log" 2>&1
    python3 -m idm_jax.cleaning_eval --cleaned "$A/cleaned" --contaminated "$DATA/C" \
      --pristine "$DATA/P" --out "$A/cleaning" >> "$A/clean.log" 2>&1
    python3 experiments/cleaning_grid.py "$A/pristine_contaminated_cleaned.png" \
      --report "$A/cleaning/cleaning.json" --pristine "$DATA/P" --contaminated "$DATA/C" \
      --cleaned "$A/cleaned" >> "$A/clean.log" 2>&1
  fi
  if want heavy && [ ! -f "$A/heavy_metrics.json" ]; then
    log "$name: evaluate on the heavily degraded validation set"
    python3 -m idm_jax.main "${run[@]}" --config.mode=evaluate > "$A/eval.log" 2>&1
    cp "$(find "$W/eval" -name metrics.json | sort -V | tail -1)" "$A/heavy_metrics.json"
    cp "$(find "$W/eval" -name grid.png | sort -V | tail -1)" "$A/heavy_grid.png"
  fi
done
log "done"
python3 experiments/cleaning_fidelity_summary.py "$OUT" "$@" | tee "$OUT/summary.md"
