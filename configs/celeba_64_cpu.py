"""Real faces at 64 px on two CPU cores: ../shared/data/celeba_hq128_dev (first 800 train,
last 100 validation), a model sized so that an hour of training restores the validation faces
better than their LQ inputs. docs/RESULTS.md has the ablation that chose x0 prediction of the
residual HQ - LQ: at this budget it is what turns a loss against the LQ into a win, and the
model's one-step estimate is its most faithful restoration.

python -m idm_jax.main --config=configs/celeba_64_cpu.py --workdir=workdirs/c64 \
    --config.train.max_seconds=3600
"""

from idm_jax.runtime import configlib


def get_config():
  c = configlib.config_file(__file__, 'celeba_128.py').get_config()
  c.data.update(resolution=64, num_workers=0)
  c.model.update(
    channels=32,
    channel_mult=(1, 2, 2, 2),
    num_res_blocks=1,
    attention_resolutions=(8,),
    head_channels=32,
    num_groups=8,
    lq_encoder_channels=16,
    dtype='float32',
  )
  c.diffusion.update(parameterization='x0', residual=True)
  c.sample.update(steps=1, batch_size=50)
  c.train.update(
    batch_size=16,
    num_steps=1_000_000,
    warmup_steps=100,
    learning_rate=1e-3,
    ema_decay=0.999,
    ema_warmup=True,
    log_every=50,
    sample_every=1000,
    ckpt_every=500,
    num_vis=8,
    vis_steps=1,
  )
  c.eval.update(num_images=100, steps=(1, 4), batch_size=50)
  # A share of mild and undamaged pairs, and cleaning from the half-noised input: a restorer
  # that leaves a clean face alone, so it can clean its own training set (docs/RESULTS.md,
  # "A restorer that leaves clean faces alone"). Each cleaned face is the mean of 16 draws: a
  # single draw's invented detail moves the face's identity; the mean keeps only what every
  # draw agrees on.
  c.degradation.mild_share = 0.3
  c.degradation.mild.identity_prob = 0.3
  c.clean.update(batch_size=50, steps=1, t_start=0.5, samples=16, score='artifacts')
  return c
