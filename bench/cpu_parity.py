"""The train step on this CPU against PyTorch's, in one run: our step
(`python -m bench.train_step`) and, when the anchor is present, guided-diffusion's
`SuperResModel` step in the same layout (../shared/tools/torch_cpu_anchor.py), one after the
other, then the ratio (PyTorch's step time / ours: above 1, ours is faster).

python -m bench.cpu_parity [--config=configs/adm_sr_64_cpu.py] [--steps 5] [--rounds 2]
                           [--torch_python .torch-venv/bin/python] [--anchor_path .anchor]
                           [--anchor_script ../shared/tools/torch_cpu_anchor.py] [--json F]

The anchor is PyTorch in a virtual environment of its own plus the reference's package
(guided_diffusion/, from github openai/guided-diffusion) in an ignored folder; PyTorch is never a
dependency of this project:
  python3 -m venv .torch-venv && .torch-venv/bin/pip install torch numpy
  mkdir -p .anchor && cp -r PATH/TO/guided-diffusion/guided_diffusion .anchor/
Without it, this says so and times ours alone. Run it on idle cores: anything else running
meanwhile moves both numbers. With --rounds 2 the two alternate (ours, PyTorch, ours,
PyTorch) and each side's best round is kept, so a drift in the machine's speed shows as a
spread rather than as a difference; each round's own ratio is kept too (`ratio_rounds`), and
from three rounds on their mean with a bootstrap 95% interval (`ratio_rounds_mean_95`). Both
sides run under the driver's allocator (TCMalloc where installed; IDM_JAX_MALLOC=system:
glibc's), which the summary records as `malloc`.
"""

import argparse
import json
import os
import subprocess
import sys

from bench import train_step
from idm_jax.metrics import bootstrap
from idm_jax.runtime import allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _last_json(stdout: str) -> dict:
  lines = [line for line in stdout.splitlines() if line.startswith('{')]
  if not lines:
    raise RuntimeError('no result line in:\n' + stdout[-2000:])
  return json.loads(lines[-1])


def _run(cmd, env=None) -> dict:
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
  if out.returncode != 0:
    raise RuntimeError(f'{" ".join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}')
  return _last_json(out.stdout)


def mean_interval(values: list) -> list:
  """The mean of `values` and its bootstrap 95% interval, [mean, low, high] (the project's
  `bootstrap.paired_interval`, against zero): over rounds, each round's ratio being paired (ours
  and PyTorch's, one after the other), so a drift of the machine's speed between rounds moves
  both sides of a ratio alike."""
  r = bootstrap.paired_interval(values, [0.0] * len(values))
  return [round(r['mean'], 3), round(r['low'], 3), round(r['high'], 3)]


def ours(config: str, steps: int) -> dict:
  return _run(
    [
      sys.executable,
      '-m',
      'bench.train_step',
      f'--config={config}',
      f'--steps={steps}',
      '--warmup=2',
    ]
  )


def anchor_missing(torch_python: str, anchor_path: str, anchor_script: str) -> str:
  """Why the anchor cannot run, or '' when it can."""
  for what, p in (
    ('PyTorch environment', torch_python),
    ('anchor script', anchor_script),
    ('guided_diffusion package', os.path.join(anchor_path, 'guided_diffusion')),
  ):
    if not os.path.exists(p):
      return f'no {what} at {p}'
  return ''


def pytorch(
  torch_python: str, anchor_path: str, anchor_script: str, resolution: int, batch: int, steps: int
) -> dict:
  env = dict(os.environ, PYTHONPATH=os.path.abspath(anchor_path))
  return _run([torch_python, anchor_script, str(resolution), str(batch), str(steps)], env=env)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--config', default=os.path.join('configs', 'adm_sr_64_cpu.py'))
  p.add_argument('--steps', type=int, default=5)
  p.add_argument('--rounds', type=int, default=1)
  p.add_argument('--torch_python', default=os.path.join('.torch-venv', 'bin', 'python'))
  p.add_argument('--anchor_path', default='.anchor')
  p.add_argument(
    '--anchor_script', default=os.path.join('..', 'shared', 'tools', 'torch_cpu_anchor.py')
  )
  p.add_argument('--json', default='', help='append the summary as a JSON line to this file')
  a = p.parse_args()

  from idm_jax.runtime import configlib  # pylint: disable=import-outside-toplevel  (keeps --help fast)

  config = configlib.load(os.path.join(ROOT, a.config))
  missing = anchor_missing(
    *(os.path.join(ROOT, x) for x in (a.torch_python, a.anchor_path, a.anchor_script))
  )
  if missing:
    print(f'anchor not found ({missing}): timing ours alone', flush=True)
  jax_runs, torch_runs = [], []
  for _ in range(a.rounds):
    jax_runs.append(ours(a.config, a.steps))
    print(json.dumps(jax_runs[-1]), flush=True)
    if not missing:
      torch_runs.append(
        pytorch(
          *(os.path.join(ROOT, x) for x in (a.torch_python, a.anchor_path, a.anchor_script)),
          config.data.resolution,
          config.train.batch_size,
          a.steps,
        )
      )
      print(json.dumps(torch_runs[-1]), flush=True)
  jax_s = min(r['step_ms'] for r in jax_runs) / 1e3
  summary = dict(
    config=os.path.basename(a.config),
    batch=config.train.batch_size,
    resolution=config.data.resolution,
    dtype=config.model.dtype,
    malloc=allocator.in_use(),
    jax_step_s=round(jax_s, 3),
    jax_rounds_s=[round(r['step_ms'] / 1e3, 3) for r in jax_runs],
  )
  if torch_runs:
    torch_s = min(r['step_s'] for r in torch_runs)
    by_round = [t['step_s'] / (j['step_ms'] / 1e3) for j, t in zip(jax_runs, torch_runs)]
    summary.update(
      torch=torch_runs[0]['torch'],
      torch_step_s=torch_s,
      torch_rounds_s=[r['step_s'] for r in torch_runs],
      ratio=round(torch_s / jax_s, 3),
      ratio_rounds=[round(r, 3) for r in by_round],
    )
    if len(by_round) >= 3:
      summary.update(ratio_rounds_mean_95=mean_interval(by_round))
  else:
    summary.update(anchor=f'not found: {missing}')
  train_step.emit(summary, a.json)


if __name__ == '__main__':
  # Both sides run under the allocator the driver uses (TCMalloc where installed, or
  # IDM_JAX_MALLOC=system for glibc's): the anchor inherits this process's environment.
  allocator.use_tcmalloc()
  main()
