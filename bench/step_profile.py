"""Where the train step's time goes on this backend: one step traced with jax.profiler, each
kernel's time attributed to the layer it came from (by the op_name metadata XLA keeps) and to
its kind and output shape.

python -m bench.step_profile --config=configs/adm_sr_64_cpu.py [--part grads|step] [--top 25]
                             [--trace_dir DIR] [--json F]

Prints two tables: time by layer kind (convolution, attention, GroupNorm, ...) and pass (forward
or backward), and time by kernel kind and output shape, with the sum of kernel times beside the
step's wall time (kernels that run side by side make the sum exceed it; gaps make it fall
short). On the CPU each kernel is one thunk of XLA's CPU runtime; a matrix product spread over
the thread pool counts once, at its wall time.
"""

import argparse
import collections
import gzip
import json
import os
import re
import tempfile
import time

import jax

from bench import train_step
from idm_jax.runtime import configlib

# (substring of the op_name path, layer kind), first match wins.
LAYER_KINDS = (
  ('_attn', 'attention'),
  ('norm', 'groupnorm'),
  ('conv', 'convolution'),
  ('skip', 'convolution'),
  ('lq_proj', 'convolution'),
  ('emb', 'embedding'),
  ('time_embed', 'embedding'),
  ('apply_gradients', 'optimizer'),
)
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%(\S+) = (\S+) ([\w-]+)\(')


def parse_hlo(text: str) -> dict:
  """name -> (output shape, opcode, called computation, op_name) of each HLO instruction."""
  out = {}
  for line in text.splitlines():
    m = _INSTRUCTION.match(line)
    if m:
      called = re.search(r'calls=%([\w.\-]+)', line)
      op_name = re.search(r'op_name="([^"]*)"', line)
      out[m.group(1)] = (
        m.group(2).split('{')[0],
        m.group(3),
        called and called.group(1),
        op_name.group(1) if op_name else '',
      )
  return out


def kernel_kind(text: str, name: str, instructions: dict) -> str:
  """convolution, dot, reduce, copy/transpose, concatenate or elementwise: the heaviest op a
  kernel (a fusion or a single instruction) holds."""
  _, opcode, called, _ = instructions[name]
  ops = {opcode}
  if called:
    body = re.search(r'\n%' + re.escape(called) + r' [^\n]*\{\n(.*?)\n\}', text, re.S)
    if body:
      ops.update(re.findall(r' = \S+ ([\w-]+)\(', body.group(1)))
  for kind in ('convolution', 'dot', 'reduce-window', 'reduce', 'concatenate'):
    if kind in ops:
      return kind
  # Only data movement: a fusion that also computes (the optimiser's, which read the kernel
  # gradients transposed) is elementwise work with a transposed read, not a transpose.
  if ops & {'transpose', 'copy'} and ops <= _DATA_MOVEMENT:
    return 'copy/transpose'
  return 'elementwise'


_DATA_MOVEMENT = {
  'transpose',
  'copy',
  'bitcast',
  'parameter',
  'reshape',
  'broadcast',
  'constant',
  'slice',
  'fusion',
}


def layer_kind(op_name: str) -> str:
  for key, kind in LAYER_KINDS:
    if key in op_name:
      return kind
  return op_name.rsplit('/', 1)[-1] or 'other'


def kernel_events(trace_dir: str, instructions: dict) -> list:
  path = max(
    (
      os.path.join(r, f)
      for r, _, fs in os.walk(trace_dir)
      for f in fs
      if f.endswith('.trace.json.gz')
    ),
    key=os.path.getmtime,
  )
  with gzip.open(path) as f:
    events = json.load(f)['traceEvents']
  return [e for e in events if e.get('ph') == 'X' and e.get('name') in instructions]


def breakdown(events: list, text: str, instructions: dict) -> dict:
  by_layer, by_kernel = collections.Counter(), collections.Counter()
  for e in events:
    shape, _, _, op_name = instructions[e['name']]
    ms = e['dur'] / 1e3
    by_layer[(layer_kind(op_name), 'backward' if 'transpose(' in op_name else 'forward')] += ms
    by_kernel[(kernel_kind(text, e['name'], instructions), shape)] += ms
  return dict(by_layer=by_layer, by_kernel=by_kernel, kernel_ms=sum(by_layer.values()))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--config', required=True)
  p.add_argument('--part', default='grads', choices=('grads', 'step'))
  p.add_argument('--top', type=int, default=25)
  p.add_argument('--trace_dir', default='', help='keep the trace here (default: a temp folder)')
  p.add_argument('--json', default='', help='append the tables as a JSON line to this file')
  a = p.parse_args()

  config = configlib.load(a.config)
  bs = config.train.batch_size
  trainer, state, batch = train_step.setup(config)
  fn, arg, arg_spec = train_step.part_program(a.part, trainer, batch, trainer.batch_spec(bs))
  compiled = train_step.compile_part(fn, trainer, arg_spec)
  text = compiled.as_text()
  instructions = parse_hlo(text)
  state, _, wall = train_step.time_steps(compiled, state, arg, warmup=2, steps=1)
  trace_dir = a.trace_dir or tempfile.mkdtemp(prefix='step_profile_')
  jax.profiler.start_trace(trace_dir)
  t = time.perf_counter()
  state, metrics = compiled(state, arg)
  jax.block_until_ready((state, metrics))
  traced_wall = time.perf_counter() - t
  jax.profiler.stop_trace()
  tables = breakdown(kernel_events(trace_dir, instructions), text, instructions)

  print(
    f'{os.path.basename(a.config)} part={a.part} batch={bs}: step {wall * 1e3:.0f} ms, '
    f'traced step {traced_wall * 1e3:.0f} ms, sum of kernel times {tables["kernel_ms"]:.0f} ms'
  )
  total = tables['kernel_ms']
  print('\nby layer and pass')
  for (kind, pas), ms in tables['by_layer'].most_common(a.top):
    print(f'  {ms:8.1f} ms {100 * ms / total:5.1f}%  {kind} {pas}')
  print('\nby kernel kind (run once pinned to one core, once on all: what does not speed up with')
  print('more cores is memory-bound or serial)')
  kinds = collections.Counter()
  for (kind, _), ms in tables['by_kernel'].items():
    kinds[kind] += ms
  for kind, ms in kinds.most_common():
    print(f'  {ms:8.1f} ms {100 * ms / total:5.1f}%  {kind}')
  print('\nby kernel kind and output shape')
  for (kind, shape), ms in tables['by_kernel'].most_common(a.top):
    print(f'  {ms:8.1f} ms {100 * ms / total:5.1f}%  {kind} {shape}')
  if a.json:
    train_step.emit(
      dict(
        config=os.path.basename(a.config),
        part=a.part,
        batch=bs,
        step_ms=round(wall * 1e3, 1),
        kernel_ms=round(total, 1),
        by_layer={f'{k} {p_}': round(v, 1) for (k, p_), v in tables['by_layer'].most_common()},
        by_kernel={f'{k} {s}': round(v, 1) for (k, s), v in tables['by_kernel'].most_common(a.top)},
        date=time.strftime('%Y-%m-%d'),
      ),
      a.json,
    )


if __name__ == '__main__':
  main()
