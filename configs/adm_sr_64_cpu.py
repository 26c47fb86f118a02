"""CPU parity: guided-diffusion's SuperResModel in the adm_sr_256.py layout at 64 px, float32,
batch 4 (128.1 M params), the layout `python -m bench.cpu_parity` times against PyTorch on the
same CPU (docs/PERFORMANCE.md, "The train step on the CPU")."""

from idm_jax.runtime import configlib

_adm = configlib.config_file(__file__, 'adm_sr_256.py')


def get_config():
  c = _adm.adm_sr(resolution=64, channels=128, batch_size=4)
  c.model.dtype = 'float32'
  return c
