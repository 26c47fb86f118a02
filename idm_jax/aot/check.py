"""Does a config run on a Cloud TPU topology: compile the programs its config.mode runs for that
slice's abstract devices, print their per-chip numbers, and say fits, does not fit, or cannot run
(a batch that does not divide the mesh, an op or attention kind TPUs lack, a program XLA cannot
place on the slice: the field to change, as a real run there would fail)."""

from __future__ import annotations

import time

from idm_jax.aot import chips
from idm_jax.aot import programs
from idm_jax.aot import search
from idm_jax.aot.chips import Chip
from idm_jax.aot.programs import gib
from idm_jax.runtime import configlib
from idm_jax.runtime import parallel


def run(
  config, topology: str, num_slices: int = 1, *, sample: bool = True, max_batch: bool = False
):
  """Compiles for the topology; returns (report, `verdict`'s line and exit status). Raises naming
  the field that cannot work there (the Trainer's or the mesh's ValueError, as a real run
  would raise it)."""
  configlib.validate(config)
  mode = config.get('mode', 'train')
  if max_batch and mode not in programs.TRAINS:
    raise ValueError(
      f'--max_batch searches train.batch_size, and config.mode={mode} runs no '
      f'train step; its batch is {programs.restorer_job(config)[0]}.batch_size '
      'per host'
    )
  devices = chips.topology_devices(topology, num_slices)
  chip = chips.chip_of(devices)
  mesh = parallel.make_mesh(config.mesh, devices)
  compiled = []
  if mode in programs.TRAINS:
    compiled.append(programs.compile_train_step(config, mesh))
    if sample:
      grid = configlib.sample_settings(config.sample, steps=config.train.vis_steps)
      compiled.append(
        programs.compile_sampler(
          config, mesh, grid, config.train.num_vis, 'sampler (training grid)'
        )
      )
  if mode in programs.RESTORES and (sample or mode not in programs.TRAINS):
    batch_field, settings = programs.restorer_job(config)
    hosts = parallel.process_count_of(mesh)
    compiled.append(
      programs.compile_restorer(
        config,
        list(mesh.devices.flat),
        settings,
        config[batch_field].batch_size,
        f'restorer ({batch_field}.batch_size per host, {hosts} hosts)',
      )
    )
  found = None
  if max_batch:
    t0 = time.perf_counter()
    best, tried = search.max_batch_per_chip(config, mesh, chip, known=compiled[0])
    found = (best, time.perf_counter() - t0, tried)
  return report(topology, num_slices, mesh, chip, compiled, found), verdict(compiled, chip)


def report(topology: str, num_slices: int, mesh, chip: Chip, compiled, max_batch=None) -> str:
  """The table the check prints (markdown, so docs/TPU.md can take it as it is); `max_batch`,
  the search's (best, seconds, Programs), adds its lines."""
  lines = [
    f'topology {chips.topology_name(topology)} x {num_slices} slice(s): {mesh.size} x '
    f'{chip.name} ({gib(chip.hbm_bytes)} HBM, {chip.peak_bf16_flops / 1e12:.0f} TFLOP/s '
    f'bf16 peak per chip); mesh data={mesh.shape["data"]} x fsdp={mesh.shape["fsdp"]}',
    '',
    '| program | global batch | arguments | temporaries | outputs | total / HBM | '
    'fits | TFLOP per chip | collectives (count, bytes per chip) | compile |',
    '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |',
  ]
  for p in compiled:
    if p.error:
      mark = '**cannot run**' if p.cannot_run else '**no**'
      lines.append(
        f'| {p.name} | {p.batch} | | | | | {mark}: {p.error} | | | {p.compile_s:.0f} s |'
      )
      continue
    m = p.memory
    fits = 'yes' if programs.fits(p, chip) else '**no**'
    lines.append(
      f'| {p.name} | {p.batch} | {gib(m["arguments"])} | {gib(m["temporaries"])} | '
      f'{gib(m["outputs"])} | {gib(m["total"])} / {gib(chip.hbm_bytes)} '
      f'({100 * m["total"] / chip.hbm_bytes:.0f}%) | {fits} | '
      f'{p.flops / 1e12:.3g} | {_collectives_text(p.collectives)} | {p.compile_s:.0f} s |'
    )
  step = next((p for p in compiled if p.name == 'train step' and not p.error), None)
  if step is not None:
    lines.append('')
    lines.append(
      f'train state per chip (params, EMA, Adam moments; from the shardings): '
      f'{gib(step.state_bytes)}'
    )
    lines.append(
      'projected training throughput (XLA FLOPs of one step at a given MFU of the '
      'bf16 peak; a projection, not a measurement): '
      + ', '.join(
        f'{mfu:.0%} MFU {programs.images_per_second(step, chip, mfu):.1f} img/s'
        for mfu in (0.4, 0.6)
      )
    )
  if max_batch is not None:
    lines.extend(search.report_lines(max_batch, mesh, chip, compiled))
  return '\n'.join(lines)


def verdict(compiled, chip: Chip) -> tuple[str, int]:
  """(the verdict line, the exit status): 0 fits, 1 does not fit in HBM, 2 cannot run."""
  blocked = [p for p in compiled if p.cannot_run]
  if blocked:
    return 'does not run: ' + '; '.join(f'{p.name}: {p.error}' for p in blocked), 2
  if all(programs.fits(p, chip) for p in compiled):
    return 'fits', 0
  return (
    'does not fit (lower train.batch_size or sample sizes, raise mesh.fsdp, or set '
    f'model.remat=True; a train batch of {search.TILE_ROWS} or a multiple of it per chip '
    'can fit where a smaller one does not: --max_batch searches those)'
  ), 1


def _collectives_text(c: dict) -> str:
  if not c:
    return 'none'
  return ', '.join(f'{k} {n} ({v / 2**20:.1f} MiB)' for k, (n, v) in sorted(c.items()))
