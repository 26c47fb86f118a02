"""FLOP counting from the architecture: walk a function's jaxpr and count the matmul-class ops.

Independent of XLA's cost model, so it cross-checks `compiled.cost_analysis()`. Counts 2*MACs
of convolutions and dot_generals (elementwise ops are ignored: they are memory-bound and a
few percent of a UNet's FLOPs).
"""

import math

import jax
from jax.extend import core


def _conv_flops(eqn) -> int:
  rhs = eqn.invars[1].aval
  dn = eqn.params['dimension_numbers']
  # rhs spec is (out features, in features per group, *spatial): each output element is one
  # dot product of length in_per_group * kernel area.
  k_in = rhs.shape[dn.rhs_spec[1]]
  k_spatial = math.prod(rhs.shape[d] for d in dn.rhs_spec[2:])
  return 2 * math.prod(eqn.outvars[0].aval.shape) * k_in * k_spatial


def _dot_flops(eqn) -> int:
  lhs = eqn.invars[0].aval
  (lc, _), _ = eqn.params['dimension_numbers']
  contract = math.prod(lhs.shape[d] for d in lc)
  out = eqn.outvars[0].aval
  return 2 * math.prod(out.shape) * contract


def jaxpr_flops(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'conv_general_dilated':
      total += _conv_flops(eqn)
    elif name == 'dot_general':
      total += _dot_flops(eqn)
    elif name == 'cond':
      # One branch runs. The UNet's per-platform branches (idm_jax/models/platform_ops.py) are
      # one computation written two ways: the architecture's count is the lesser (the CPU's
      # kernel gradient also multiplies the padding rows, which the convolution never does).
      total += min(jaxpr_flops(b.jaxpr) for b in eqn.params['branches'])
      continue
    for sub in _subjaxprs(eqn):
      mult = eqn.params.get('length', 1) if name == 'scan' else 1
      total += mult * jaxpr_flops(sub)
  return total


def _subjaxprs(eqn):
  for v in eqn.params.values():
    vals = v if isinstance(v, (tuple, list)) else (v,)
    for x in vals:
      if isinstance(x, core.ClosedJaxpr):
        yield x.jaxpr
      elif isinstance(x, core.Jaxpr):
        yield x


def count_flops(fn, *args) -> int:
  """2*MACs of every conv and matmul that `fn(*args)` traces."""
  return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)
