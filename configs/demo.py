"""CPU quick start: a small model on three built-in faces (no download, no extra to install).

python -m idm_jax.main --config=configs/demo.py --workdir=workdirs/demo
The faces (idm_jax/data/sources.py) are scikit-image's two sample portraits and one that ships
with idm_jax, so a plain `pip install .` runs it.
Under five minutes on 2 CPU cores (docs/PERFORMANCE.md); point it at your own faces with
--config.data.source=folder --config.data.dir=DIR (and a larger --config.data.resolution).
The grid's quality follows the number of training images; 32 px and no channel doubling at
16 px keep a step cheap, so that as many as fit five minutes train. docs/PERFORMANCE.md has the
variants that chose this recipe.
"""

from idm_jax.runtime import configlib


def get_config():
  c = configlib.base_config()
  c.data.source = 'builtin'
  c.data.resolution = 32
  c.model.update(
    channels=32,
    channel_mult=(1, 1, 2),
    num_res_blocks=1,
    attention_resolutions=(8,),
    head_channels=32,
    num_groups=8,
    lq_encoder_channels=16,
    dtype='float32',
  )
  c.sample.update(steps=20, batch_size=8)
  c.train.update(
    batch_size=12,
    num_steps=400,
    warmup_steps=50,
    learning_rate=1e-3,
    ema_decay=0.999,
    ema_warmup=True,
    log_every=25,
    sample_every=200,
    ckpt_every=200,
    num_vis=8,
    vis_steps=20,
  )
  c.eval.update(num_images=8, steps=(20,), batch_size=8)
  c.clean.update(steps=20, batch_size=8)
  c.generate.update(num_samples=16, batch_size=8)
  return c
