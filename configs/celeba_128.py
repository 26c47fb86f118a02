"""Real faces at 128 px: ../shared/data/celeba_hq128_dev (first 800 train, last 100 val).

The base of the CelebA configs (celeba_64_cpu.py, generation_32_cpu.py, ffhq_generation.py).
"""

from idm_jax.runtime import configlib


def get_config():
  c = configlib.base_config()
  c.data.update(
    source='folder',
    dir='../shared/data/celeba_hq128_dev',
    num_val=100,
    resolution=128,
    num_workers=4,
  )
  c.model.update(
    channels=64,
    channel_mult=(1, 2, 2, 4, 4),
    num_res_blocks=2,
    attention_resolutions=(16, 8),
    head_channels=64,
    lq_encoder_channels=32,
  )
  c.sample.update(steps=25, batch_size=32)
  c.train.update(
    batch_size=32,
    num_steps=20_000,
    warmup_steps=500,
    learning_rate=2e-4,
    ema_decay=0.999,
    log_every=50,
    sample_every=1000,
    ckpt_every=1000,
    num_vis=8,
    vis_steps=25,
  )
  c.eval.update(num_images=100, steps=(10, 25), batch_size=50)
  c.clean.update(batch_size=50)
  return c
