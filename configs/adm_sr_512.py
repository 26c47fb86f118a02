"""Benchmark parity: guided-diffusion's SuperResModel at 512 px (34.3 M params in PyTorch); the
layout is adm_sr_256.py's."""

from idm_jax.runtime import configlib


def get_config():
  return configlib.config_file(__file__, 'adm_sr_256.py').adm_sr(
    resolution=512, channels=64, batch_size=8
  )
