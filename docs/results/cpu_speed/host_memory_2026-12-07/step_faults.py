import os, sys, resource, time, ctypes, jax
if os.environ.get('MALLOPT'):
  libc = ctypes.CDLL('libc.so.6')
  n = int(os.environ['MALLOPT'])
  print('mallopt arena', libc.mallopt(-8, 1), 'mmap', libc.mallopt(-3, n), 'trim', libc.mallopt(-1, n))
from bench import train_step
from idm_jax.runtime import configlib
config = configlib.load(sys.argv[1])
trainer, state, batch = train_step.setup(config)
fn, arg, arg_spec = train_step.part_program('step', trainer, batch, trainer.batch_spec(config.train.batch_size))
compiled = train_step.compile_part(fn, trainer, arg_spec)
state, _, _ = train_step.time_steps(compiled, state, arg, warmup=2, steps=1)
for _ in range(int(sys.argv[2]) if len(sys.argv) > 2 else 3):
  r0 = resource.getrusage(resource.RUSAGE_SELF); t = time.perf_counter()
  state, m = compiled(state, arg); jax.block_until_ready((state, m))
  dt = time.perf_counter() - t; r1 = resource.getrusage(resource.RUSAGE_SELF)
  print(f'{dt*1e3:.0f} ms, minor faults {r1.ru_minflt-r0.ru_minflt}, sys {1e3*(r1.ru_stime-r0.ru_stime):.0f} ms, user {1e3*(r1.ru_utime-r0.ru_utime):.0f} ms', flush=True)
