"""The "beyond" experiment at CPU scale: a 32 px unconditional generator on celeba_hq128_dev.

configs/ffhq_generation.py is the experiment at celeba_128 scale (an accelerator's job); this is
the same UNet with no LQ input, shrunk so that a fixed number of steps takes about 20 minutes on
2 CPU cores. experiments/generation.sh trains it on the original faces and on a cleaned version with
the same steps and seed, and compares the samples.
"""

from idm_jax.runtime import configlib


def get_config():
  c = configlib.config_file(__file__, 'celeba_128.py').get_config()
  c.data.update(resolution=32, num_workers=0)
  c.model.update(
    conditional=False,
    lq_concat=False,
    lq_encoder=False,
    channels=32,
    channel_mult=(1, 2, 2),
    num_res_blocks=1,
    attention_resolutions=(8,),
    head_channels=32,
    num_groups=8,
    dtype='float32',
  )
  c.sample.update(sampler='ddim', steps=50, batch_size=50)
  c.train.update(
    batch_size=32,
    num_steps=1500,
    warmup_steps=100,
    learning_rate=1e-3,
    ema_decay=0.999,
    ema_warmup=True,
    log_every=50,
    sample_every=500,
    ckpt_every=500,
    num_vis=16,
    vis_steps=50,
  )
  c.generate.update(num_samples=300, batch_size=50)
  return c
