"""Pieces shared by the low-rank methods: the LoRA-family factors and their `apply_leaf`, and the
orthonormality residuals of factor pairs (SORSA, IncreLoRA, AdaLoRA).

The structured weight they build is `structured.LowRank` (`base + scale·a@b`), the scalar case of
`structured.DiagLowRank` (`base + a diag(d) b`, also SORSA's and LoLDU's weight).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lowrank_jax import structured
from lowrank_jax.adapters import _leafwise


class LoRAFactors(NamedTuple):
  """Trainable per-leaf state: a `(*in_shape, r)`, b `(r, *out_shape)`."""
  a: jax.Array
  b: jax.Array


def lora_scale(rank: int, alpha: float, use_rslora: bool = False) -> float:
  return float(alpha) / (rank ** 0.5 if use_rslora else rank)


def validate_common(name: str, rank, alpha, dropout):
  _leafwise.check_int(name, "rank", rank)
  if alpha is not None and not alpha > 0:
    raise ValueError(f"{name}: alpha must be > 0, got {alpha!r}")
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"{name}: dropout must be in [0, 1), got {dropout!r}")


def factors_shape(t) -> tuple[int, ...]:
  """The kernel shape `(*in_shape, *out_shape)` implied by factors a (*in_shape, r), b (r, *out)."""
  return tuple(t.a.shape[:-1]) + tuple(t.b.shape[1:])


def lowrank_apply_leaf(name: str, scale: float, dropout: float, impl: str):
  """The `apply_leaf` of every method whose per-leaf state is `LoRAFactors` (LoRA, PiSSA, CorDA)."""

  def apply_leaf(path, base_leaf, t, f, rng):
    del f
    _leafwise.check_state_shape(name, path, base_leaf, factors_shape(t))
    return structured.LowRank(base_leaf, t.a, t.b, scale,
                              dropout_key=rng if dropout > 0 else None,
                              dropout_rate=dropout, impl=impl)

  return apply_leaf


def safe_frobenius(x: jax.Array) -> jax.Array:
  """Unsquared Frobenius norm whose gradient is 0 (not NaN) at x = 0."""
  ss = jnp.sum(jnp.square(x))
  pos = ss > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, ss, 1.0)), 0.0)


def orth_residuals(a, b, live=None):
  """(‖aᵀa − I‖_F, ‖b bᵀ − I‖_F) for a (*in, r), b (r, *out), unsquared, in at least float32.

  With `live` (r,) in {0, 1}, restricted to the slots where it is 1; None means all r slots.
  """
  r = a.shape[-1]
  dt = structured.compute_dtype(a, b)
  a2 = a.reshape(-1, r).astype(dt)
  b2 = b.reshape(r, -1).astype(dt)
  eye = jnp.eye(r, dtype=dt)
  ga = jnp.matmul(a2.T, a2, precision=jax.lax.Precision.HIGHEST)
  gb = jnp.matmul(b2, b2.T, precision=jax.lax.Precision.HIGHEST)
  if live is None:
    return safe_frobenius(ga - eye), safe_frobenius(gb - eye)
  live = live.astype(dt)
  m = live[:, None] * live[None, :]
  return safe_frobenius((ga - eye) * m), safe_frobenius((gb - eye) * m)
