"""Real faces at 128 px: ../shared/data/celeba_hq128_dev (first 800 train, last 100 validation)."""
from idm_jax import configlib


def get_config():
  return configlib.celeba_128_config()
