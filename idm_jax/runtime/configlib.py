"""The config schema: defaults for every field, degradation presets, and validation.

Every `configs/*.py` starts from `base_config()` and overrides what it needs. `validate(config)`
runs once at start-up and raises `ConfigError` naming the offending field, so a typo on the
command line fails in a second rather than an hour into a run.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os

import ml_collections

from idm_jax.diffusion import objectives
from idm_jax.diffusion import samplers
from idm_jax.diffusion import schedules
from idm_jax.models import unet

# The libraries' vocabularies, each defined once where it is implemented; ours below.
SAMPLERS = samplers.SAMPLERS
SCHEDULES = schedules.SCHEDULES
PARAMETERIZATIONS = objectives.PARAMETERIZATIONS
LOSSES = objectives.LOSSES
LOSS_WEIGHTINGS = objectives.LOSS_WEIGHTINGS
DTYPES = unet.DTYPES
ATTENTION_IMPLS = unet.ATTENTION_IMPLS
MODES = ('train', 'evaluate', 'sample', 'clean', 'extrinsic', 'generate')
DATA_SOURCES = ('folder', 'tfds', 'builtin')
PRESETS = ('gfpgan', 'codeformer_heavy')
CLEAN_SCORES = ('niqe', 'artifacts')


class ConfigError(ValueError):
  """A config field holds a value that cannot work; the message names the field."""


def degradation_config(preset: str = 'gfpgan') -> ml_collections.ConfigDict:
  """The blind degradation model's ranges and probabilities (docs/DESIGN.md, the method, point 1).

  Ranges are (low, high) for a uniform draw. Noise and colour shift are in 0..255 units.
  """
  if preset not in PRESETS:
    raise ConfigError(f'degradation.preset: unknown preset {preset!r}; choose one of {PRESETS}')
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.kernel_size = 41
  c.iso_prob = 0.5  # isotropic vs anisotropic Gaussian kernel
  c.blur_sigma = (0.1, 10.0)
  c.scale = (0.8, 8.0)  # downsample factor s: LQ is int(w // s) wide before upsampling
  c.noise_sigma = (0.0, 20.0)  # /255
  c.jpeg_quality = (60, 100)
  c.color_shift_prob = 0.3  # per-channel offset U[-shift, shift]/255, LQ only
  c.color_shift = 20.0
  c.gray_prob = 0.01
  c.jitter_prob = 0.3  # brightness/contrast/saturation/hue jitter, LQ only
  c.brightness = (0.5, 1.5)
  c.contrast = (0.5, 1.5)
  c.saturation = (0.0, 1.5)
  c.hue = (-0.1, 0.1)
  c.flip_prob = 0.5  # horizontal flip of the (HQ, LQ) pair
  # A share of training pairs drawn from the mild end of the same model instead, some of them
  # not degraded at all: a restorer that has only seen heavy damage treats every input as
  # heavily damaged, and cannot leave a clean face alone (which cleaning a dataset needs).
  # Evaluation pairs always use the ranges above.
  c.mild_share = 0.0
  c.mild = mild_ranges(c)  # before a heavier preset's ranges: mild whatever the preset
  if preset == 'codeformer_heavy':
    c.blur_sigma = (1.0, 15.0)
    c.scale = (4.0, 30.0)
    c.noise_sigma = (0.0, 20.0)
    c.jpeg_quality = (30, 80)
  return c


def mild_ranges(preset: ml_collections.ConfigDict, part: float = 0.2) -> ml_collections.ConfigDict:
  """The gentlest `part` of each of the preset's damage ranges, and no colour changes.

  A rule rather than chosen numbers, so the mild pairs are the heavy preset's own continuation
  towards no damage, not a copy of any test's defects. Colour shift, jitter and grayscale are
  off: a restorer should not learn to recolour a face it is meant to leave alone.
  """

  def gentle(lo, hi, gentle_end):
    width = part * (hi - lo)
    return (lo, lo + width) if gentle_end == 'low' else (hi - width, hi)

  q_lo, q_hi = gentle(*preset.jpeg_quality, 'high')
  return ml_collections.ConfigDict(
    dict(
      identity_prob=0.25,  # of the mild pairs: LQ = HQ exactly
      blur_sigma=gentle(*preset.blur_sigma, 'low'),
      scale=gentle(*preset.scale, 'low'),
      noise_sigma=gentle(*preset.noise_sigma, 'low'),
      jpeg_quality=(int(round(q_lo)), int(q_hi)),
    )
  )


def base_config() -> ml_collections.ConfigDict:
  """Defaults for every field. Configs override; the command line overrides configs."""
  c = ml_collections.ConfigDict()
  c.mode = 'train'
  c.seed = 0

  c.data = ml_collections.ConfigDict(
    dict(
      source='folder',  # folder | tfds | builtin (faces shipped by pip packages, demo only)
      dir='',  # image folder (source=folder)
      tfds_name='',  # prepared TFDS dataset name, e.g. 'idm_faces/ffhq512' (source=tfds)
      tfds_data_dir='',  # its data_dir
      train_split='train',
      eval_split='validation',
      num_val=0,  # source=folder: the last num_val files (sorted) are validation
      max_examples=0,  # 0 = all; otherwise use only the first N training examples
      resolution=128,
      num_workers=0,  # grain worker processes; 0 = in the main process
      prefetch=2,
    )
  )
  c.degradation = degradation_config('gfpgan')

  c.model = ml_collections.ConfigDict(
    dict(
      conditional=True,  # False: unconditional generator (no LQ input at all)
      channels=128,
      channel_mult=(1, 1, 2, 2, 4, 4),
      num_res_blocks=2,
      attention_resolutions=(32, 16),
      head_channels=64,
      dropout=0.0,
      resblock_updown=True,
      scale_shift_norm=True,
      num_groups=32,
      lq_concat=True,  # LQ (resized to output size) concatenated to the noisy input
      lq_encoder=True,  # light CNN whose features are added at every encoder level
      lq_encoder_channels=32,
      out_channels=3,
      cond_drop_prob=0.0,  # drop the LQ condition this often in training (for CFG)
      dtype='bfloat16',  # compute dtype
      param_dtype='float32',
      remat=False,
      attention_impl='auto',  # auto | xla | cudnn
    )
  )

  c.diffusion = ml_collections.ConfigDict(
    dict(
      schedule='cosine',
      shift_base_resolution=64,  # shifted_cosine: logsnr += 2 log(base / resolution)
      parameterization='v',
      residual=False,  # denoise HQ - LQ (LQ at output size) instead of HQ
      loss='mse',
      loss_weighting='none',  # none | min_snr
      min_snr_gamma=5.0,
      logsnr_min=-20.0,
      logsnr_max=20.0,
    )
  )

  c.sample = ml_collections.ConfigDict(
    dict(
      sampler='ddim',
      steps=50,
      eta=0.0,
      t_start=1.0,  # < 1: start from the noised upsampled LQ (fidelity knob)
      guidance_scale=1.0,  # classifier-free guidance; 1 = off
      batch_size=16,
    )
  )

  c.train = ml_collections.ConfigDict(
    dict(
      batch_size=32,  # global batch
      num_steps=500_000,
      max_seconds=0.0,  # > 0: stop, save and sample after this much training wall
      # time (start-up and compiles included; counted across resumes)
      learning_rate=1e-4,
      lr_schedule='constant',  # constant | cosine
      warmup_steps=1000,
      weight_decay=0.0,
      b1=0.9,
      b2=0.999,
      grad_clip=1.0,
      grad_accum_steps=1,
      ema_decay=0.9999,
      ema_warmup=False,  # EMA decay ramps as min(decay, (1 + s) / (10 + s)): short runs
      log_every=100,
      sample_every=5000,
      ckpt_every=5000,
      keep_ckpts=3,
      num_vis=8,  # images in the fixed validation batch for the PNG grid
      vis_steps=25,  # sampling steps for that grid
      init_from='',  # workdir whose latest EMA params initialise this run
    )
  )

  c.mesh = ml_collections.ConfigDict(
    dict(
      data=-1,  # -1: all devices not used by other axes
      fsdp=1,
      fsdp_min_size=2**18,  # kernels with fewer elements stay replicated
    )
  )

  c.eval = ml_collections.ConfigDict(
    dict(
      num_images=100,
      steps=(25, 50),
      batch_size=16,
      niqe_params='',  # NIQE pristine parameters .npz; '' = the shipped ones
      identity=True,
    )
  )

  c.clean = ml_collections.ConfigDict(
    dict(
      sampler='ddim',
      steps=25,
      t_start=0.4,  # content-preserving: start close to the input
      samples=1,  # > 1: each cleaned face is the mean of this many restorations
      # (independent noise), so no single draw's invented detail stays
      fraction=0.15,  # clean the worst-scoring share; 1.0 = clean everything
      score='niqe',  # niqe | artifacts (metrics/artifacts.py): ranks the worst
      batch_size=16,
      out_dir='',  # '' = WORKDIR/cleaned (mode=clean); rounds use round_k/dataset
    )
  )

  c.extrinsic = ml_collections.ConfigDict(
    dict(
      rounds=2,
      init='finetune',  # finetune | scratch
      steps_per_round=0,  # 0 = train.num_steps
    )
  )

  c.generate = ml_collections.ConfigDict(
    dict(
      num_samples=64,
      batch_size=16,
      out_dir='',  # '' = WORKDIR/generated
    )
  )
  return c


def load(path: str | os.PathLike) -> ml_collections.ConfigDict:
  """The config file at `path`'s get_config(), as --config=path loads it: the one loader for
  tests, benchmarks and notebooks."""
  return _config_module(os.fspath(path)).get_config()


def config_file(here: str, name: str):
  """The config file `name` beside the file `here` (a config's __file__), loaded as a module:
  a config that extends another names it, wherever the configs folder is."""
  return _config_module(os.path.join(os.path.dirname(os.path.abspath(here)), name))


def _config_module(path: str):
  stem = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f'idm_jax_config_{stem}', path)
  if spec is None or not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such config file')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _check(cond: bool, field: str, msg: str):
  if not cond:
    raise ConfigError(f'config.{field}: {msg}')


def _value_kind(x) -> str:
  if isinstance(x, bool):
    return 'a bool'
  if isinstance(x, (int, float)):
    return 'a number'
  if isinstance(x, str):
    return 'a string'
  if isinstance(x, (tuple, list)):
    return 'a tuple'
  if isinstance(x, ml_collections.ConfigDict):
    return 'a group of fields'
  return 'anything' if x is None else type(x).__name__


def check_fields(
  config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict, prefix: str = 'config'
) -> None:
  """Every field of `config` exists in `schema` (base_config()) with a value of the same kind.

  ConfigDict accepts new fields silently, so `c.train.lerning_rate = ...` in a config file would
  add a field nothing reads; this names it and the nearest real field instead.
  """
  for key in config.keys():
    field = f'{prefix}.{key}'
    if key not in schema:
      near = difflib.get_close_matches(key, list(schema.keys()), n=1, cutoff=0.6)
      hint = (
        f'did you mean {prefix}.{near[0]}?'
        if near
        else f'the fields of {prefix} are {", ".join(sorted(schema.keys()))}'
      )
      raise ConfigError(f'{field}: no such field ({hint})')
    value, ref = config[key], schema[key]
    if isinstance(ref, ml_collections.ConfigDict) and isinstance(value, ml_collections.ConfigDict):
      check_fields(value, ref, field)
    elif ref is not None and _value_kind(value) != _value_kind(ref):
      raise ConfigError(
        f'{field}: {value!r} is {_value_kind(value)}; this field takes '
        f'{_value_kind(ref)} (default {ref!r})'
      )


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks the fields that can go wrong; raises ConfigError naming the field. Returns config."""
  check_fields(config, base_config())
  _check(config.mode in MODES, 'mode', f'{config.mode!r} is not one of {MODES}')
  d, m, df, s, t = config.data, config.model, config.diffusion, config.sample, config.train
  _check(d.source in DATA_SOURCES, 'data.source', f'{d.source!r} is not one of {DATA_SOURCES}')
  if d.source == 'folder':
    _check(bool(d.dir), 'data.dir', 'source=folder needs a folder of images')
  if d.source == 'tfds':
    _check(bool(d.tfds_name), 'data.tfds_name', 'source=tfds needs a dataset name')
  _check(
    d.resolution >= 8 and d.resolution % 8 == 0,
    'data.resolution',
    f'{d.resolution} must be a positive multiple of 8',
  )

  _check(
    len(m.channel_mult) >= 1 and all(int(x) >= 1 for x in m.channel_mult),
    'model.channel_mult',
    f'{tuple(m.channel_mult)} must be positive integers',
  )
  levels = len(m.channel_mult)
  _check(
    d.resolution % (2 ** (levels - 1)) == 0,
    'model.channel_mult',
    f'{levels} levels halve {d.resolution} px {levels - 1} times, which is not an integer size',
  )
  resolutions = [d.resolution // 2**i for i in range(levels)]
  for r in m.attention_resolutions:
    _check(
      r in resolutions,
      'model.attention_resolutions',
      f'{r} px never occurs; the levels are {resolutions}',
    )
  _check(
    m.channels % m.num_groups == 0,
    'model.channels',
    f'{m.channels} is not divisible by num_groups={m.num_groups}',
  )
  for mult in m.channel_mult:
    _check(
      (m.channels * mult) % m.num_groups == 0,
      'model.channel_mult',
      f'channels*{mult} is not divisible by num_groups={m.num_groups}',
    )
    if m.attention_resolutions:
      _check(
        (m.channels * mult) % m.head_channels == 0,
        'model.head_channels',
        f'{m.head_channels} does not divide channels*{mult}={m.channels * mult}',
      )
  _check(m.num_res_blocks >= 1, 'model.num_res_blocks', 'must be >= 1')
  _check(0.0 <= m.dropout < 1.0, 'model.dropout', 'must be in [0, 1)')
  _check(0.0 <= m.cond_drop_prob < 1.0, 'model.cond_drop_prob', 'must be in [0, 1)')
  _check(m.dtype in DTYPES, 'model.dtype', f'{m.dtype!r} is not one of {DTYPES}')
  _check(m.param_dtype in DTYPES, 'model.param_dtype', f'{m.param_dtype!r} is not one of {DTYPES}')
  _check(
    m.attention_impl in ATTENTION_IMPLS,
    'model.attention_impl',
    f'{m.attention_impl!r} is not one of {ATTENTION_IMPLS}',
  )
  if m.conditional:
    _check(
      m.lq_concat or m.lq_encoder,
      'model.lq_concat',
      'a conditional model needs lq_concat or lq_encoder',
    )

  _check(
    df.schedule in SCHEDULES, 'diffusion.schedule', f'{df.schedule!r} is not one of {SCHEDULES}'
  )
  _check(
    df.parameterization in PARAMETERIZATIONS,
    'diffusion.parameterization',
    f'{df.parameterization!r} is not one of {PARAMETERIZATIONS}',
  )
  if df.residual:
    _check(m.conditional, 'diffusion.residual', 'a residual model needs a conditional model')
  _check(df.loss in LOSSES, 'diffusion.loss', f'{df.loss!r} is not one of {LOSSES}')
  _check(
    df.loss_weighting in LOSS_WEIGHTINGS,
    'diffusion.loss_weighting',
    f'{df.loss_weighting!r} is not one of {LOSS_WEIGHTINGS}',
  )

  for name, sc in (('sample', s), ('clean', config.clean)):
    _check(sc.sampler in SAMPLERS, f'{name}.sampler', f'{sc.sampler!r} is not one of {SAMPLERS}')
    _check(sc.steps >= 1, f'{name}.steps', 'must be >= 1')
    _check(0.0 < sc.t_start <= 1.0, f'{name}.t_start', f'{sc.t_start} must be in (0, 1]')
  if s.guidance_scale != 1.0:
    _check(
      m.conditional and m.cond_drop_prob > 0,
      'sample.guidance_scale',
      'guidance needs a conditional model trained with model.cond_drop_prob > 0',
    )
  _check(0.0 <= config.clean.fraction <= 1.0, 'clean.fraction', 'must be in [0, 1]')
  _check(config.clean.samples >= 1, 'clean.samples', 'must be >= 1')
  _check(
    config.clean.score in CLEAN_SCORES,
    'clean.score',
    f'{config.clean.score!r} is not one of {CLEAN_SCORES}',
  )

  _check(t.batch_size >= 1, 'train.batch_size', 'must be >= 1')
  _check(
    t.grad_accum_steps >= 1 and t.batch_size % t.grad_accum_steps == 0,
    'train.grad_accum_steps',
    f'{t.grad_accum_steps} must divide batch_size={t.batch_size}',
  )
  _check(
    t.lr_schedule in ('constant', 'cosine'),
    'train.lr_schedule',
    f'{t.lr_schedule!r} is not one of constant, cosine',
  )
  _check(0.0 <= t.ema_decay < 1.0, 'train.ema_decay', 'must be in [0, 1)')
  _check(t.max_seconds >= 0, 'train.max_seconds', 'must be >= 0 (0 = no time budget)')
  for k in ('log_every', 'sample_every', 'ckpt_every', 'keep_ckpts', 'num_steps'):
    _check(t[k] >= 1, f'train.{k}', 'must be >= 1')
  _check(
    config.extrinsic.init in ('finetune', 'scratch'),
    'extrinsic.init',
    f'{config.extrinsic.init!r} is not one of finetune, scratch',
  )
  _check(
    config.degradation.preset in PRESETS,
    'degradation.preset',
    f'{config.degradation.preset!r} is not one of {PRESETS}',
  )
  for k in (
    'blur_sigma',
    'scale',
    'noise_sigma',
    'jpeg_quality',
    'brightness',
    'contrast',
    'saturation',
    'hue',
  ):
    lo, hi = config.degradation[k]
    _check(lo <= hi, f'degradation.{k}', f'low {lo} > high {hi}')
  _check(config.degradation.kernel_size % 2 == 1, 'degradation.kernel_size', 'must be odd')
  _check(0.0 <= config.degradation.mild_share <= 1.0, 'degradation.mild_share', 'must be in [0, 1]')
  _check(
    0.0 <= config.degradation.mild.identity_prob <= 1.0,
    'degradation.mild.identity_prob',
    'must be in [0, 1]',
  )
  for k in ('blur_sigma', 'scale', 'noise_sigma', 'jpeg_quality'):
    lo, hi = config.degradation.mild[k]
    _check(lo <= hi, f'degradation.mild.{k}', f'low {lo} > high {hi}')
  return config


# The config bound to the config-free libraries, in this one place.


def build_model(model_cfg: ml_collections.ConfigDict, resolution: int) -> unet.UNet:
  """The UNet that `config.model` describes (validated), at image size `resolution`."""
  m = model_cfg
  return unet.UNet(
    resolution=int(resolution),
    channels=int(m.channels),
    channel_mult=tuple(int(x) for x in m.channel_mult),
    num_res_blocks=int(m.num_res_blocks),
    attention_resolutions=tuple(int(r) for r in m.attention_resolutions),
    head_channels=int(m.head_channels),
    dropout=float(m.dropout),
    resblock_updown=bool(m.resblock_updown),
    scale_shift_norm=bool(m.scale_shift_norm),
    num_groups=int(m.num_groups),
    conditional=bool(m.conditional),
    lq_concat=bool(m.lq_concat),
    lq_encoder=bool(m.lq_encoder),
    lq_encoder_channels=int(m.lq_encoder_channels),
    out_channels=int(m.out_channels),
    dtype=unet.DTYPE_OF[m.dtype],
    param_dtype=unet.DTYPE_OF[m.param_dtype],
    remat=bool(m.remat),
    attention_impl=str(m.attention_impl),
  )


def sampling_model(diffusion_cfg: ml_collections.ConfigDict) -> dict:
  """What `samplers.sample_batch` needs to know of config.diffusion: what the model predicts and
  whether it denoises the residual HQ - LQ."""
  return dict(
    parameterization=str(diffusion_cfg.parameterization), residual=bool(diffusion_cfg.residual)
  )


def logsnr_fn(diffusion_cfg: ml_collections.ConfigDict, resolution: int) -> schedules.LogSnrFn:
  """config.diffusion's noise schedule at image size `resolution`."""
  return schedules.get_logsnr_fn(
    diffusion_cfg.schedule,
    resolution,
    logsnr_min=diffusion_cfg.logsnr_min,
    logsnr_max=diffusion_cfg.logsnr_max,
    shift_base_resolution=diffusion_cfg.shift_base_resolution,
  )


def loss_spec(diffusion_cfg: ml_collections.ConfigDict) -> objectives.LossSpec:
  """config.diffusion's training loss."""
  return objectives.LossSpec(
    parameterization=diffusion_cfg.parameterization,
    loss=diffusion_cfg.loss,
    loss_weighting=diffusion_cfg.loss_weighting,
    min_snr_gamma=float(diffusion_cfg.min_snr_gamma),
  )


def sample_settings(sample_cfg: ml_collections.ConfigDict, **overrides) -> samplers.Settings:
  """config.sample (or config.clean) as sampler settings; overrides that are None keep the
  config's value."""
  f = dict(
    sampler=sample_cfg.sampler,
    steps=sample_cfg.steps,
    eta=sample_cfg.get('eta', 0.0),
    t_start=sample_cfg.t_start,
    guidance_scale=sample_cfg.get('guidance_scale', 1.0),
  )
  f.update({k: v for k, v in overrides.items() if v is not None})
  return samplers.Settings(
    sampler=str(f['sampler']),
    steps=int(f['steps']),
    eta=float(f['eta']),
    t_start=float(f['t_start']),
    guidance_scale=float(f['guidance_scale']),
  )


def _tuples(x):
  if isinstance(x, dict):
    return {k: _tuples(v) for k, v in x.items()}
  if isinstance(x, list):
    return tuple(_tuples(v) for v in x)
  return x


def to_json(config: ml_collections.ConfigDict) -> str:
  return config.to_json(indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
  """Inverse of to_json; JSON lists come back as tuples, as the configs write them. A field the
  text lacks (a config saved before the field existed) takes its default from base_config(),
  whose defaults keep the behaviour of the code that wrote it."""
  return ml_collections.ConfigDict(_completed(_tuples(json.loads(text)), base_config().to_dict()))


def _completed(saved: dict, defaults: dict) -> dict:
  out = dict(saved)
  for key, default in defaults.items():
    if key not in out:
      out[key] = default
    elif isinstance(default, dict) and isinstance(out[key], dict):
      out[key] = _completed(out[key], default)
  return out
