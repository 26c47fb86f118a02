# Same as steps_per_call_scan.py, with platform_ops.conv_general_dilated calling cpu_conv directly (no platform_dependent).
import sys, runpy
from idm_jax.models import platform_ops as po
from jax import lax
orig = po.lax.platform_dependent
import types; po.lax = types.SimpleNamespace(**{k: getattr(lax, k) for k in dir(lax) if not k.startswith('__')})
po.lax.platform_dependent = lambda *args, cpu, default: cpu(*args)
sys.argv = ['scan.py'] + sys.argv[1:]
runpy.run_path('/tmp/ab/scan.py', run_name='__main__')
