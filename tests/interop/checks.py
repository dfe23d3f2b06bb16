"""Checks shared by the interop tests."""
import math

import jax
import numpy as np

PRODUCTS = ("dot_general", "conv_general_dilated")


def product_shapes(fn, *args) -> set:
  """Output shapes of every dot_general / conv in `fn`'s jaxpr, sub-jaxprs included."""
  found = set()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in PRODUCTS:
        found.update(tuple(v.aval.shape) for v in eqn.outvars)
      for sub in jax.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def kernel_shapes(kernels: dict) -> set:
  """The full shapes of the adapted kernels {path: (shape, in_ndim)} and their (d_in, d_out)."""
  out = set()
  for shape, in_ndim in kernels.values():
    out.add(tuple(shape))
    out.add((math.prod(shape[:in_ndim]), math.prod(shape[in_ndim:])))
  return out


def assert_trees_close(a, b, rtol=1e-5):
  """Leafwise |a − b| <= rtol·(|b| + max|b|): relative, with the leaf's scale as the floor."""
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * float(np.abs(y).max()))
