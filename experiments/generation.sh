#!/usr/bin/env bash
# The "beyond" experiment (docs/RESULTS.md): a trained restoration model cleans the training
# faces (the worst clean.fraction by NIQE); two unconditional generators with the same config,
# steps and seed train on the original and on the cleaned faces; each writes its samples, which
# are scored against the real faces (FID with INCEPTION=weights.npz; offline always: Frechet
# distance of dlib face descriptors, face detection rate, NIQE).
#   RESTORER=workdirs/quality bash experiments/generation.sh [WORKDIR]
# CONFIG defaults to the CPU-scale configs/generation_32_cpu.py; on an accelerator use
# CONFIG=configs/ffhq_generation.py (celeba_128 scale). Every stage resumes when rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-workdirs/generation}
RESTORER=${RESTORER:?set RESTORER to a trained restoration workdir, as experiments/quality.sh writes}
DATA=${DATA:-../shared/data/celeba_hq128_dev}
NIQE=${NIQE:-../shared/data/niqe_pris_params.npz}
CONFIG=${CONFIG:-configs/generation_32_cpu.py}
VAL=${VAL:-100}                     # the last VAL files of DATA are held out of training
read -r -a EXTRA <<< "${EXTRA:-}"   # more --config.x=y overrides for the generators
read -r -a CLEAN_EXTRA <<< "${CLEAN_EXTRA:-}"   # ... and for the cleaning
export PYTHONUNBUFFERED=1
fid=()
if [ -n "${INCEPTION:-}" ]; then fid=(--inception_weights "$INCEPTION"); fi

# 1. Clean the training split (the first 800 faces) with the restoration model's EMA params.
python3 -m idm_jax.main --config=configs/celeba_128.py --workdir="$RESTORER" --config.mode=clean \
  --config.data.dir="$DATA" --config.data.num_val="$VAL" --config.eval.niqe_params="$NIQE" \
  --config.clean.out_dir="$WORK/cleaned" "${CLEAN_EXTRA[@]}"

# 2. The same generator on each version: same config, steps and seed.
for version in original cleaned; do
  if [ "$version" = original ]; then data=(--config.data.dir="$DATA" --config.data.num_val="$VAL")
  else data=(--config.data.dir="$WORK/cleaned/images" --config.data.num_val=0); fi
  gen=(--config="$CONFIG" --workdir="$WORK/gen_$version" --config.data.source=folder "${data[@]}"
       "${EXTRA[@]}")
  python3 -m idm_jax.main "${gen[@]}"
  python3 -m idm_jax.main "${gen[@]}" --config.mode=generate
done

# 3. Scores: both sample sets against all the real faces; the cleaning summary from its manifest.
for version in original cleaned; do
  # NIQE needs 192 px: upscale the samples (and the references, resized to their size) enough.
  up=$(python3 -c "import sys; from PIL import Image; from idm_jax.metrics import niqe
print(niqe.upscale_for(min(Image.open(sys.argv[1]).size)))" \
       "$WORK/gen_$version/generated/000000.png")
  python3 -m idm_jax.score --fid --pred "$WORK/gen_$version/generated" --ref "$DATA" \
    --niqe_params "$NIQE" --niqe_upscale "$up" "${fid[@]}" \
    --out "$WORK/eval_$version" --title "Samples of the generator trained on $version faces"
done
python3 - "$WORK" <<'PY'
import json, sys
work = sys.argv[1]
m = json.load(open(f'{work}/cleaned/manifest.json'))
print(f"cleaned {m['counts']}; NIQE of the cleaned records: {m.get('cleaned_niqe')}")
rows = {v: json.load(open(f'{work}/eval_{v}/metrics.json'))['metrics'] for v in ('original', 'cleaned')}
keys = ['fid', 'fd_dlib', 'face_rate', 'niqe']
print('| generator trained on | ' + ' | '.join(keys) + ' |')
print('| --- |' + ' --- |' * len(keys))
for v, met in rows.items():
  cells = ['n/a' if met[k]['mean'] is None else f"{met[k]['mean']:.4f}" for k in keys]
  print(f'| {v} | ' + ' | '.join(cells) + ' |')
PY
