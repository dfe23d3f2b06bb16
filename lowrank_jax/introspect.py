"""Looking at adapters: `describe` (a table of matched paths) and `unmerge`."""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from lowrank_jax import base as base_lib
from lowrank_jax import structured
from lowrank_jax import tree as tree_lib


def describe(adapter: base_lib.Adapter, params: Any, stats: Optional[Any] = None, *,
             partition_rules=None, mesh_sizes=None) -> str:
  """A table of the adapter's state per path: shapes and trainable / frozen counts.

  Runs `adapter.init` abstractly (`jax.eval_shape`), so nothing is computed or allocated. With
  `partition_rules` (e.g. `models.get_model(name).partition_rules`), the sharding of the params
  and of the adapter's trainable leaves follows (`sharding.describe`; `mesh_sizes` such as
  `{"data": 1, "fsdp": 2, "tensor": 4}` adds per-device shard shapes).

  >>> import jax.numpy as jnp, lowrank_jax as lj
  >>> params = {'layer': {'kernel': jnp.ones((8, 8))}}
  >>> print(lj.describe(lj.lora(rank=2, targets='layer/kernel'), params))
  lora: 1 adapted paths
  path           trainable    frozen  shapes
  layer/kernel          32         0  8x2, 2x8
  trainable 32 of 64 params (50.000%)
  """
  _, state = jax.eval_shape(lambda k: adapter.init(k, params, stats), jax.random.key(0))
  rows = []
  trainable = tree_lib.unnest(state.trainable) if isinstance(state.trainable, dict) else \
      {"": state.trainable}
  frozen = tree_lib.unnest(state.frozen) if isinstance(state.frozen, dict) else {"": state.frozen}
  for path in sorted(set(trainable) | set(frozen)):
    t, f = trainable.get(path), frozen.get(path)
    shapes = ", ".join("x".join(map(str, x.shape)) or "()" for x in jax.tree_util.tree_leaves(t))
    rows.append((path, shapes, tree_lib.tree_size(t) if t is not None else 0,
                 tree_lib.tree_size(f) if f is not None else 0))
  total_params = tree_lib.tree_size(params)
  n_train = base_lib.count_params(state)
  w = max([len(r[0]) for r in rows] + [4])
  lines = [f"{adapter.name}: {len(rows)} adapted paths",
           f"{'path':<{w}}  {'trainable':>10}  {'frozen':>8}  shapes"]
  for path, shapes, nt, nf in rows:
    lines.append(f"{path:<{w}}  {nt:>10,}  {nf:>8,}  {shapes}")
  lines.append(f"trainable {n_train:,} of {total_params:,} params "
               f"({100.0 * n_train / max(total_params, 1):.3f}%)")
  if partition_rules is not None:
    from lowrank_jax import sharding  # pylint: disable=g-import-not-at-top
    lines.append(sharding.describe(params, partition_rules, mesh_sizes, state.trainable))
  return "\n".join(lines)


def unmerge(merged: Any, adapter: base_lib.Adapter, state: base_lib.AdapterState) -> Any:
  """Recovers the frozen base from merged params: `W_base = W_merged - ΔW(state)` per leaf.

  The inverse of `merge(adapter.apply(base, state))` (PEFT's unmerge); re-running `apply` on the
  result gives the adapted model again.
  """
  adapted = adapter.apply(merged, state)

  def sub(m, a):
    if a is m:
      return m
    dense = structured.materialize(a)
    return (2.0 * m.astype(jnp.float32) - dense.astype(jnp.float32)).astype(m.dtype)

  return jax.tree_util.tree_map(sub, merged, adapted, is_leaf=structured.is_structured)
