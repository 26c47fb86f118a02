#!/usr/bin/env bash
# The controlled contamination experiment (docs/RESULTS.md, "Contamination and extrinsic
# cleaning"): a seeded share of the 800 training faces gets a defect; round 0 trains on them and
# cleans its own training set; round 1 trains from scratch on the cleaned set; an oracle trains on
# the pristine set; every arm has the same budget, trains once per training seed, and is scored on
# the same pristine validation faces. Then each cleaning is scored against the truth, and an
# unconditional generator trains on the contaminated, cleaned and pristine faces.
#   bash experiments/extrinsic_experiment.sh [WORKDIR]
# The dose: FRACTION (default 0.15) and CONTAMINATE, flags for the contaminate CLI (--kinds,
# --<kind>-range). SEEDS (default "0"): the training seeds; every restoration arm trains once per
# seed, and the summary's intervals cover seeds and faces. ROUNDS=1 trains round 0 and the oracle
# only (does the dose open a gap?); ROUNDS=2 (default) adds the cleaning and round 1. ORACLE
# (default WORKDIR/oracle) holds the pristine set and the oracle arms: one oracle serves every
# dose, so point a second dose's ORACLE at the first's. GENERATORS=0 skips the generators.
# CONTROL=1 (with ROUNDS=2) adds a control arm: the pristine faces put through round 0's cleaner
# (same settings) and an arm trained on them, which separates what round 1 owes to removing the
# defects from what it owes to training on the model's own output.
# Budgets (per arm, compiles included): RESTORE_SECONDS (default 1800), GEN_SECONDS (default
# 900), or a step budget (RESTORE_STEPS, GEN_STEPS), which keeps the arms equal when the cores
# are shared. Every stage resumes where it stopped when rerun (training from its checkpoints,
# cleaning from its journal, finished stages are skipped). The small results go to
# WORKDIR/results/ as each arm finishes: copy them to docs/results/ to keep them; an arm whose
# results are there is skipped (the rounds of a seed are one arm), so copying kept results back
# into a fresh WORKDIR/results resumes a phase at its last finished arm.
# The faces (docs/PROTOCOL.md): EVAL (default dev) picks the evaluation split of SPLITS (default
# docs/results/splits.json); the runs see the train faces and that split only, through
# experiments/split_view.py. EVAL=test is for the protocol's claim runs, scored once: choose
# nothing on them. PREPARE_ONLY=1 makes the faces and the contaminated set and stops, so that
# two processes (one per core, SEEDS split between them) can then share WORKDIR. Cleanings are
# scored with NIQE (NIQE, default ../shared/data/niqe_pris_params.npz, when it exists) and
# sharpness beside PSNR, SSIM and identity.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-workdirs/extrinsic_experiment}
SRC=${SRC:-../shared/data/celeba_hq128_dev}
SPLITS=${SPLITS:-docs/results/splits.json}
EVAL=${EVAL:-dev}
NIQE=${NIQE:-../shared/data/niqe_pris_params.npz}
RES=${RES:-64}
FRACTION=${FRACTION:-0.15}
SEED=${SEED:-0}             # the contamination's seed (which faces, which defects)
read -r -a SEEDS <<< "${SEEDS:-0}"
ROUNDS=${ROUNDS:-2}
ORACLE=${ORACLE:-$WORK/oracle}
GENERATORS=${GENERATORS:-1}
CONTROL=${CONTROL:-0}
RESTORE_SECONDS=${RESTORE_SECONDS:-1800}
GEN_SECONDS=${GEN_SECONDS:-900}
RESTORE_STEPS=${RESTORE_STEPS:-}
GEN_STEPS=${GEN_STEPS:-}
CONFIG=${CONFIG:-configs/celeba_64_cpu.py}
GEN_CONFIG=${GEN_CONFIG:-configs/generation_32_cpu.py}
read -r -a CONTAMINATE <<< "${CONTAMINATE:-}"  # e.g. "--blur_range 1.5 3 --kinds blur,jpeg"
read -r -a EXTRA <<< "${EXTRA:-}"          # more --config.x=y for the restoration arms
read -r -a GEN_EXTRA <<< "${GEN_EXTRA:-}"  # ... and for the generators
export PYTHONUNBUFFERED=1
OUT=$WORK/results
PRISTINE=$ORACLE/pristine
mkdir -p "$OUT" "$ORACLE"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/timeline.txt"; }

# 0. The faces of the split (train + EVAL, the EVAL faces last by name), the pristine set and
#    its contaminated twin at the training resolution.
VAL=$(python3 experiments/split_view.py --splits "$SPLITS" --eval "$EVAL" --src "$SRC" \
      --dst "$WORK/faces_$EVAL")
SRC=$WORK/faces_$EVAL
log "contaminate: fraction $FRACTION, seed $SEED, $RES px, evaluation on $EVAL ($VAL faces) ${CONTAMINATE[*]}"
if [ ! -f "$PRISTINE/manifest.json" ]; then
  python3 -m idm_jax.data.contaminate --src "$SRC" --dst "$PRISTINE" --fraction 0 \
    --resolution "$RES" --skip_last "$VAL" 2>/dev/null
fi
if [ ! -f "$WORK/contaminated/manifest.json" ]; then
  python3 -m idm_jax.data.contaminate --src "$SRC" --dst "$WORK/contaminated" \
    --fraction "$FRACTION" --seed "$SEED" --resolution "$RES" --skip_last "$VAL" \
    "${CONTAMINATE[@]}" 2>/dev/null
fi
# A shared ORACLE must hold the same faces (a pristine set made for another split would score
# the oracle on other faces than the other arms).
if ! diff -q <(find "$SRC" -mindepth 1 -maxdepth 1 -printf '%f\n' | sed 's/\.[^.]*$//' | sort) \
             <(find "$PRISTINE/images" -maxdepth 1 -type f -printf '%f\n' | sed 's/\.[^.]*$//' | sort) \
             > /dev/null; then
  echo "$PRISTINE holds other faces than $SRC (another split?): use another ORACLE" >&2; exit 2
fi
cp "$WORK/contaminated/manifest.json" "$OUT/contamination_manifest.json"
cp "$SPLITS" "$OUT/splits.json"
if [ "${PREPARE_ONLY:-0}" = 1 ]; then log "prepared"; exit 0; fi
NIQE_ARGS=()
if [ -f "$NIQE" ]; then NIQE_ARGS=(--niqe_params "$NIQE"); fi

# One budget per arm: N steps, or N seconds of training.
budget() {  # budget STEPS SECONDS
  if [ -n "$1" ]; then echo "--config.train.num_steps=$1 --config.train.max_seconds=0"
  else echo "--config.train.num_steps=100000000 --config.train.max_seconds=$2"; fi
}
read -r -a RESTORE_BUDGET <<< "$(budget "$RESTORE_STEPS" "$RESTORE_SECONDS")"
read -r -a GEN_BUDGET <<< "$(budget "$GEN_STEPS" "$GEN_SECONDS")"
RESTORE_LABEL=${RESTORE_STEPS:+$RESTORE_STEPS steps}; RESTORE_LABEL=${RESTORE_LABEL:-$RESTORE_SECONDS s}
GEN_LABEL=${GEN_STEPS:+$GEN_STEPS steps}; GEN_LABEL=${GEN_LABEL:-$GEN_SECONDS s}

# An arm whose results are in WORKDIR/results is done: results copied back from docs/results/ let a
# fresh clone go on from the last finished arm without the workdir that made it. The rounds are one
# unit (round 1 trains on round 0's cleaning), and the control with them (it uses round 0's cleaner).
rounds_done() {  # rounds_done SEED
  local r
  for r in $(seq 0 $((ROUNDS - 1))); do
    [ -f "$OUT/round_${r}_seed_$1_metrics.json" ] || return 1
  done
  if [ "$ROUNDS" -ge 2 ]; then [ -f "$OUT/cleaning_seed_$1/cleaning.json" ] || return 1; fi
  if [ "$ROUNDS" -ge 2 ] && [ "$CONTROL" = 1 ]; then
    [ -f "$OUT/control_seed_$1_metrics.json" ] || return 1
  fi
}
oracle_done() { [ -f "$OUT/oracle_seed_$1_metrics.json" ]; }  # oracle_done SEED

# A training stopped by a signal saves its step and exits 0 (the pod launcher's convention): stop
# here as well, so that no arm is evaluated, and marked done, part-trained. Rerun to resume.
stop_if_stopped() {  # stop_if_stopped LOG
  if tail -n 20 "$1" | grep -q 'stopped at step [0-9]* after SIG'; then
    log "stopped by a signal (see $1): rerun the same command to resume"; exit 3
  fi
}

for S in "${SEEDS[@]}"; do
  arm=(--config="$CONFIG" "${RESTORE_BUDGET[@]}" --config.seed="$S" "${EXTRA[@]}")
  if rounds_done "$S"; then log "seed $S: the rounds' results are in $OUT, skipped"; else
    # 1. Round 0 on the contaminated faces; with ROUNDS=2 it cleans them and round 1 trains from
    #    scratch on the cleaned faces.
    log "seed $S: rounds 0..$((ROUNDS - 1)) (${RESTORE_LABEL} each)"
    python3 -m idm_jax.main "${arm[@]}" --workdir="$WORK/rounds/seed_$S" --config.mode=extrinsic \
      --config.data.dir="$WORK/contaminated/images" --config.data.num_val="$VAL" \
      --config.extrinsic.rounds="$ROUNDS" --config.extrinsic.init=scratch \
      >> "$WORK/rounds_seed_$S.log" 2>&1
    stop_if_stopped "$WORK/rounds_seed_$S.log"
    # 2. The cleaning against the truth.
    if [ "$ROUNDS" -ge 2 ]; then
      cleaned=$WORK/rounds/seed_$S/round_1/dataset
      log "seed $S: score the cleaning against the pristine originals"
      python3 -m idm_jax.extrinsic.cleaning_eval --cleaned "$cleaned" \
        --contaminated "$WORK/contaminated" --pristine "$PRISTINE" --out "$OUT/cleaning_seed_$S" \
        "${NIQE_ARGS[@]}" > /dev/null
      python3 experiments/cleaning_grid.py "$OUT/pristine_contaminated_cleaned_seed_$S.png" \
        --report "$OUT/cleaning_seed_$S/cleaning.json" --pristine "$PRISTINE" \
        --contaminated "$WORK/contaminated" --cleaned "$cleaned" > /dev/null
    fi
    # 3. The control: the pristine training faces through the same cleaner, the pristine validation
    #    faces as they are, an arm trained and scored like the others.
    C=$WORK/control/seed_$S
    if [ "$ROUNDS" -ge 2 ] && [ "$CONTROL" = 1 ] && [ ! -f "$C/eval/done" ]; then
      log "seed $S: control, the pristine faces through round 0's cleaner (${RESTORE_LABEL})"
      mkdir -p "$C/faces"
      python3 -m idm_jax.main "${arm[@]}" --workdir="$WORK/rounds/seed_$S/round_0" \
        --config.mode=clean --config.data.dir="$PRISTINE/images" --config.data.num_val="$VAL" \
        --config.clean.out_dir="$C/cleaned" >> "$C.log" 2>&1
      cp "$C/cleaned/images/"* "$C/faces/"
      find "$PRISTINE/images" -maxdepth 1 -type f | sort | tail -n "$VAL" | xargs cp -t "$C/faces/"
      control=("${arm[@]}" --workdir="$C" --config.data.dir="$C/faces" --config.data.num_val="$VAL")
      python3 -m idm_jax.main "${control[@]}" >> "$C.log" 2>&1
      stop_if_stopped "$C.log"
      python3 -m idm_jax.main "${control[@]}" --config.mode=evaluate >> "$C.log" 2>&1
      touch "$C/eval/done"
    fi
    if [ -f "$C/eval/done" ]; then
      cp "$(find "$C/eval" -name metrics.json | sort -V | tail -1)" \
        "$OUT/control_seed_${S}_metrics.json"
      cp "$(find "$C/eval" -name grid.png | sort -V | tail -1)" "$OUT/control_seed_${S}_grid.png"
    fi
    for r in $(seq 0 $((ROUNDS - 1))); do
      cp "$WORK/rounds/seed_$S/round_$r/eval/grid.png" "$OUT/round_${r}_seed_${S}_grid.png"
      cp "$WORK/rounds/seed_$S/round_$r/eval/metrics.json" "$OUT/round_${r}_seed_${S}_metrics.json"
    done
    log "seed $S: the rounds are done"
  fi
  # 4. The oracle: the same budget and seed on the pristine faces, the same validation faces.
  O=$ORACLE/seed_$S
  if oracle_done "$S"; then log "seed $S: the oracle's results are in $OUT, skipped"; else
    if [ ! -f "$O/eval/done" ]; then
      log "seed $S: oracle on the pristine faces (${RESTORE_LABEL})"
      oracle=("${arm[@]}" --workdir="$O" --config.data.dir="$PRISTINE/images"
              --config.data.num_val="$VAL")
      python3 -m idm_jax.main "${oracle[@]}" >> "$O.log" 2>&1
      stop_if_stopped "$O.log"
      python3 -m idm_jax.main "${oracle[@]}" --config.mode=evaluate >> "$O.log" 2>&1
      touch "$O/eval/done"
    fi
    cp "$(find "$O/eval" -name grid.png | sort -V | tail -1)" "$OUT/oracle_seed_${S}_grid.png"
    cp "$(find "$O/eval" -name metrics.json | sort -V | tail -1)" "$OUT/oracle_seed_${S}_metrics.json"
    log "seed $S: the oracle is done"
  fi
done

# 5. Generators on the three versions of the training faces (the first seed's cleaning).
if [ "$GENERATORS" = 1 ] && [ "$ROUNDS" -ge 2 ]; then
  for version in contaminated cleaned pristine; do
    case $version in
      contaminated) data=(--config.data.dir="$WORK/contaminated/images" --config.data.num_val="$VAL") ;;
      cleaned) data=(--config.data.dir="$WORK/rounds/seed_${SEEDS[0]}/round_1/dataset/images"
                     --config.data.num_val=0) ;;
      pristine) data=(--config.data.dir="$PRISTINE/images" --config.data.num_val="$VAL") ;;
    esac
    gen=(--config="$GEN_CONFIG" --workdir="$WORK/gen_$version" --config.data.source=folder
         "${data[@]}" "${GEN_BUDGET[@]}" "${GEN_EXTRA[@]}")
    log "generator on the $version faces (${GEN_LABEL})"
    python3 -m idm_jax.main "${gen[@]}" >> "$WORK/gen_$version.log" 2>&1
    stop_if_stopped "$WORK/gen_$version.log"
    python3 -m idm_jax.main "${gen[@]}" --config.mode=generate >> "$WORK/gen_$version.log" 2>&1
    up=$(python3 -c "import sys; from PIL import Image; from idm_jax.metrics import niqe
print(niqe.upscale_for(min(Image.open(sys.argv[1]).size)))" \
         "$WORK/gen_$version/generated/000000.png")
    python3 -m idm_jax.score --fid --pred "$WORK/gen_$version/generated" \
      --ref "$PRISTINE/images" --niqe_upscale "$up" --out "$WORK/eval_gen_$version" \
      --title "Samples of the generator trained on the $version faces" > /dev/null 2>&1
    cp "$WORK/eval_gen_$version/metrics.json" "$OUT/generator_${version}_metrics.json"
    cp "$WORK/gen_$version/generated_grid.png" "$OUT/generator_${version}_grid.png"
  done
fi

# 6. One summary of everything.
python3 experiments/extrinsic_summary.py "$OUT" > "$OUT/summary.md"
log "done"
cat "$OUT/summary.md"
