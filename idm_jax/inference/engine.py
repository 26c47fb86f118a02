"""Inference: load a trained model, and restore aligned LQ faces (or generate faces) with it.

`load` is the one way in: a training workdir or an exported file -> (Restorer, step).
`Restorer` wraps a config and its (EMA) params into one jitted sampling function per
(batch shape, sampler, steps, ...): the whole sampler loop runs inside that jit, and the batch is
split over the devices of the mesh it is given (`parallel.sampling_mesh`: every process's
devices on the data axis, params replicated). `restore_in_batches` and `Restorer.generate` run
any number of images through one compiled batch shape.

Several processes (a pod's hosts) share one program over all their chips: each passes its own
images and gets its own results back, and every call is collective. The lockstep helpers of
runtime/host_shares.py (`host_share`, `lockstep_chunks`, `call_padded`, `gather_shares`;
`map_in_batches` combines them) keep them in step: the processes agree once on how many
batches to run, and one that has run out of work runs filler batches until the others finish.

Reproducibility: example i of a call gets the key fold_in(key(seed), index_offset + i) and the
sampler is vmapped over examples, so an image's result does not depend on the batch size, the
batching or the device count: only on (seed, its index, the sampling settings).
"""

from __future__ import annotations

from typing import Optional, Sequence

from flax.linen import meta
import jax
from jax.sharding import Mesh
import ml_collections
import numpy as np

from idm_jax.diffusion import samplers
from idm_jax.inference import export
from idm_jax.models import platform_ops
from idm_jax.models import unet
from idm_jax.runtime import configlib
from idm_jax.runtime import host_shares
from idm_jax.runtime import parallel
from idm_jax.runtime import tree_shapes
from idm_jax.storage import files
from idm_jax.storage import images
from idm_jax.training import checkpoints


def check_params(model: unet.UNet, params) -> None:
  """Raises ValueError if `params` do not fit `model` (e.g. a config/params mismatch)."""
  expected = meta.unbox(unet.param_shapes(model))
  exp_paths = {
    jax.tree_util.keystr(p): tuple(x.shape)
    for p, x in jax.tree_util.tree_leaves_with_path(expected)
  }
  got_paths = {
    jax.tree_util.keystr(p): tuple(np.shape(x))
    for p, x in jax.tree_util.tree_leaves_with_path(params)
  }
  problems = tree_shapes.mismatches(exp_paths, got_paths)
  if problems:
    raise ValueError(
      'params do not match the model that the config describes: ' + '; '.join(problems)
    )


def random_params(model: unet.UNet, seed: int = 0, scale: float = 1.0):
  """Random params of `model`'s shapes, drawn in numpy: no compilation of the model's init.

  For smoke tests and demos of the plumbing. Unlike init_params, the zero-initialised output
  layers get random values too, so the model's output depends on its inputs. Kernels are
  N(0, scale^2 / fan_in), biases N(0, 0.01 scale^2), norm scales 1.
  """
  shapes = meta.unbox(unet.param_shapes(model))
  rng = np.random.default_rng(seed)

  def one(path, x):
    name = str(getattr(path[-1], 'key', path[-1]))
    if name == 'scale':
      return np.ones(x.shape, x.dtype)
    if len(x.shape) <= 1:
      return (0.1 * scale * rng.standard_normal(x.shape)).astype(x.dtype)
    fan_in = int(np.prod(x.shape[:-1]))
    return (scale / np.sqrt(fan_in) * rng.standard_normal(x.shape)).astype(x.dtype)

  return jax.tree_util.tree_map_with_path(one, shapes)


def sampling_jit(
  model: unet.UNet,
  config: ml_collections.ConfigDict,
  logsnr_fn,
  mesh: Mesh,
  batch: int,
  settings: samplers.Settings,
):
  """The jitted (params, lq, seed, indices, guidance_scale, eta) -> x0 that `Restorer` runs for
  `batch` examples (a multiple of the mesh size) on `mesh`: params replicated, examples split on
  the data axis. It specialises on the steps, sampler, t_start and whether guidance and eta are
  on; the guidance scale and eta are traced, so changing them does not recompile."""
  conditional = bool(config.model.conditional)
  res = int(config.data.resolution)
  s = settings
  *_, guided, eta_zero = program_key(s)

  def one(params, lq, rng, scale, eta):
    # One example (lq: (1, R, R, 3) or None); vmapped over the batch below, so each example's
    # noise comes from its own key only.
    return samplers.sample_batch(
      model,
      params,
      lq,
      rng,
      shape=(1, res, res, 3),
      logsnr_fn=logsnr_fn,
      sampler=s.sampler,
      steps=s.steps,
      eta=0.0 if eta_zero else eta,
      t_start=s.t_start,
      guidance_scale=scale if guided else None,
      **configlib.sampling_model(config.diffusion),
    )[0]

  def fn(params, lq, seed, indices, scale, eta):
    base = jax.random.key(seed)
    rngs = jax.vmap(lambda i: jax.random.fold_in(base, i))(indices)
    if conditional:
      return jax.vmap(lambda l, r: one(params, l[None], r, scale, eta))(lq, rngs)
    return jax.vmap(lambda r: one(params, None, r, scale, eta))(rngs)

  bs, rep = parallel.batch_sharding(mesh), parallel.replicated(mesh)
  return jax.jit(
    fn,
    in_shardings=(rep, bs if conditional else rep, rep, bs, rep, rep),
    out_shardings=bs,
    compiler_options=platform_ops.compiler_options(parallel.mesh_platform(mesh)),
  )


def program_key(settings: samplers.Settings) -> tuple:
  """What `sampling_jit` specialises on: settings with the same key share one compiled program."""
  s = settings
  return (s.steps, s.sampler, s.t_start, s.guidance_scale != 1.0, s.eta == 0.0)


def padded_batch(batch: int, num_devices: int) -> int:
  """The batch a Restorer compiles for `batch` examples: the next multiple of the devices."""
  return -(-batch // num_devices) * num_devices


class Restorer:
  """Samples from a trained model: `restore` for conditional models, `generate` otherwise."""

  def __init__(self, config: ml_collections.ConfigDict, params, *, mesh: Mesh | None = None):
    self.config = config
    self.resolution = int(config.data.resolution)
    self.conditional = bool(config.model.conditional)
    self.model = configlib.build_model(config.model, self.resolution)
    check_params(self.model, params)
    self.logsnr_fn = configlib.logsnr_fn(config.diffusion, self.resolution)
    self.mesh = parallel.sampling_mesh() if mesh is None else mesh
    self.num_processes = parallel.process_count_of(self.mesh)
    # Over several processes every call is collective: callers go through lockstep_chunks.
    self.lockstep = self.num_processes > 1
    self.num_local_devices = sum(
      d.process_index == jax.process_index() for d in self.mesh.devices.flat
    )
    self._batch_sharding = parallel.batch_sharding(self.mesh)
    self._replicated = parallel.replicated(self.mesh)
    # From host values, so that every process places its own copy (device_put cannot reach
    # another process's chips).
    self.params = jax.tree.map(
      lambda x: jax.make_array_from_callback(
        np.shape(x), self._replicated, lambda index, x=np.asarray(x): x[index]
      ),
      params,
    )
    self._fns = {}

  def resolve_settings(
    self, steps=None, sampler=None, t_start=None, guidance_scale=None, eta=None
  ) -> samplers.Settings:
    """The call's sampler settings, the config's sample.* filling what is None; validated."""
    settings = configlib.sample_settings(
      self.config.sample,
      steps=steps,
      sampler=sampler,
      t_start=t_start,
      guidance_scale=guidance_scale,
      eta=eta,
    )
    if not self.conditional and (settings.t_start < 1.0 or settings.guidance_scale != 1.0):
      raise ValueError('t_start < 1 and guidance need a conditional model (an LQ input)')
    return settings

  def _sample_fn(self, batch: int, settings: samplers.Settings):
    """`sampling_jit` for this model and mesh, compiled once per what it specialises on."""
    key = (batch,) + program_key(settings)
    if key not in self._fns:
      self._fns[key] = sampling_jit(
        self.model, self.config, self.logsnr_fn, self.mesh, batch, settings
      )
    return self._fns[key]

  def _run(
    self, lq_f32: Optional[np.ndarray], indices: np.ndarray, seed: int, settings: samplers.Settings
  ):
    """Pads this process's examples to a multiple of its devices, samples them within the
    global batch, trims; returns uint8 (B, R, R, 3)."""
    s = settings
    b = len(indices)
    padded = padded_batch(b, self.num_local_devices)
    indices = host_shares.pad_rows(indices, padded).astype(np.uint32)
    lq = None if lq_f32 is None else self._split(host_shares.pad_rows(lq_f32, padded))
    fn = self._sample_fn(padded * self.num_processes, s)
    out = fn(
      self.params,
      lq,
      np.uint32(seed),
      self._split(indices),
      np.float32(s.guidance_scale),
      np.float32(s.eta),
    )
    return images.to_uint8(local_rows(out))[:b]

  def _split(self, local: np.ndarray) -> jax.Array:
    """This process's rows -> the global batch (each process's rows are one block of it)."""
    return jax.make_array_from_process_local_data(self._batch_sharding, local)

  def restore(
    self,
    lq: np.ndarray,
    *,
    seed: int = 0,
    steps: Optional[int] = None,
    sampler: Optional[str] = None,
    t_start: Optional[float] = None,
    guidance_scale: Optional[float] = None,
    eta: Optional[float] = None,
    index_offset: int = 0,
    indices: Optional[Sequence[int]] = None,
  ) -> np.ndarray:
    """Restores aligned LQ faces: uint8 (B, R, R, 3) at the model resolution -> uint8, same shape.

    Unset sampling arguments default to config.sample. Example i is sampled with the key
    fold_in(key(seed), index_offset + i), or fold_in(key(seed), indices[i]) if `indices` is
    given (e.g. a per-file number, so a file restores the same alone or within a folder).
    Over several processes (`lockstep`) this is collective: every process calls it with as
    many images; `restore_in_batches` arranges that.
    """
    if not self.conditional:
      raise ValueError(
        'restore: this model is unconditional (config.model.conditional=False); use generate()'
      )
    lq = np.asarray(lq)
    r = self.resolution
    if lq.dtype != np.uint8 or lq.ndim != 4 or lq.shape[1:] != (r, r, 3):
      raise ValueError(
        f'restore: expected uint8 images of shape (B, {r}, {r}, 3), got {lq.dtype} {lq.shape}'
      )
    if lq.shape[0] == 0:
      return np.zeros((0, r, r, 3), np.uint8)
    settings = self.resolve_settings(steps, sampler, t_start, guidance_scale, eta)
    check_seed(seed)
    idx = _indices(lq.shape[0], index_offset, indices)
    return self._run(np.asarray(lq, np.float32) / 127.5 - 1.0, idx, seed, settings)

  def generate(
    self,
    num: int,
    *,
    seed: int = 0,
    batch_size: Optional[int] = None,
    steps: Optional[int] = None,
    sampler: Optional[str] = None,
    eta: Optional[float] = None,
    index_offset: int = 0,
    indices: Optional[Sequence[int]] = None,
  ) -> np.ndarray:
    """`num` samples of an unconditional model, uint8 (num, R, R, 3); sample i uses
    fold_in(key(seed), index_offset + i), or fold_in(key(seed), indices[i]) when `indices` is
    given (a host's share of a sample set), so results do not depend on batch_size."""
    if self.conditional:
      raise ValueError('generate: this model is conditional (it needs LQ inputs); use restore()')
    settings = self.resolve_settings(steps, sampler, None, None, eta)
    check_seed(seed)
    batch_size = int(batch_size or self.config.sample.batch_size)
    all_idx = _indices(int(num), index_offset, indices)
    r = self.resolution
    return host_shares.map_in_batches(
      lambda idx: self._run(None, idx, seed, settings),
      batch_size,
      all_idx,
      lockstep=self.lockstep,
      empty=np.zeros((0, r, r, 3), np.uint8),
    )

  def generate_batch(self, indices: Sequence[int], *, seed: int = 0, **settings) -> np.ndarray:
    """One batch of samples, sample k from fold_in(key(seed), indices[k]): `generate` for a
    caller that walks its own batches (collective over processes, as `restore`)."""
    if self.conditional:
      raise ValueError('generate: this model is conditional (it needs LQ inputs); use restore()')
    check_seed(seed)
    idx = _indices(len(indices), 0, indices)
    return self._run(None, idx, seed, self.resolve_settings(**settings))


def check_seed(seed: int) -> None:
  if not 0 <= int(seed) < 2**32:
    raise ValueError(f'seed={seed} must be in [0, 2**32)')


def _indices(b: int, index_offset: int, indices: Optional[Sequence[int]]) -> np.ndarray:
  if indices is not None:
    idx = np.asarray(indices, np.int64)
    if idx.shape != (b,):
      raise ValueError(f'indices has shape {idx.shape}, expected ({b},)')
  else:
    idx = int(index_offset) + np.arange(b, dtype=np.int64)
  if len(idx) and (idx.min() < 0 or idx.max() >= 2**32):
    raise ValueError('example indices must be in [0, 2**32)')
  return idx


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch split over a `sampling_mesh`, in order (all of them on one
  process)."""
  shards = sorted(x.addressable_shards, key=lambda shard: shard.index[0].start or 0)
  return np.concatenate([np.asarray(shard.data) for shard in shards])


def restore_in_batches(
  restorer: Restorer, lq: np.ndarray, indices: Sequence[int], batch_size: int, **settings
) -> np.ndarray:
  """Restores any number of LQ images in chunks of `batch_size`; image k gets the noise index
  indices[k], so a result does not depend on the batching. settings: Restorer.restore's.
  With a Restorer over several processes, every process must call it (with its own images,
  possibly none)."""
  lq = np.asarray(lq)
  r = restorer.resolution
  return host_shares.map_in_batches(
    lambda idx, x: restorer.restore(x, indices=idx, **settings),
    int(batch_size),
    np.asarray(indices, np.int64),
    lq,
    lockstep=restorer.lockstep,
    empty=np.zeros((0, r, r, 3), np.uint8),
  )


def with_model_of(
  config: ml_collections.ConfigDict, ckpt_config: ml_collections.ConfigDict
) -> ml_collections.ConfigDict:
  """The run's settings with the checkpoint's model, diffusion and resolution (which its
  params need)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model = ckpt_config.model
    config.diffusion = ckpt_config.diffusion
    config.data.resolution = ckpt_config.data.resolution
  return config


def load(
  path: str, run_config: ml_collections.ConfigDict | None = None, *, mesh: Mesh | None = None
) -> tuple[Restorer, int | None]:
  """The one way to load a trained model: (Restorer, step).

  path: a training workdir (the EMA params of its latest complete checkpoint, whose step is
  returned) or an exported .msgpack file (export.py; step None). With run_config, the Restorer
  runs with the run's settings (sampling, evaluation, data) and the checkpoint's model.
  Over several processes every one of them calls it: each reads the params to host memory
  itself, and the Restorer replicates them over the devices of its mesh that it owns.
  """
  # Agreed: a process that alone cannot see the workdir must not leave the others waiting in
  # load_for_inference's agreements.
  if checkpoints.agreed_isdir(path):
    config, params, step = checkpoints.load_for_inference(path)
  elif files.isfile(path):
    (config, params), step = export.load_exported(path), None
  else:
    raise FileNotFoundError(f'{path}: no such workdir or exported model file')
  if run_config is not None:
    config = with_model_of(run_config, config)
  return Restorer(config, params, mesh=mesh), step
