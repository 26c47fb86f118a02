#!/usr/bin/env bash
# One lent-GPU call that does both GPU jobs inside a ~10-minute slot:
#   phase A (concurrent): train configs/celeba_128.py for TRAIN_SECONDS (issue 5's quality run)
#     while, beside it, the benchmark programs compile into a shared persistent XLA cache and the
#     accelerator tests run. Nothing is timed in phase A.
#   phase B (alone on the GPU): restore the fixed validation set at 10 and 25 steps, then time
#     the benchmarks (bench/gpu_check.sh), whose programs now load from the cache.
#   OUT=dir TRAIN_SECONDS=380 bash bench/gpu_session.sh
# Brings back (under OUT): bench.jsonl, samples_lq_hq.tar, samples_restored.tar, logs.tar.gz.
# Identity and NIQE are computed afterwards where dlib and the NIQE file exist (see experiments/quality.sh).
# Dry run on a CPU: TRAIN_CONFIG=... BENCH_CONFIGS="configs/test.py" SAMPLE_CONFIG=configs/test.py
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT_DIR=${OUT:-gpu_out}
TRAIN_SECONDS=${TRAIN_SECONDS:-380}
BUDGET=${BUDGET:-570}   # seconds for the whole script; each phase-B step gets what is left
DATA=${DATA:-.devdata/celeba_hq128_dev}
WORK=${WORK:-/tmp/quality}
WORKERS=${WORKERS:-8}
TRAIN_CONFIG=${TRAIN_CONFIG:-configs/celeba_128.py}
BENCH_CONFIGS=${BENCH_CONFIGS:-"configs/adm_sr_256.py configs/adm_sr_512.py configs/ffhq.py"}
SAMPLE_CONFIG=${SAMPLE_CONFIG:-configs/ffhq.py}
read -r -a EXTRA <<< "${EXTRA:-}"
mkdir -p "$OUT_DIR" "$WORK" /tmp/logs
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jaxcache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
T0=$SECONDS
left() { echo $(( BUDGET - (SECONDS - T0) )); }
say() { echo "[$(( SECONDS - T0 ))s] $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
python3 -c "import jax, flax, optax, orbax.checkpoint as o, grain; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"

common=(--config="$TRAIN_CONFIG" --workdir="$WORK" --config.data.dir="$DATA"
        --config.data.num_workers="$WORKERS" --config.eval.steps='(10,25)' "${EXTRA[@]}")
say "phase A: training for ${TRAIN_SECONDS}s, compiling benchmarks and running GPU tests beside it"
timeout -s TERM "$TRAIN_SECONDS" python3 -m idm_jax.main "${common[@]}" \
  --config.train.num_steps=1000000 --config.train.sample_every=1000000 \
  --config.train.ckpt_every=2000 > /tmp/logs/train.log 2>&1 &
train_pid=$!
# Each in its own process group (setsid), so that stopping it stops every process it started:
# a stray benchmark left on the card would slow the timings of phase B.
export BENCH_CONFIGS SAMPLE_CONFIG
setsid bash -c 'for c in $BENCH_CONFIGS; do
    python3 -m bench.train_step --config="$c" --steps 1 --warmup 1
  done
  python3 -m bench.sample --config="$SAMPLE_CONFIG" --steps 25 --batch 16 --repeats 1' \
  > /tmp/logs/warm.log 2>&1 &
warm_pid=$!
setsid python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py > /tmp/logs/tests.log 2>&1 &
tests_pid=$!

wait "$train_pid"; rc=$?
say "training exited with $rc (124 = stopped at the budget, checkpoint saved)"
grep -E "step|SIGTERM|Error|error" /tmp/logs/train.log | tail -5
tail -2 "$WORK/metrics.jsonl" 2>/dev/null

say "phase B: restoring the validation set"
timeout -s TERM $(( $(left) - 60 )) python3 -m idm_jax.main "${common[@]}" --config.mode=sample \
  > /tmp/logs/sample.log 2>&1 || say "sampling failed: $(tail -3 /tmp/logs/sample.log)"
S=$(ls -d "$WORK"/samples/step_* 2>/dev/null | tail -1)
if [ -n "$S" ]; then
  say "samples in $S"
  tar -cf "$OUT_DIR/samples_lq_hq.tar" -C "$S" lq hq grid.png
  mapfile -t restored < <(cd "$S" && ls -d restored_*)
  tar -cf "$OUT_DIR/samples_restored.tar" -C "$S" "${restored[@]}"
fi

# The benchmarks must have the GPU alone: wait for the compile chain and tests (bounded).
for pid in $warm_pid $tests_pid; do
  while kill -0 "$pid" 2>/dev/null && [ "$(left)" -gt 90 ]; do sleep 2; done
  kill -TERM -- "-$pid" 2>/dev/null && say "stopped process group $pid (out of time)"
done
sleep 2
nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader 2>/dev/null \
  | sed 's/^/still on the GPU: /'
tail -3 /tmp/logs/tests.log
say "phase B: timing the benchmarks (cached programs)"
for c in $BENCH_CONFIGS; do
  [ "$(left)" -gt 25 ] || { say "no time for $c"; continue; }
  timeout -s TERM $(( $(left) - 15 )) python3 -m bench.train_step --config="$c" \
    --json "$OUT_DIR/bench.jsonl" 2>&1 | grep -v "^W0\|^I0" | tail -2
done
if [ "$(left)" -gt 25 ]; then
  timeout -s TERM $(( $(left) - 15 )) python3 -m bench.sample --config="$SAMPLE_CONFIG" \
    --steps 25 --batch 16 --json "$OUT_DIR/bench.jsonl" 2>&1 | tail -1
fi
cp "$WORK"/metrics.jsonl /tmp/logs/ 2>/dev/null
tar -czf "$OUT_DIR/logs.tar.gz" -C /tmp logs
[ -f "$OUT_DIR/bench.jsonl" ] && python3 bench/table.py "$OUT_DIR/bench.jsonl"
say "done"
