"""Factored adapters on unmodified Flax models: `linen_apply` (linen), `nnx_merge` and
`nnx_route` (nnx).

Structured weights (`lowrank_jax.structured`) stand where a stock model's kernels stood; these entry
points run the stock layers' products through them (factored) instead of merging them.
"""
from lowrank_jax.interop.linen import linen_apply
from lowrank_jax.interop.nnx import nnx_merge, nnx_route

__all__ = ["linen_apply", "nnx_merge", "nnx_route"]
