"""FFHQ at 256 px (prepare it first: python -m idm_jax.data.prepare --resolution 256 ...)."""

from idm_jax.runtime import configlib


def get_config():
  c = configlib.base_config()
  c.data.update(source='tfds', tfds_name='idm_faces/ffhq256', resolution=256, num_workers=8)
  c.model.update(
    channels=128,
    channel_mult=(1, 1, 2, 2, 4, 4),
    num_res_blocks=2,
    attention_resolutions=(32, 16),
    head_channels=64,
    lq_encoder_channels=32,
  )
  c.train.update(batch_size=64, num_steps=300_000, learning_rate=1e-4)
  c.sample.update(steps=25)
  return c
