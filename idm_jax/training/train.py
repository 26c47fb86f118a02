"""Training: the state's initialisation and sharding, one jitted train step, and the loop.

The step is a pure function of (state, batch): the step's randomness is folded from the state's
key and step number, so an interrupted and resumed run computes exactly what an uninterrupted
run computes. The loop owns every side effect: data, logging, sample grids, checkpoints.
"""

from __future__ import annotations

import functools
import os
import signal
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from idm_jax.data import pipeline
from idm_jax.diffusion import objectives
from idm_jax.diffusion import samplers
from idm_jax.models import platform_ops
from idm_jax.models import unet
from idm_jax.runtime import configlib
from idm_jax.runtime import parallel
from idm_jax.storage import images
from idm_jax.storage import workdir_lock
from idm_jax.training import checkpoints
from idm_jax.training import optim
from idm_jax.training import run_log
from idm_jax.training.train_state import TrainState


def init_state(
  rng: jax.Array, model: unet.UNet, tx: optax.GradientTransformation, *, partitionable: bool = False
) -> TrainState:
  """partitionable: draw the params with partitionable threefry (see unet.init_params); the
  Trainer's sharded init sets it, so no device generates whole tensors."""
  init_rng, state_rng = jax.random.split(rng)
  params = unet.init_params(model, init_rng, partitionable=partitionable)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    ema=params,
    opt_state=tx.init(params),
    rng=state_rng,
    bad_step=jnp.full((), -1, jnp.int32),
  )


def state_shardings(model: unet.UNet, tx, mesh, mesh_cfg):
  """(abstract TrainState, its NamedShardings), derived without allocating anything."""
  boxed = unet.param_shapes(model)
  p_sh = parallel.param_shardings(boxed, mesh, mesh_cfg.fsdp_min_size)
  abstract = jax.eval_shape(
    functools.partial(init_state, model=model, tx=tx), jax.random.PRNGKey(0)
  )
  rep = parallel.replicated(mesh)
  opt_sh = optax.tree_map_params(
    tx,
    lambda _, s: s,
    abstract.opt_state,
    p_sh,
    transform_non_params=lambda _: rep,
    is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding),
  )
  shardings = TrainState(step=rep, params=p_sh, ema=p_sh, opt_state=opt_sh, rng=rep, bad_step=rep)
  abstract = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )
  return abstract, shardings


def loss_fn(params, model, batch, rng, config, logsnr_fn):
  """Mean diffusion loss of one (micro)batch; float32."""
  hq = images.to_model_range(batch['hq'])
  lq = images.to_model_range(batch['lq']) if config.model.conditional else None
  k_drop, k_cond, k_loss = jax.random.split(rng, 3)
  drop_cond = None
  if config.model.conditional and config.model.cond_drop_prob > 0:
    drop_cond = jax.random.bernoulli(k_cond, config.model.cond_drop_prob, (hq.shape[0],))

  def model_fn(x_t, logsnr):
    return model.apply(
      {'params': params}, x_t, logsnr, lq, train=True, drop_cond=drop_cond, rngs={'dropout': k_drop}
    )

  # A residual model denoises HQ - LQ: at init (zero output layers) it already returns the LQ,
  # and all its capacity goes to what the LQ lacks.
  x0 = hq - lq if config.diffusion.residual else hq
  loss, _ = objectives.training_loss(
    model_fn, x0, k_loss, logsnr_fn, configlib.loss_spec(config.diffusion)
  )
  return loss


def train_step(state: TrainState, batch: dict, *, model, config, logsnr_fn):
  """One optimiser step (with optional gradient accumulation). Returns (state, metrics)."""
  loss, grads = loss_and_grads(state, batch, model=model, config=config, logsnr_fn=logsnr_fn)
  return optim.apply_gradients(state, loss, grads, train_cfg=config.train)


def loss_and_grads(state: TrainState, batch: dict, *, model, config, logsnr_fn):
  """The mean loss and gradient over the batch (averaged over accumulation micro-batches)."""
  rng = jax.random.fold_in(state.rng, state.step)
  accum = config.train.grad_accum_steps
  grad_fn = jax.value_and_grad(loss_fn)
  if accum == 1:
    loss, grads = grad_fn(state.params, model, batch, rng, config, logsnr_fn)
  else:
    # Micro-batch i takes examples i, i+A, ...: each device keeps its contiguous slice.
    micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(-1, accum, *x.shape[1:]), 0, 1), batch)

    def body(carry, xs):
      i, mb = xs
      l, g = grad_fn(state.params, model, mb, jax.random.fold_in(rng, i), config, logsnr_fn)
      return jax.tree.map(jnp.add, carry, (l, g)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
    (loss, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
    loss, grads = jax.tree.map(lambda x: x / accum, (loss, grads))
  return loss, grads


def sample_images(params, lq, rng, *, model, config, settings, shape, logsnr_fn):
  """EMA-model restoration (or generation when lq is None) of one batch; float in [-1, 1]."""
  lq_f = images.to_model_range(lq) if lq is not None else None
  guided = lq_f is not None and settings.guidance_scale != 1.0
  return samplers.sample_batch(
    model,
    params,
    lq_f,
    rng,
    shape=shape,
    logsnr_fn=logsnr_fn,
    sampler=settings.sampler,
    steps=settings.steps,
    eta=settings.eta,
    t_start=settings.t_start,
    guidance_scale=settings.guidance_scale if guided else None,
    **configlib.sampling_model(config.diffusion),
  )


def xla_flops(compiled) -> float:
  """XLA's FLOP estimate of a compiled program (0 if it has none). On GPUs it leaves out the
  convolutions and matmuls rewritten into library calls; bench/flops.py counts those."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get('flops', 0.0))


def check_trainable(config: ml_collections.ConfigDict, mesh) -> None:
  """The config choices a run on this mesh cannot make, named by field, before any compile."""
  platform = parallel.mesh_platform(mesh)
  if config.model.attention_impl == 'cudnn' and platform != 'gpu':
    raise ValueError(
      f'config.model.attention_impl: cudnn attention exists on NVIDIA GPUs '
      f'only, and this mesh is on {platform}; use auto or xla'
    )
  # The batch is split over every device of the mesh (parallel.BATCH_AXES).
  if config.train.batch_size % mesh.size:
    raise ValueError(
      f'config.train.batch_size: {config.train.batch_size} is not divisible by '
      f'the {mesh.size} devices of the mesh (data={mesh.shape["data"]} x '
      f'fsdp={mesh.shape["fsdp"]}); use a multiple of {mesh.size}'
    )


class Trainer:
  """Compiled pieces for one config on one mesh: init, train step and sampler.

  Everything is derived from `mesh` (its devices, their processes and platform), never from
  jax.devices(): the same code compiles for an abstract TPU topology on a CPU host (idm_jax.aot).
  """

  def __init__(self, config: ml_collections.ConfigDict, mesh):
    check_trainable(config, mesh)
    self.config = config
    self.mesh = mesh
    self.process_count = parallel.process_count_of(mesh)
    res = config.data.resolution
    self.model = configlib.build_model(config.model, res)
    self.tx = optim.make_optimizer(config.train)
    self.logsnr_fn = configlib.logsnr_fn(config.diffusion, res)
    self.abstract_state, self.shardings = state_shardings(self.model, self.tx, mesh, config.mesh)
    self.batch_sharding = parallel.batch_sharding(mesh)
    rep = parallel.replicated(mesh)
    init = jax.jit(
      functools.partial(init_state, model=self.model, tx=self.tx, partitionable=True),
      out_shardings=self.shardings,
    )
    self.init_jit = init  # for lowering (idm_jax.aot); call self.init

    def init_fn(rng, init=init):
      # Partitionable threefry for the key ops too (split, fold_in), as in init_state; the flag
      # is part of jit's cache key, so this call and aot's lowering compile the same program.
      with jax.threefry_partitionable(True):
        return init(rng)

    self.init = init_fn
    step_fn = functools.partial(
      train_step, model=self.model, config=config, logsnr_fn=self.logsnr_fn
    )
    self.compiler_options = platform_ops.compiler_options(parallel.mesh_platform(mesh))
    self.step = jax.jit(
      step_fn,
      in_shardings=(self.shardings, self.batch_sharding),
      out_shardings=(self.shardings, rep),
      donate_argnums=0,
      compiler_options=self.compiler_options,
    )
    self._samplers = {}

  def local_batch_size(self) -> int:
    """train.batch_size over the mesh's processes (checked to divide in check_trainable)."""
    return self.config.train.batch_size // self.process_count

  def batch_spec(self, local_batch_size: int):
    res = self.config.data.resolution
    shape = (local_batch_size * self.process_count, res, res, 3)
    spec = {'hq': jax.ShapeDtypeStruct(shape, jnp.uint8, sharding=self.batch_sharding)}
    if self.config.model.conditional:
      spec['lq'] = jax.ShapeDtypeStruct(shape, jnp.uint8, sharding=self.batch_sharding)
    return spec

  def compile_step(self, local_batch_size: int):
    """AOT-compiles the train step once; logs XLA's FLOP estimate."""
    with parallel.mesh_rules(self.mesh):
      compiled = self.step.lower(self.abstract_state, self.batch_spec(local_batch_size)).compile()
    flops = xla_flops(compiled)
    if flops:
      global_batch = local_batch_size * self.process_count
      logging.info(
        'train step: %.3g FLOPs (%.1f GFLOP per image, XLA estimate%s)',
        flops,
        flops / global_batch / 1e9,
        ''
        if parallel.mesh_platform(self.mesh) == 'cpu'
        else '; on accelerators it leaves out library convolutions and matmuls',
      )
    self.step_flops = flops
    parallel.barrier('train step compiled')
    return compiled

  def sampler_jit(self, settings, batch_size: int):
    """The jitted (ema, lq, rng) -> images of `sampler`, for lowering; trace it in mesh_rules.
    The EMA keeps the state's shardings, the (host) LQ batch and key are replicated."""
    res = self.config.data.resolution
    fn = functools.partial(
      sample_images,
      model=self.model,
      config=self.config,
      settings=settings,
      shape=(batch_size, res, res, 3),
      logsnr_fn=self.logsnr_fn,
    )
    rep = parallel.replicated(self.mesh)
    return jax.jit(
      fn, in_shardings=(self.shardings.ema, rep, rep), compiler_options=self.compiler_options
    )

  def sampler(self, settings, batch_size: int):
    """A jitted EMA sampler for (samplers.Settings, batch size); cached so each compiles once."""
    key = (batch_size, settings)
    if key not in self._samplers:
      jitted = self.sampler_jit(settings, batch_size)

      def call(params, lq, rng, jitted=jitted):
        with parallel.mesh_rules(self.mesh):
          return jitted(params, lq, rng)

      self._samplers[key] = call
    return self._samplers[key]


def check_finite(state: TrainState):
  bad = int(jax.device_get(state.bad_step))
  if bad >= 0:
    raise FloatingPointError(
      f'non-finite loss or gradient norm at step {bad}; that update was not applied and no '
      'checkpoint was written after it. Lower train.learning_rate or check the data; the run '
      'resumes from the last checkpoint.'
    )


class Stopped(Exception):
  """Training stopped early on a stop request (SIGTERM, SIGHUP) with its step saved: the same
  command resumes it. An exception, not a return, so that no caller goes on as though training
  had finished: an extrinsic round that evaluated and cleaned with a model stopped a tenth of the
  way would write a cleaned dataset that its resumed run then keeps."""

  def __init__(self, workdir: str, step: int, signal_name: str):
    super().__init__(
      f'{workdir}: stopped at step {step} after {signal_name}; checkpoint saved (the same '
      'command resumes it)'
    )
    self.workdir, self.step, self.signal_name = workdir, step, signal_name


class _Preemption:
  """SIGTERM or SIGHUP -> every process stops at the same step, saves it and exits 0.

  SIGTERM is a preemption or maintenance notice (or `tpu_pod.sh --stop`); SIGHUP is a lost
  terminal or ssh session. A run started in the foreground of a session that drops must still
  save, so a hang-up is a stop request too, never an unsaved death.

  A pod's hosts get the signal at slightly different moments (or only some of them do); a host
  that left the loop on its own signal while another entered the next step's collectives would
  hang or lose the save. With several processes, JAX's preemption service (jax.distributed's
  coordination service) catches SIGTERM on any host and the hosts agree on a step to stop at:
  `reached(step)`, asked once per step on every host, is True on all of them at that step. The
  service watches SIGTERM only, so a SIGHUP is passed on to this process as a SIGTERM. With one
  process a Python handler sets a flag.
  """

  def __init__(self):
    self.requested = False
    self.signal_name = 'SIGTERM'
    self._previous = {}
    self._service = jax.process_count() > 1

  def __enter__(self):
    # The service's own SIGTERM handler must stay in place; SIGHUP is ours in both cases.
    handlers = (
      {signal.SIGHUP: self._forward_as_sigterm}
      if self._service
      else {signal.SIGTERM: self._handler, signal.SIGHUP: self._handler}
    )
    for signum, handler in handlers.items():
      try:
        self._previous[signum] = signal.signal(signum, handler)
      except ValueError:  # not the main thread (e.g. some test runners): no handler
        pass
    return self

  def _handler(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name
    logging.warning('%s received: saving a checkpoint and stopping', self.signal_name)
    self.requested = True

  def _forward_as_sigterm(self, signum, frame):
    del signum, frame
    self.signal_name = 'SIGHUP'
    logging.warning('SIGHUP received: passed on as SIGTERM, so that every host stops at one step')
    os.kill(os.getpid(), signal.SIGTERM)

  def reached(self, step: int) -> bool:
    """Whether to save and stop after `step` (the same answer on every process)."""
    if self._service:
      if multihost_utils.reached_preemption_sync_point(step):
        logging.warning('preemption notice (SIGTERM on some host): all hosts stop at step %d', step)
        self.requested = True
    return self.requested

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      if previous is not None:
        signal.signal(signum, previous)


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  max_steps: int | None = None,
  vis_data: ml_collections.ConfigDict | None = None,
) -> TrainState:
  """Trains (or resumes) config in workdir until train.num_steps (or max_steps in this call).

  vis_data: the config.data whose validation split feeds the sample grids (default
  config.data; extrinsic rounds pass the original data, since a cleaned set has no validation).
  Raises workdir_lock.WorkdirInUse if another training run holds the workdir, and Stopped,
  after saving, if a stop request (SIGTERM, SIGHUP) arrived before the last step.
  """
  # One lock per run, taken by process 0: the other hosts of a run share its workdir.
  if jax.process_index() != 0:
    return _train_and_evaluate(config, workdir, max_steps, vis_data, None)
  with workdir_lock.WorkdirLock(workdir) as lock:
    return _train_and_evaluate(config, workdir, max_steps, vis_data, lock)


def _lock_lost_everywhere(lock, workdir: str) -> bool:
  """Whether another run took the bucket lock over (process 0 knows; the others are told, so all
  stop at the same step). A local lock cannot be lost: no check, no collective."""
  if not workdir_lock.can_be_lost(workdir):
    return False
  lost = lock is not None and lock.lost
  if jax.process_count() == 1:
    return lost
  return bool(multihost_utils.broadcast_one_to_all(np.bool_(lost)))


def _train_and_evaluate(config, workdir, max_steps, vis_data, lock) -> TrainState:
  t0 = time.monotonic()
  with _Preemption() as preemption:
    mesh = parallel.make_mesh(config.mesh)
    trainer = Trainer(config, mesh)
    pcount, pindex = jax.process_count(), jax.process_index()
    local_bs = trainer.local_batch_size()  # Trainer checked that the batch divides the mesh
    data_iter = iter(pipeline.train_iterator(config, process_index=pindex, process_count=pcount))
    ckpt = checkpoints.Checkpointer(workdir, keep=config.train.keep_ckpts)
    state, prior_seconds = _resume_or_init(trainer, ckpt, data_iter)
    budget = TimeBudget(config.train.max_seconds, prior_seconds, t0)
    start = int(jax.device_get(state.step))
    end = (
      config.train.num_steps
      if max_steps is None
      else min(config.train.num_steps, start + max_steps)
    )
    # A budget spent by earlier runs ends here; a fresh one always takes at least one step.
    if start >= end or budget.spent_before():
      logging.info('already trained to step %d (%.0f s); nothing to do', start, prior_seconds)
      ckpt.close()
      data_iter.close()
      return state
    step_fn = trainer.compile_step(local_bs)

    writer = run_log.Writer(workdir, enabled=pindex == 0)
    vis = _vis_batch(config, vis_data)
    vis_settings = configlib.sample_settings(config.sample, steps=config.train.vis_steps)

    def write_samples(step):
      sampler = trainer.sampler(vis_settings, vis['size'])
      lq = jnp.asarray(vis['lq']) if config.model.conditional else None
      out = images.to_uint8(
        parallel.to_host(sampler(state.ema, lq, jax.random.PRNGKey(config.seed)))
      )
      writer.sample_grid(step, vis, out, conditional=config.model.conditional)

    progress = run_log.progress(start, end, enabled=pindex == 0)
    last_t, last_step = time.perf_counter(), start
    stopped = None
    # The step before the one just dispatched. Waiting for it keeps one step in flight (the next
    # batch is read while a step runs) and has the bar count finished steps: unbounded, the
    # dispatch ran dozens of steps ahead and the bar with it, then stalled at the next log step.
    previous = None
    try:
      step = start
      while step < end:
        batch = parallel.local_batch_to_global(next(data_iter), mesh)
        state, metrics = step_fn(state, batch)
        step += 1
        if previous is not None:
          jax.block_until_ready(previous)
        previous = metrics
        progress.update(step - 1 - progress.n)
        preempted = preemption.reached(step)
        # Every process must agree to stop at the same step (the save is collective); with
        # several, they agree at log steps only, so the budget costs no sync per step.
        out_of_time = (
          jax.process_count() == 1 or step % config.train.log_every == 0
        ) and budget.exhausted_everywhere()
        last = step == end or out_of_time
        if step % config.train.log_every == 0 and _lock_lost_everywhere(lock, workdir):
          # Two runs writing one workdir would overwrite each other's checkpoints: stop unsaved.
          raise workdir_lock.WorkdirInUse(
            f'{workdir}: this run lost its lock ({workdir_lock.LOCK_FILE}): another run took it '
            'over, or it could not be renewed for half the stale time (the error above says '
            f'which); stopped at step {step} without saving'
          )
        if step % config.train.log_every == 0 or last:
          check_finite(state)
          m = {k: float(v) for k, v in jax.device_get(metrics).items()}
          progress.update(step - progress.n)  # this step has finished too
          now = time.perf_counter()
          m['images_per_sec'] = (step - last_step) * config.train.batch_size / (now - last_t)
          last_t, last_step = now, step
          writer.scalars(step, m)
          progress.set_postfix(loss=f'{m["loss"]:.4f}', img_s=f'{m["images_per_sec"]:.1f}')
        run_log.shorten_to_budget(progress, step, end, budget.remaining())
        if step % config.train.sample_every == 0 or last:
          write_samples(step)
        if step % config.train.ckpt_every == 0 or last or preempted:
          check_finite(state)  # a NaN state is never saved
          ckpt.save(step, state, data_iter, config, force=True, train_seconds=budget.elapsed())
        if preempted:
          progress.update(step - progress.n)  # the save waited for this step
          stopped = Stopped(workdir, step, preemption.signal_name)
          break
        if out_of_time:
          logging.info(
            'stopped at step %d: train.max_seconds=%g reached; checkpoint saved',
            step,
            config.train.max_seconds,
          )
          break
    finally:
      progress.close()
      ckpt.wait()
      ckpt.close()
      writer.close()
      data_iter.close()
  if stopped is not None:
    raise stopped
  return state


class TimeBudget:
  """train.max_seconds: training wall-clock time (start-up and compiles included), counted
  across resumes through the seconds each checkpoint records. max_seconds=0: no budget."""

  def __init__(self, max_seconds: float, prior_seconds: float, t0: float):
    self.max_seconds = float(max_seconds)
    self.prior_seconds = float(prior_seconds)
    self.t0 = t0

  def elapsed(self) -> float:
    return self.prior_seconds + time.monotonic() - self.t0

  def remaining(self) -> float | None:
    return None if self.max_seconds <= 0 else self.max_seconds - self.elapsed()

  def spent_before(self) -> bool:
    """Whether the runs before this one already used the whole budget."""
    return self.max_seconds > 0 and self.prior_seconds >= self.max_seconds

  def exhausted(self) -> bool:
    left = self.remaining()
    return left is not None and left <= 0

  def exhausted_everywhere(self) -> bool:
    """The same answer on every process: host 0's clock decides."""
    if self.max_seconds <= 0:
      return False
    if jax.process_count() == 1:
      return self.exhausted()
    return bool(multihost_utils.broadcast_one_to_all(np.bool_(self.exhausted())))


def _resume_or_init(trainer: Trainer, ckpt: checkpoints.Checkpointer, data_iter):
  """(state, training seconds so far): the newest checkpoint that restores (state and data
  position), else a fresh or warm-started state and 0."""
  resumed = ckpt.restore_latest(trainer.abstract_state, data_iter)  # skips corrupt ones
  if resumed is not None:
    step, state = resumed
    logging.info('resuming from step %d', step)
    return state, ckpt.train_seconds(step)
  state = trainer.init(jax.random.PRNGKey(trainer.config.seed))
  if trainer.config.train.init_from:
    state = _warm_start(state, trainer.config.train.init_from)
  return state, 0.0


def _vis_batch(config, vis_data=None) -> dict:
  """The fixed validation batch of the sample grids, from vis_data's (or config's) data, and
  its 'size'. An unconditional model samples from noise alone: no data, so a dataset with no
  validation split (num_val=0, e.g. a cleaned version) trains too."""
  if not config.model.conditional:
    return {'size': int(config.train.num_vis)}
  if vis_data is not None:
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.data = vis_data
  batch = pipeline.eval_batches(config, config.train.num_vis, config.train.num_vis)[0]
  return dict(batch, size=len(batch['hq']))


def _warm_start(state: TrainState, workdir: str) -> TrainState:
  """Initialises params and EMA from another run's EMA (extrinsic rounds fine-tune this way)."""
  _, ema, _ = checkpoints.load_for_inference(workdir)

  def put(new, old):  # from host values: each process places its own shards, no collective
    host = np.asarray(new, old.dtype)
    return jax.make_array_from_callback(old.shape, old.sharding, lambda index: host[index])

  params = jax.tree.map(put, ema, state.params)
  # Separate buffers: the train step donates params and EMA and may not get one buffer twice.
  return state.replace(params=params, ema=jax.tree.map(jnp.copy, params))
