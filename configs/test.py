"""Tiny model and data for unit tests: compiles in seconds on a CPU."""

from idm_jax.runtime import configlib


def get_config():
  c = configlib.base_config()
  c.data.source = 'builtin'
  c.data.resolution = 32
  c.model.update(
    channels=16,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(16,),
    head_channels=16,
    num_groups=8,
    lq_encoder_channels=8,
    dtype='float32',
  )
  c.sample.update(steps=4, batch_size=4)
  c.train.update(
    batch_size=4,
    num_steps=4,
    warmup_steps=2,
    learning_rate=1e-3,
    ema_decay=0.9,
    log_every=1,
    sample_every=2,
    ckpt_every=2,
    num_vis=4,
    vis_steps=2,
  )
  c.eval.update(num_images=4, steps=(2,), batch_size=4)
  c.clean.update(steps=2, batch_size=4)
  c.generate.update(num_samples=4, batch_size=4)
  return c
