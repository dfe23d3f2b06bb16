"""Checks shared by the interop tests."""
import math

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax import structured
from lowrank_jax import targeting
from lowrank_jax import testing

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


def init_perturbed(adapter, make_params):
  """(params, base, state): `make_params()` (compiled: an eager model init compiles op by op),
  `adapter.init` on them (eager: some inits check values) and every trainable leaf perturbed off
  its init."""
  params = jax.jit(make_params)()
  base, state = adapter.init(jax.random.key(1), params)
  return params, base, jax.jit(testing.perturb)(state, jax.random.key(2))


def adapted_kernels(params, kernel_axes) -> dict:
  """{path: (dense shape, number of input axes)} of the structured leaves of `params`."""
  found = {}

  def collect(path, leaf):
    if isinstance(leaf, structured.Structured):
      p = "/".join(str(k.key) for k in path)
      axes = targeting.kernel_axes(p, tuple(leaf.shape), kernel_axes)
      found[p] = (tuple(leaf.shape), len(axes.in_axes))
  jax.tree_util.tree_map_with_path(collect, params, is_leaf=structured.is_structured)
  return found


def kernel_shapes(kernels: dict) -> set:
  """The full shapes of the adapted kernels {path: (shape, in_ndim)}, their (d_in, d_out) and the
  transposes of both (a weight gradient may come out transposed)."""
  out = set()
  for shape, in_ndim in kernels.values():
    for s in (tuple(shape), (math.prod(shape[:in_ndim]), math.prod(shape[in_ndim:]))):
      out.update((s, s[::-1]))
  return out


def assert_trees_close(a, b, rtol=1e-5, *, norm=False):
  """Leafwise |a − b| <= rtol·(|b| + max|b|) (relative, with the leaf's scale as the floor), or
  with `norm` ‖a − b‖ <= rtol·‖b‖ per leaf (for bf16, where single entries round far apart)."""
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if norm:
      assert np.linalg.norm(x - y) <= rtol * np.linalg.norm(y), (np.linalg.norm(x - y),
                                                                 np.linalg.norm(y))
    else:
      np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * float(np.abs(y).max()))


def compare_paths(forward, trainable, kernels: dict, *, rtol=1e-5, grad_rtol=None,
                  dtype=jnp.float32):
  """`forward(trainable, merged)` of the factored path (merged=False) vs the merged path: outputs
  and adapter gradients agree to `rtol` (`grad_rtol`, default `rtol`), outputs have `dtype`; the
  factored path's gradient jaxpr has no product of an adapted kernel's shape, the merged path's
  has (so the check can fail).

  Both paths' (output, gradient) in one compiled function; the gradient is the VJP of a fixed
  random cotangent. Below float32 (`dtype` bf16) the comparison is of per-leaf norms.
  """
  shape = jax.eval_shape(lambda t: forward(t, True), trainable).shape
  cot = jax.random.normal(jax.random.key(3), shape)

  def out_and_grad(merged):
    def f(t):
      out, vjp = jax.vjp(lambda tt: forward(tt, merged).astype(jnp.float32), t)
      return out, vjp(cot)[0]
    return f

  dense = kernel_shapes(kernels)
  assert not product_shapes(out_and_grad(False), trainable) & dense
  assert product_shapes(out_and_grad(True), trainable) & dense
  both = jax.jit(lambda t: (out_and_grad(False)(t), out_and_grad(True)(t)))
  (out, grad), (ref, ref_grad) = both(trainable)
  assert jax.eval_shape(lambda t: forward(t, False), trainable).dtype == dtype
  low_precision = jnp.finfo(dtype).bits < 32
  assert_trees_close(out, ref, rtol, norm=low_precision)
  assert_trees_close(grad, ref_grad, grad_rtol or rtol, norm=low_precision)
