"""Prints the benchmark JSON lines (bench/train_step.py, bench/sample.py) as markdown tables."""

import json
import sys


def main(path):
  rows = [json.loads(line) for line in open(path) if line.strip()]
  train = [r for r in rows if 'step_ms' in r]
  sample = [r for r in rows if 'seconds_per_batch' in r]
  update = [r for r in rows if 'update_ms' in r]
  if train:
    print(
      '| config | part | device | batch | img/s | step ms | GFLOP/img (arch / XLA) | TFLOP/s '
      '| MFU | peak | kernels | compile s |'
    )
    print('|---|---|---|---|---|---|---|---|---|---|---|---|')
    for r in train:
      print(
        f'| {r["config"]} | {r.get("part", "step")} | {r["device"]} | {r["batch"]} | '
        f'{r["images_per_sec"]} | {r["step_ms"]} | {r["gflop_per_image_arch"]} / '
        f'{r["gflop_per_image_xla"]} | {r["tflops"]} | {r["mfu"]:.0%} | '
        f'{r["matmul_peak_tflops"]} | {r.get("kernels", "")} | {r["compile_s"]} |'
      )
  if update:
    print('\n| config | update layout | device | leaves | M params | ms | kernels | compile s |')
    print('|---|---|---|---|---|---|---|---|')
    for r in update:
      print(
        f'| {r["config"]} | {r["update"]} | {r["device"]} | {r["leaves"]} | {r["params_m"]} | '
        f'{r["update_ms"]} | {r["kernels"]} | {r["compile_s"]} |'
      )
  if sample:
    print('\n| config | device | batch | steps | sampler | faces/s | s per batch |')
    print('|---|---|---|---|---|---|---|')
    for r in sample:
      print(
        f'| {r["config"]} | {r["device"]} | {r["batch"]} | {r["steps"]} | {r["sampler"]} | '
        f'{r["images_per_sec"]} | {r["seconds_per_batch"]} |'
      )


if __name__ == '__main__':
  main(sys.argv[1])
