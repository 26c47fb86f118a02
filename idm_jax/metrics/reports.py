"""Metric reports: metrics.json (everything, per image too) and metrics.md (tables of means and
of paired differences with their intervals), from `metrics.scoring.evaluate_images` results."""

from __future__ import annotations

import json
import math
import os

import numpy as np

from idm_jax.storage import files

# name -> (label, higher is better)
METRIC_INFO = {
  'psnr': ('PSNR (RGB, dB)', True),
  'ssim': ('SSIM (RGB)', True),
  'psnr_y': ('PSNR (Y, dB)', True),
  'ssim_y': ('SSIM (Y)', True),
  'lpips': ('LPIPS (VGG)', False),
  'identity': ('Identity (dlib cosine)', True),
  'consistency': ('Consistency PSNR vs LQ (dB)', True),
  'niqe': ('NIQE', False),
  'niqe_ref': ('NIQE of reference set', False),
  'fid': ('FID', False),
  'fd_dlib': ('Frechet distance of dlib face descriptors', False),
  'face_rate': ('Share with a detected face', True),
  'face_rate_ref': ('Share with a detected face, reference set', True),
}


def json_safe(x):
  """inf/nan are not JSON: write them as strings ('inf' PSNR of identical images)."""
  if isinstance(x, float) and not math.isfinite(x):
    return str(x)
  if isinstance(x, dict):
    return {k: json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [json_safe(v) for v in x]
  if isinstance(x, np.generic):
    return json_safe(x.item())
  return x


def metric_label(name: str, entry: dict) -> str:
  label, higher = METRIC_INFO.get(name, (name, None))
  if name.startswith('niqe') and entry.get('upscale', 1) != 1:
    label += f' ({entry["upscale"]}x Lanczos upscale)'
  if name == 'consistency' and 'scale' in entry:
    label += f' (x{entry["scale"]} area downsample when same size)'
  if higher is not None:
    label += ' ↑' if higher else ' ↓'
  return label


def format_entry(entry: dict) -> str:
  if entry.get('mean') is None:
    return f'n/a: {entry.get("reason", "unavailable")}'
  text = f'{entry["mean"]:.4f}'
  if entry.get('fallbacks'):
    text += f' ({entry["fallbacks"]} faces not detected; whole image used)'
  return text


def table(header: list[str], rows: list[list[str]]) -> list[str]:
  """A markdown table's lines: the header, the rule, one line per row (cells as given)."""
  line = lambda cells: '|' + '|'.join(f' {c} ' if c else ' ' for c in cells) + '|'  # noqa: E731
  return [line(header), '|' + ' --- |' * len(header)] + [line(row) for row in rows]


def format_delta(d: dict) -> str:
  """'+0.5600 [+0.3100, +0.8000]', bold when the interval excludes zero."""
  text = f'{d["mean"]:+.4f} [{d["low"]:+.4f}, {d["high"]:+.4f}]'
  return f'**{text}**' if d['excludes_zero'] else text


def _delta_table(rows: dict[str, dict]) -> list[str]:
  """Differences against the reference row, with intervals; [] if no row has any."""
  rows = {k: v for k, v in rows.items() if v.get('delta', {}).get('metrics')}
  if not rows:
    return []
  names: list[str] = []
  for result in rows.values():
    names += [n for n in result['delta']['metrics'] if n not in names]
  first = next(iter(rows.values()))
  ref = first['delta']['reference']
  conf = next(iter(first['delta']['metrics'].values()))['confidence']
  header = [''] + [metric_label(n, first['metrics'].get(n, {})) for n in names]
  cells = [
    [row]
    + [
      format_delta(result['delta']['metrics'][n]) if n in result['delta']['metrics'] else 'n/a'
      for n in names
    ]
    for row, result in rows.items()
  ]
  return [
    '',
    f'Per-image difference against {ref} (mean, paired-bootstrap {conf:.0%} '
    'interval; bold: the interval excludes 0):',
    '',
  ] + table(header, cells)


def _single_table(result: dict) -> list[str]:
  return table(
    ['metric', 'value'],
    [[metric_label(name, entry), format_entry(entry)] for name, entry in result['metrics'].items()],
  )


def _multi_table(rows: dict[str, dict]) -> list[str]:
  """One row per result, one column per metric (means); reasons for n/a listed below."""
  names: list[str] = []
  entries: dict[str, dict] = {}
  for result in rows.values():
    for name, entry in result['metrics'].items():
      if name not in names:
        names.append(name)
      if entry.get('mean') is not None or name not in entries:
        entries[name] = entry  # a labelled (available) entry, for upscale/scale in the header
  reasons, body = {}, []
  for row, result in rows.items():
    cells = [row]
    for n in names:
      entry = result['metrics'].get(n)
      if entry is None or entry.get('mean') is None:
        cells.append('n/a')
        if entry is not None:
          reasons.setdefault(n, entry.get('reason', 'unavailable'))
      else:
        cells.append(f'{entry["mean"]:.4f}')
    body.append(cells)
  lines = table([''] + [metric_label(n, entries[n]) for n in names], body)
  if reasons:
    lines += [''] + [f'- {metric_label(n, entries[n])} n/a: {r}' for n, r in reasons.items()]
  return lines


def write_report(metrics: dict, out_dir: str | os.PathLike, title: str) -> None:
  """Writes metrics.json (everything, per image too) and metrics.md (a table of means) into
  `out_dir`, a local folder or a gs:// one, each file whole or not at all (files.write_text).

  `metrics` is one `evaluate_images` result, or {row name: result} for a table comparing
  several (e.g. the LQ input and restorations at several step counts).
  """
  lines = [f'# {title}', '']
  if 'metrics' in metrics:
    if 'num_images' in metrics:
      ref = (
        f' ({metrics["num_ref_images"]} reference images)' if 'num_ref_images' in metrics else ''
      )
      if 'ref_resized_to' in metrics:
        ref += f', resized to {metrics["ref_resized_to"]} like the samples'
      lines += [f'{metrics["num_images"]} images{ref}.', '']
    lines += _single_table(metrics)
    lines += _delta_table({'this evaluation': metrics})
  else:
    bad = [k for k, v in metrics.items() if not isinstance(v, dict) or 'metrics' not in v]
    if bad:
      raise ValueError(
        f'write_report: expected an evaluate_images result or a dict of them; '
        f'entries {bad[:3]} are neither'
      )
    lines += _multi_table(metrics)
    lines += _delta_table(metrics)
  # Both tables are built before anything is written: a bad `metrics` leaves no half report.
  files.write_text(
    files.join(out_dir, 'metrics.json'),
    json.dumps(json_safe({'title': title, **metrics}), indent=1),
  )
  files.write_text(files.join(out_dir, 'metrics.md'), '\n'.join(lines) + '\n')
