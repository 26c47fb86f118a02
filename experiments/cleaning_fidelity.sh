#!/usr/bin/env bash
# Can a restorer clean the dataset it was trained on? A selection script (docs/PROTOCOL.md): it
# chooses cleaning settings (t_start, steps, draws, the recipe's mix), so it works on the dev
# view of the faces only (experiments/split_view.py --eval dev) and on a dev contamination seed.
# As in the method, each arm's cleaner trains on the contaminated set it then cleans (an arm
# trained on the pristine faces would have seen the answer); three measures per arm:
#   self   the pristine dev faces given as their own LQ: PSNR/SSIM/identity of the output
#          against the face itself (a restorer that cannot return a clean face cannot clean a
#          dataset);
#   clean  cleaning the contaminated training faces (the clean mode: the worst share by the
#          config's score, or every face with --config.clean.fraction=1.0), scored against the
#          pristine originals, with NIQE and sharpness of the cleaned, contaminated and pristine
#          faces;
#   heavy  the usual evaluation on the heavily degraded dev faces (what the first two cost).
#   bash experiments/cleaning_fidelity.sh OUT ARM [ARM...]
# Each ARM is a name: its cleaner trains in OUT/ARM/model on DATA/C for TRAIN_STEPS (default
# 2000) steps of the config with ARM_FLAGS and EXTRA (more --config.x=y; ARM_FLAGS for what tells
# this invocation's arms apart, EXTRA for what they share), training seed TRAIN_SEED (default
# 0). Run it once per set of ARM_FLAGS into the same OUT, then
# experiments/cleaning_fidelity_summary.py OUT ARM [ARM...] compares the arms (the first is the
# reference) with paired-bootstrap intervals.
# MEASURES (default "self clean heavy") picks some. T_START and STEPS (default: the config's
# clean settings) set how self and clean sample, the same for both. DATA (default OUT/data)
# receives the dev view of SPLITS (default docs/results/splits.json) and its contaminated and pristine sets (contaminate CLI, seed CSEED 1,
# FRACTION 0.15 at RES 64 px; the dev faces stay pristine). CSEED must be a dev seed (0 or 1):
# seed 2 is the protocol's. Each stage is skipped when its output exists, so a rerun resumes.
set -euo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=$1; shift
SRC=${SRC:-../shared/data/celeba_hq128_dev}
SPLITS=${SPLITS:-docs/results/splits.json}
DATA=${DATA:-$OUT/data}
CONFIG=${CONFIG:-configs/celeba_64_cpu.py}
RES=${RES:-64}
FRACTION=${FRACTION:-0.15}
CSEED=${CSEED:-1}
TRAIN_STEPS=${TRAIN_STEPS:-2000}
TRAIN_SEED=${TRAIN_SEED:-0}
NIQE=${NIQE:-../shared/data/niqe_pris_params.npz}
case $CSEED in 0|1) ;; *) echo "CSEED=$CSEED: a selection script uses the dev contamination seeds 0 and 1 only" >&2; exit 2;; esac
MEASURES=${MEASURES:-self clean heavy}
read -r -a EXTRA <<< "${EXTRA:-}"
read -r -a ARM_FLAGS <<< "${ARM_FLAGS:-}"
SAMPLING=(); CLEANING=()
if [ -n "${T_START:-}" ]; then SAMPLING+=(--t_start "$T_START"); CLEANING+=(--config.clean.t_start="$T_START"); fi
if [ -n "${STEPS:-}" ]; then SAMPLING+=(--steps "$STEPS"); CLEANING+=(--config.clean.steps="$STEPS"); fi
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/timeline.txt"; }
want() { [[ " $MEASURES " == *" $1 "* ]]; }

# The dev view: the train faces and the dev faces, the dev faces last by name (never the test ones).
mkdir -p "$DATA"
VAL=$(python3 experiments/split_view.py --eval dev --splits "$SPLITS" --src "$SRC" --dst "$DATA/faces")
SRC=$DATA/faces
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

NIQE_ARGS=()
if [ -f "$NIQE" ]; then NIQE_ARGS=(--niqe_params "$NIQE"); fi
for name in "$@"; do
  A=$OUT/$name
  W=$A/model
  mkdir -p "$A"
  run=(--config="$CONFIG" --workdir="$W" --config.data.dir="$DATA/C/images"
       --config.data.num_val="$VAL" --config.seed="$TRAIN_SEED" "${ARM_FLAGS[@]}" "${EXTRA[@]}")
  if [ ! -f "$A/trained" ]; then
    log "$name: train the cleaner on the contaminated faces it will clean ($TRAIN_STEPS steps) ${ARM_FLAGS[*]}"
    python3 -m idm_jax.main "${run[@]}" --config.train.num_steps="$TRAIN_STEPS" \
      --config.train.max_seconds=0 > "$A/train.log" 2>&1
    echo "$DATA/C/images $TRAIN_STEPS steps seed $TRAIN_SEED ${ARM_FLAGS[*]} ${EXTRA[*]}" > "$A/trained"
  fi
  if want self && [ ! -f "$A/self/metrics.json" ]; then
    log "$name: the pristine validation faces as their own LQ ${SAMPLING[*]}"
    python3 -m idm_jax.restore --aligned -i "$DATA/val" -o "$A/self_restored" --checkpoint "$W" \
      --batch_size 50 "${SAMPLING[@]}" > "$A/self.log" 2>&1
    python3 -m idm_jax.score --pred "$A/self_restored/restored_faces" --gt "$DATA/val" \
      --out "$A/self" --title "$name: pristine faces restored, against themselves" \
      >> "$A/self.log" 2>&1
  fi
  if want clean && [ ! -f "$A/cleaning/cleaning.json" ]; then
    log "$name: clean the contaminated training set, score against the pristine one ${CLEANING[*]}"
    python3 -m idm_jax.main "${run[@]}" --config.mode=clean \
      --config.clean.out_dir="$A/cleaned" "${CLEANING[@]}" > "$A/clean.log" 2>&1
    python3 -m idm_jax.extrinsic.cleaning_eval --cleaned "$A/cleaned" --contaminated "$DATA/C" \
      --pristine "$DATA/P" --out "$A/cleaning" "${NIQE_ARGS[@]}" >> "$A/clean.log" 2>&1
    python3 experiments/cleaning_grid.py "$A/pristine_contaminated_cleaned.png" \
      --report "$A/cleaning/cleaning.json" --pristine "$DATA/P" --contaminated "$DATA/C" \
      --cleaned "$A/cleaned" >> "$A/clean.log" 2>&1
  fi
  if want heavy && [ ! -f "$A/heavy_metrics.json" ]; then
    log "$name: evaluate on the heavily degraded validation set"
    # the heavy dev set: the pristine view's validation faces (the contaminated set's are the same)
    python3 -m idm_jax.main "${run[@]}" --config.mode=evaluate > "$A/eval.log" 2>&1
    cp "$(find "$W/eval" -name metrics.json | sort -V | tail -1)" "$A/heavy_metrics.json"
    cp "$(find "$W/eval" -name grid.png | sort -V | tail -1)" "$A/heavy_grid.png"
  fi
done
log "done"
python3 experiments/cleaning_fidelity_summary.py "$OUT" "$@" | tee "$OUT/summary.md"
