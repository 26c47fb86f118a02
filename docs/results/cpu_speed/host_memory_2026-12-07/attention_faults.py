import resource, time, jax, jax.numpy as jnp, numpy as np
from idm_jax.models import platform_ops as po
B,T,H,D = 4,1024,2,64
rng = np.random.default_rng(0)
q,k,v,g = (jnp.asarray(rng.standard_normal((B,T,H,D)), jnp.float32) for _ in range(4))
f = jax.jit(jax.grad(lambda q,k,v: jnp.vdot(po.softmax_attention(q,k,v), g), argnums=(0,1,2)), compiler_options=po.compiler_options("cpu"))
for _ in range(3): jax.block_until_ready(f(q,k,v))
for _ in range(5):
  r0 = resource.getrusage(resource.RUSAGE_SELF); t=time.perf_counter()
  jax.block_until_ready(f(q,k,v))
  dt=time.perf_counter()-t; r1 = resource.getrusage(resource.RUSAGE_SELF)
  print(f'{dt*1e3:.1f} ms, minor faults {r1.ru_minflt-r0.ru_minflt}, sys {1e3*(r1.ru_stime-r0.ru_stime):.1f} ms')
