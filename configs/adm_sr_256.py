"""Benchmark parity: guided-diffusion's SuperResModel at 256 px (133.0 M params in PyTorch).

LQ at 1/4 size, upsampled inside the model and concatenated; no LQ encoder. adm_sr_512.py is
the same layout at 512 px.
"""

import ml_collections

from idm_jax.runtime import configlib


def adm_sr(resolution: int, channels: int, batch_size: int) -> ml_collections.ConfigDict:
  c = configlib.base_config()
  c.data.update(source='tfds', tfds_name=f'idm_faces/ffhq{resolution}', resolution=resolution)
  c.model.update(
    channels=channels,
    channel_mult=(1, 1, 2, 2, 4, 4),
    num_res_blocks=2,
    attention_resolutions=(32, 16),
    head_channels=64,
    resblock_updown=True,
    scale_shift_norm=True,
    dropout=0.0,
    lq_concat=True,
    lq_encoder=False,
    out_channels=3,
  )
  c.diffusion.parameterization = 'eps'
  c.train.update(batch_size=batch_size, weight_decay=0.0)
  return c


def get_config():
  return adm_sr(resolution=256, channels=128, batch_size=16)
