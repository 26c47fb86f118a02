"""Benchmark parity: guided-diffusion's SuperResModel at 256 px (133.0 M params in PyTorch)."""
from idm_jax import configlib


def get_config():
  return configlib.adm_sr_config(resolution=256, channels=128, batch_size=16)
