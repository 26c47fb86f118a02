"""The 'beyond' experiment: the same UNet, unconditional, trained on a chosen dataset version.

Defaults to the celeba_128 scale; point data.* at a cleaned dataset version to compare.
"""

from idm_jax.runtime import configlib


def get_config():
  c = configlib.config_file(__file__, 'celeba_128.py').get_config()
  c.model.update(conditional=False, lq_concat=False, lq_encoder=False)
  c.sample.update(sampler='ddim', steps=50)
  return c
