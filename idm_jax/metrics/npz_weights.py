"""Flax variables <-> flat .npz files ('collection/module/.../leaf' keys), checked on load.

LPIPS and FID weights are converted once from PyTorch files (see convert_weights.py) and then
loaded with numpy alone: no pickle, no torch. Loading checks every key and shape against the
model's own variable tree, so a wrong or truncated file fails with the offending key named
instead of producing a plausible-looking wrong number.
"""

from __future__ import annotations

import io
import os
from typing import Any, Mapping

import numpy as np

from idm_jax.runtime import tree_shapes
from idm_jax.storage import files


def flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'params': {'a': {'kernel': x}}} -> {'params/a/kernel': x}."""
  out = {}
  for k, v in tree.items():
    key = f'{prefix}/{k}' if prefix else k
    if isinstance(v, Mapping):
      out.update(flatten(v, key))
    else:
      out[key] = v
  return out


def unflatten(flat: Mapping[str, Any]) -> dict:
  """Inverse of `flatten`."""
  tree: dict = {}
  for key, v in flat.items():
    node = tree
    *parents, leaf = key.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def load_variables(path: str | os.PathLike, expected: Mapping[str, Any], what: str) -> dict:
  """Loads an .npz of flat variables and checks it against `expected` (a variable tree of
  arrays or ShapeDtypeStructs, e.g. from jax.eval_shape(model.init, ...)).

  Raises FileNotFoundError / ValueError naming the file and the first problems found.
  """
  path = os.fspath(path)
  if not files.isfile(path):
    raise FileNotFoundError(f'{what} weights file {path!r} does not exist')
  try:
    with np.load(io.BytesIO(files.read_bytes(path)), allow_pickle=False) as d:
      flat = {k: np.asarray(d[k]) for k in d.files}
  except Exception as e:  # zip/npy errors come in many types
    raise ValueError(f'{what} weights file {path!r} is not a readable .npz: {e}') from e
  want = {k: tuple(v.shape) for k, v in flatten(expected).items()}
  problems = tree_shapes.mismatches(want, {k: v.shape for k, v in flat.items()})
  if problems:
    raise ValueError(
      f'{what} weights file {path!r} does not fit the model: '
      + '; '.join(problems)
      + '. Convert it with python -m idm_jax.metrics.convert_weights.'
    )
  return unflatten({k: v.astype(np.float32) for k, v in flat.items()})


def save_variables(path: str | os.PathLike, variables: Mapping[str, Any]) -> None:
  """Writes a variable tree as a flat .npz (float32)."""
  flat = {k: np.asarray(v, dtype=np.float32) for k, v in flatten(variables).items()}
  buf = io.BytesIO()
  np.savez(buf, **flat)
  files.write_atomic(path, buf.getvalue())
