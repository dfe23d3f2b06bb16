"""Pieces shared by the SVD-form rank-allocation methods (IncreLoRA grows, AdaLoRA prunes): the
triplet state, the per-component gradient inner products and the rank-allocation log."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lowrank_jax import base as base_lib
from lowrank_jax import tree as tree_lib


class TripletFactors(NamedTuple):
  """Trainable per-module state of SVD-form adapters (IncreLoRA, AdaLoRA).

  a (*in_shape, R) = Aᵀ (PyTorch lora_A transposed), b (R, *out_shape) = Bᵀ, lam (R,) = E.
  """
  a: jax.Array
  b: jax.Array
  lam: jax.Array


def update_leaves(name: str, state: base_lib.AdapterState, grads) -> tuple[dict, dict, dict,
                                                                          list[str]]:
  """(trainable, frozen, grads) as `{path: leaf}` and their sorted paths, for `adapter.update`.

  Raises:
    ValueError: the gradient tree does not cover the same paths as the state.
  """
  t, f, g = (tree_lib.unnest(x) for x in (state.trainable, state.frozen, grads))
  paths = sorted(t)
  if sorted(g) != paths or sorted(f) != paths:
    raise ValueError(f"{name}.update: grads/state paths differ ({sorted(g)[:3]} vs "
                     f"{paths[:3]}); pass the gradients of state.trainable")
  return t, f, g, paths


def component_inner(a, grad_a):
  """c_i·∂L/∂c_i = ⟨ΔW_i, ∂L/∂ΔW⟩ per slot, from the a-factor and its gradient: (R,)."""
  axes = tuple(range(a.ndim - 1))
  return jnp.sum(a.astype(jnp.float32) * grad_a.astype(jnp.float32), axis=axes)


def rank_allocation(state: base_lib.AdapterState) -> dict[str, int]:
  """`{path: active rank}` of an IncreLoRA or AdaLoRA state (for logging and plots).

  Works on a concrete state (outside jit); under jit use `rank_allocation_arrays`.
  """
  return {p: int(v) for p, v in rank_allocation_arrays(state).items()}


def rank_allocation_arrays(state: base_lib.AdapterState) -> dict[str, jax.Array]:
  """`{path: active rank as an int32 array}`; jittable."""
  frozen = tree_lib.unnest(state.frozen) if isinstance(state.frozen, dict) else {}
  out = {}
  for p, f in frozen.items():
    if not hasattr(f, "active_rank"):
      raise ValueError(f"rank_allocation: frozen state at {p} ({type(f).__name__}) is not from "
                       f"increlora or adalora")
    out[p] = jnp.asarray(f.active_rank(), jnp.int32)
  if not out:
    raise ValueError("rank_allocation: the state has no IncreLoRA/AdaLoRA buffers")
  return out
