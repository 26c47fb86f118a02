import sys, time, tempfile, collections, jax, jax.numpy as jnp
from jax import lax
from bench import train_step, step_profile as sp
from idm_jax.runtime import configlib
config = configlib.load(sys.argv[1]); K = 2
trainer, state, batch = train_step.setup(config)
one, arg, arg_spec = train_step.part_program('step', trainer, batch, trainer.batch_spec(config.train.batch_size))
def many(s, bs):
  s, ms = lax.scan(lambda s, b: one(s, b), s, bs)
  return s, jax.tree.map(lambda m: m[-1], ms)
args = jax.tree.map(lambda x: jnp.stack([x] * K), arg)
specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct((K,) + x.shape, x.dtype, sharding=x.sharding), arg_spec)
cK = jax.jit(many, donate_argnums=0, compiler_options=trainer.compiler_options).lower(trainer.abstract_state, specs).compile()
text = cK.as_text(); ins = sp.parse_hlo(text)
open('/tmp/ab/scan.hlo','w').write(text)
state, _ = cK(state, args); jax.block_until_ready(state)
d = tempfile.mkdtemp(); jax.profiler.start_trace(d); t=time.perf_counter(); state, m = cK(state, args); jax.block_until_ready((state, m)); print('call', time.perf_counter()-t); jax.profiler.stop_trace()
import gzip, json, os
path = max((os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs if f.endswith('.trace.json.gz')), key=os.path.getmtime)
ev = [e for e in json.load(gzip.open(path))['traceEvents'] if e.get('ph') == 'X']
tot = collections.Counter(); cnt = collections.Counter()
for e in ev: tot[e['name']] += e['dur']/1e3; cnt[e['name']] += 1
for n, ms in tot.most_common(15): print(f'{ms:9.1f} ms x{cnt[n]:4d} {n} {ins.get(n, ("",))[0]}')
