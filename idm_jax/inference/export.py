"""Export a trained model as ONE self-describing file: its config and its EMA params.

    python -m idm_jax.inference.export --workdir W --out model.msgpack

The file is flax.serialization's msgpack of
    {'format': 'idm_jax/1', 'config': <config JSON>, 'params': <params state dict>}
(no pickle: loading it cannot run code). `load_exported(path) -> (config, params)` reads it back;
`inference.load` accepts such a file as well as a training workdir.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from flax import serialization
import jax
import ml_collections
import numpy as np

from idm_jax.runtime import cli
from idm_jax.runtime import configlib
from idm_jax.storage import files
from idm_jax.training import checkpoints

FORMAT = 'idm_jax/1'


class ExportError(ValueError):
  """The file is not a (readable) idm_jax export; the message names the file."""


def to_bytes(config: ml_collections.ConfigDict, params) -> bytes:
  """The export's bytes: msgpack of format tag, config JSON and params (as host numpy)."""
  state = serialization.to_state_dict(jax.device_get(params))
  state = jax.tree.map(np.asarray, state)
  return serialization.msgpack_serialize(
    {'format': FORMAT, 'config': configlib.to_json(config), 'params': state}
  )


def save_exported(path: str, config: ml_collections.ConfigDict, params) -> int:
  """Writes config + params to `path` (local or gs://) atomically; returns its size in bytes."""
  data = to_bytes(config, params)
  files.write_atomic(path, data)
  return len(data)


def load_exported(path: str):
  """(config, params) from a file written by save_exported; params are numpy arrays.

  Raises FileNotFoundError if missing and ExportError (naming the file and the problem) if it is
  not an idm_jax export, is truncated/corrupt, or has another format version.
  """
  if not files.isfile(path):
    raise FileNotFoundError(f'{path}: no such file')
  data = files.read_bytes(path)
  if not data:
    raise ExportError(f'{path}: empty file, not an idm_jax model export')
  try:
    obj = serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises several types for truncated/garbage input.
    raise ExportError(
      f'{path}: not an idm_jax model export (corrupt, truncated or another '
      f'format: {type(e).__name__}: {e})'
    ) from e
  if not isinstance(obj, dict) or 'format' not in obj:
    raise ExportError(f'{path}: not an idm_jax model export (no format tag)')
  fmt = obj['format']
  if fmt != FORMAT:
    raise ExportError(f'{path}: format {fmt!r} is not supported; this version reads {FORMAT!r}')
  if not isinstance(obj.get('config'), str) or not isinstance(obj.get('params'), dict):
    raise ExportError(f'{path}: the export lacks its config or params')
  try:
    config = configlib.from_json(obj['config'])
  except ValueError as e:
    raise ExportError(f'{path}: the stored config is not valid JSON: {e}') from e
  return config, obj['params']


def export(workdir: str, out: str, *, force: bool = False) -> int:
  """Exports the latest checkpoint's EMA params in `workdir` with its config to `out`; returns
  the file's size in bytes. Within a job of several processes every one must call it (they
  all read the checkpoint); process 0 writes the file."""
  # Agreed (there if any process sees it), so every process refuses or none does; the
  # agreement also has every process check before process 0 writes the file.
  if checkpoints.agreed_exists(out) and not force:
    raise FileExistsError(f'{out} exists; pass --force to overwrite it')
  config, params, _ = checkpoints.load_for_inference(workdir)
  data = to_bytes(config, params)
  if jax.process_index() == 0:
    files.write_atomic(out, data)
  return len(data)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = cli.ArgumentParser(
    prog='python -m idm_jax.inference.export',
    description="Write a workdir's latest EMA params and config as one .msgpack file.",
  )
  parser.add_argument('--workdir', required=True, help='training workdir (with checkpoints/)')
  parser.add_argument('--out', required=True, help='output file, e.g. model.msgpack')
  parser.add_argument('--force', action='store_true', help='overwrite --out if it exists')
  args = parser.parse_args(argv)
  try:
    size = export(args.workdir, args.out, force=args.force)
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    return cli.fail(e)
  print(f'wrote {args.out} ({size / 2**20:.1f} MiB)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
