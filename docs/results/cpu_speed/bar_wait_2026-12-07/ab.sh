#!/bin/bash
# A/B of the training loop's one-step-in-flight wait: configs/demo.py, 300 steps, train mode only,
# old loop (worktree at e3da9b9) and new (main), alternating, pinned to core 1 (core 0 runs Phase 2).
cd /work/main
for i in 1 2; do
  for tree in /work/p2tree /work/main; do
    rm -rf /tmp/ab/bar_w
    PYTHONPATH=$tree JAX_PLATFORMS=cpu taskset -c 1 .venv/bin/python -m idm_jax.main --config=$tree/configs/demo.py --workdir=/tmp/ab/bar_w \
      --config.mode=train --config.train.num_steps=300 --config.train.sample_every=1000 --config.train.ckpt_every=1000 > /tmp/ab/bar_log 2>&1
    python3 - "$tree" <<'PY'
import json, sys
rows = [json.loads(l) for l in open('/tmp/ab/bar_w/metrics.jsonl') if 'images_per_sec' in l]
ips = [r['images_per_sec'] for r in rows if r['step'] > 25]
print(sys.argv[1], 'steps', rows[-1]['step'], 'img/s after the first log', round(sum(ips) / len(ips), 1), [round(x, 1) for x in ips])
PY
  done
done
