import os, sys, resource, time, jax, jax.numpy as jnp
from jax import lax
from bench import train_step
from idm_jax.runtime import configlib
config = configlib.load(sys.argv[1]); K = int(sys.argv[2])
trainer, state, batch = train_step.setup(config)
one, arg, arg_spec = train_step.part_program('step', trainer, batch, trainer.batch_spec(config.train.batch_size))
t=time.perf_counter(); c1 = train_step.compile_part(one, trainer, arg_spec); print('compile 1', time.perf_counter()-t, 'temp MB', c1.memory_analysis().temp_size_in_bytes/2**20, flush=True)
def many(s, bs):
  s, ms = lax.scan(lambda s, b: one(s, b), s, bs)
  return s, jax.tree.map(lambda m: m[-1], ms)
stack = lambda x: jnp.stack([x] * K)
args = jax.tree.map(stack, arg)
specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct((K,) + x.shape, x.dtype, sharding=x.sharding), arg_spec)
t=time.perf_counter(); cK = jax.jit(many, donate_argnums=0, compiler_options=trainer.compiler_options).lower(trainer.abstract_state, specs).compile(); print('compile K', time.perf_counter()-t, 'temp MB', cK.memory_analysis().temp_size_in_bytes/2**20, flush=True)
for f, a, n in ((c1, arg, 1), (cK, args, K)):
  t=time.perf_counter(); state, _ = f(state, a); jax.block_until_ready(state); print('first call', n, time.perf_counter()-t, flush=True)
for r in range(int(os.environ.get('ROUNDS', 3))):
  for f, a, n in ((c1, arg, 1), (cK, args, K)):
    calls = K // n
    r0 = resource.getrusage(resource.RUSAGE_SELF); t = time.perf_counter()
    for _ in range(calls):
      state, m = f(state, a)
    jax.block_until_ready((state, m))
    dt = time.perf_counter() - t; r1 = resource.getrusage(resource.RUSAGE_SELF)
    print(f'{n} per call: {dt*1e3/K:.0f} ms/step, faults/step {(r1.ru_minflt-r0.ru_minflt)/K:.0f}, sys/step {1e3*(r1.ru_stime-r0.ru_stime)/K:.0f} ms', flush=True)
