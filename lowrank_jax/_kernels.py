"""The rank-r branch `scale * (x @ a) @ b` with a hand-written backward.

JAX's default backward for the factored product lets XLA pick contraction orders and layouts that,
composed in a whole model on CPU, cost more than a full weight gradient: LoRA r8 on every linear
layer of MiniLM took 1.13x a full fine-tuning step with it, 0.60x with this kernel
(`python -m experiments.bench`, the README's step-time table). The custom VJP states the backward
as explicit skinny contractions:
  gb = g @ b.T            (T, r)
  da = x.T @ (s * gb)     (d_in, r)
  db = (s * h).T @ g      (r, d_out)
  dx = (s * gb) @ a.T     (T, d_in)
  ds = sum(h * gb)
and never forms a d_in x d_out array. The same kernel, with a vector d in place of the scalar
scale, is SORSA's and LoLDU's diagonal-scaled branch (`diag_branch`).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


@jax.custom_vjp
def _branch2d(x, a, d, b):
  return ((x @ a) * d) @ b


def _branch2d_fwd(x, a, d, b):
  h = x @ a
  return (h * d) @ b, (x, h, a, d, b)


def _branch2d_bwd(res, g):
  x, h, a, d, b = res
  gb = g @ b.T                       # (T, r)
  gbd = gb * d
  da = x.T @ gbd                     # (d_in, r)
  db = (h * d).T @ g                 # (r, d_out)
  dx = gbd @ a.T                     # (T, d_in)
  dd = jnp.sum(h.astype(jnp.float32) * gb.astype(jnp.float32), axis=0)
  dd = dd.sum() if d.ndim == 0 else dd
  return dx, da, dd.astype(d.dtype), db


_branch2d.defvjp(_branch2d_fwd, _branch2d_bwd)


def diag_branch(x, a, d, b):
  """`((x @ a) * d) @ b` with x (..., *in), a (*in, r), d () or (r,), b (r, *out) -> (..., *out).

  The scaled rank-r branch of LoRA (d = the scalar scale), SORSA and LoLDU (d = a trainable
  diagonal), with the backward above.
  """
  in_shape, r, out_shape = a.shape[:-1], a.shape[-1], b.shape[1:]
  lead = x.shape[:x.ndim - len(in_shape)]
  x2 = x.reshape(-1, math.prod(in_shape))
  y2 = _branch2d(x2, a.reshape(-1, r).astype(x.dtype), jnp.asarray(d, x.dtype),
                 b.reshape(r, -1).astype(x.dtype))
  return y2.reshape(lead + tuple(out_shape))


IMPLS = ("custom_vjp", "autodiff")


def check_impl(name: str, impl: str):
  """Raises a ValueError naming `name` unless `impl` is one of `IMPLS`."""
  if impl not in IMPLS:
    raise ValueError(f"{name}: impl={impl!r}; valid: 'custom_vjp', 'autodiff'")


def lowrank_branch(x, a, b, scale, impl: str = "custom_vjp"):
  """`scale * (x @ a) @ b` with x (..., *in), a (*in, r), b (r, *out); returns (..., *out)."""
  if impl == "autodiff":
    h = jnp.tensordot(x, a.astype(x.dtype), axes=a.ndim - 1)
    return jnp.tensordot(h * jnp.asarray(scale, x.dtype), b.astype(x.dtype), axes=1)
  check_impl("LowRank", impl)
  return diag_branch(x, a, scale, b)
