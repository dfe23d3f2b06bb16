"""The rank-r branch `scale * (x @ a) @ b` with a hand-written backward.

JAX's default backward for the factored product lets XLA pick contraction orders and layouts that,
composed in a whole model on CPU, cost more than a full weight gradient (issue 2 profile). The
custom VJP states the backward as explicit skinny contractions:
  gb = g @ b.T            (T, r)
  da = x.T @ (s * gb)     (d_in, r)
  db = (s * h).T @ g      (r, d_out)
  dx = (s * gb) @ a.T     (T, d_in)
  ds = sum(h * gb)
and never forms a d_in x d_out array.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


@jax.custom_vjp
def _branch2d(x, a, b, scale):
  return ((x @ a) * scale) @ b


def _branch2d_fwd(x, a, b, scale):
  h = x @ a
  return (h * scale) @ b, (x, h, a, b, scale)


def _branch2d_bwd(res, g):
  x, h, a, b, scale = res
  gb = g @ b.T
  gbs = gb * scale
  da = x.T @ gbs
  db = (h * scale).T @ g
  dx = gbs @ a.T
  ds = jnp.sum(h.astype(jnp.float32) * gb.astype(jnp.float32))
  return dx, da, db, jnp.asarray(ds, jnp.result_type(scale)).reshape(jnp.shape(scale))


_branch2d.defvjp(_branch2d_fwd, _branch2d_bwd)


def lowrank_branch(x, a, b, scale, impl: str = "custom_vjp"):
  """`scale * (x @ a) @ b` with x (..., *in), a (*in, r), b (r, *out); returns (..., *out)."""
  in_shape, r, out_shape = a.shape[:-1], a.shape[-1], b.shape[1:]
  lead = x.shape[:x.ndim - len(in_shape)]
  a = a.astype(x.dtype)
  b = b.astype(x.dtype)
  scale = jnp.asarray(scale, x.dtype)
  if impl == "autodiff":
    h = jnp.tensordot(x, a, axes=len(in_shape))
    return jnp.tensordot(h * scale, b, axes=1)
  if impl != "custom_vjp":
    raise ValueError(f"LowRank impl={impl!r}; valid: 'custom_vjp', 'autodiff'")
  x2 = x.reshape(-1, math.prod(in_shape))
  y2 = _branch2d(x2, a.reshape(-1, r), b.reshape(r, -1), scale)
  return y2.reshape(lead + tuple(out_shape))
