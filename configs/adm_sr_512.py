"""Benchmark parity: guided-diffusion's SuperResModel at 512 px (34.3 M params in PyTorch)."""
from idm_jax import configlib


def get_config():
  return configlib.adm_sr_config(resolution=512, channels=64, batch_size=8)
