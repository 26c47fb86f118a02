"""FFHQ at 512 px, the production-size restoration model."""

from idm_jax.runtime import configlib


def get_config():
  c = configlib.base_config()
  c.data.update(source='tfds', tfds_name='idm_faces/ffhq512', resolution=512, num_workers=16)
  c.model.update(
    channels=64,
    channel_mult=(1, 1, 2, 2, 4, 4, 8),
    num_res_blocks=2,
    attention_resolutions=(32, 16),
    head_channels=64,
    lq_encoder_channels=32,
  )
  c.diffusion.update(schedule='shifted_cosine', shift_base_resolution=128)
  c.train.update(batch_size=32, num_steps=500_000, learning_rate=1e-4)
  c.sample.update(steps=25, batch_size=16)
  return c
