#!/usr/bin/env bash
# Real-face quality (docs/RESULTS.md): train configs/celeba_128.py for a time budget on one GPU,
# restore the fixed GFPGAN-degraded validation set (the last 100 faces) at 10 and 25 steps, and
# evaluate PSNR/SSIM/identity/NIQE for the LQ input and both step counts.
#   TRAIN_SECONDS=600 bash experiments/quality.sh [WORKDIR]
# Needs ../shared/data (or DATA=... and NIQE=...). Without dlib or the NIQE file on the GPU
# machine, it stops after restoring and prints the evaluate commands to run where they exist.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
WORK=${1:-workdirs/quality}
DATA=${DATA:-../shared/data/celeba_hq128_dev}
NIQE=${NIQE:-../shared/data/niqe_pris_params.npz}
TRAIN_SECONDS=${TRAIN_SECONDS:-600}
WORKERS=${WORKERS:-8}
CONFIG=${CONFIG:-configs/celeba_128.py}
read -r -a EXTRA <<< "${EXTRA:-}"   # more --config.x=y overrides
export PYTHONUNBUFFERED=1
common=(--config="$CONFIG" --workdir="$WORK" --config.data.dir="$DATA"
        --config.data.num_workers="$WORKERS" --config.eval.steps='(10,25)' "${EXTRA[@]}")
# SIGTERM at the budget: the trainer saves a checkpoint and exits cleanly.
timeout -s TERM "$TRAIN_SECONDS" python3 -m idm_jax.main "${common[@]}" \
  --config.train.num_steps=1000000 --config.train.sample_every=1000000 \
  --config.train.ckpt_every=1000000
rc=$?
if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ]; then echo "training failed ($rc)"; exit "$rc"; fi
if python3 -c "import dlib" 2>/dev/null && [ -f "$NIQE" ]; then
  python3 -m idm_jax.main "${common[@]}" --config.mode=evaluate --config.eval.niqe_params="$NIQE"
  cat "$WORK"/eval/step_*/metrics.md
else
  python3 -m idm_jax.main "${common[@]}" --config.mode=sample
  S=$(ls -d "$WORK"/samples/step_* | tail -1)
  echo "restored into $S; evaluate where dlib and $NIQE exist:"
  for pred in lq restored_10steps restored_25steps; do
    echo "python3 -m idm_jax.score --pred $S/$pred --gt $S/hq --lq $S/lq --niqe_params $NIQE --niqe_upscale 2 --out $S/eval_$pred"
  done
fi
