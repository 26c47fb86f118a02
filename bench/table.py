"""Prints the benchmark JSON lines (bench/train_step.py, bench/sample.py) as markdown tables."""
import json
import sys


def main(path):
  rows = [json.loads(line) for line in open(path) if line.strip()]
  train = [r for r in rows if 'step_ms' in r]
  sample = [r for r in rows if 'seconds_per_batch' in r]
  if train:
    print('| config | device | batch | img/s | step ms | GFLOP/img (arch / XLA) | TFLOP/s | MFU '
          '| peak | compile s |')
    print('|---|---|---|---|---|---|---|---|---|---|')
    for r in train:
      print(f"| {r['config']} | {r['device']} | {r['batch']} | {r['images_per_sec']} | "
            f"{r['step_ms']} | {r['gflop_per_image_arch']} / {r['gflop_per_image_xla']} | "
            f"{r['tflops']} | {r['mfu']:.0%} | {r['matmul_peak_tflops']} | {r['compile_s']} |")
  if sample:
    print('\n| config | device | batch | steps | sampler | faces/s | s per batch |')
    print('|---|---|---|---|---|---|---|')
    for r in sample:
      print(f"| {r['config']} | {r['device']} | {r['batch']} | {r['steps']} | {r['sampler']} | "
            f"{r['images_per_sec']} | {r['seconds_per_batch']} |")


if __name__ == '__main__':
  main(sys.argv[1])
