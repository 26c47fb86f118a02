"""CPU quick start: a small model on the faces that pip packages ship (no download).

python -m idm_jax.main --config=configs/demo.py --workdir=workdirs/demo
Point it at your own faces with --config.data.source=folder --config.data.dir=DIR.
"""
from idm_jax import configlib


def get_config():
  c = configlib.base_config()
  c.data.source = 'builtin'
  c.data.resolution = 64
  c.model.update(channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                 attention_resolutions=(16,), head_channels=32, num_groups=8,
                 lq_encoder_channels=16, dtype='float32')
  c.sample.update(steps=10, batch_size=8)
  c.train.update(batch_size=8, num_steps=300, warmup_steps=50, learning_rate=5e-4,
                 ema_decay=0.99, log_every=25, sample_every=150, ckpt_every=150, num_vis=8,
                 vis_steps=10)
  c.eval.update(num_images=8, steps=(10,), batch_size=8)
  c.clean.update(steps=10, batch_size=8)
  c.generate.update(num_samples=16, batch_size=8)
  return c
