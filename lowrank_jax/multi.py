"""Per-example adapters: K adapters of one method in one batch, each example with its own.

A stack of K adapter states (`stack`: every leaf gains a leading K axis) is applied to the frozen
base by `apply`, which puts a `PerExample` structured weight where each adapted kernel stood. Its
factors carry the K axis, and an integer index per example (`with_index`, or
`llama.apply(..., adapter_index=...)`) picks each example's adapter. The product stays factored:
for an example b with index k,

    y_b = x_b @ W + ((x_b @ A_k) · d_k) @ B_k

so there are no K copies of the model and no dense ΔW (nor its gradient) in the step. The
gradient of a mixed-batch loss with respect to the stack holds, at slice k, the gradient of
adapter k on its own examples.

Index -1 runs an example through the base weights alone (no adapter). Any other value outside
[0, K) is refused by `with_index` when the index is concrete; under `jax.jit`, where values are
not known, such an example's adapted outputs are NaN, never a silently wrong number.

Supported methods: those whose structured weight is a `structured.DiagLowRank`,
`base + a diag(d) b` (LoRA, rsLoRA, PiSSA, CorDA, AdaLoRA, IncreLoRA, SORSA, LoLDU), also nested
by `chain`. Others (KronA, NOLA, FLoRA, intrinsic subspaces) have no factored per-example product
here: `apply` refuses them with a TypeError naming the leaf.

>>> import jax, jax.numpy as jnp, lowrank_jax as lj
>>> params = {'w': {'kernel': jnp.zeros((3, 2))}}
>>> adapter = lj.lora(rank=1, alpha=1.0, targets='w/kernel')
>>> base, _ = adapter.init(jax.random.key(0), params)
>>> factors = lambda c: lj.LoRAFactors(jnp.ones((3, 1)), c * jnp.ones((1, 2)))
>>> states = [lj.AdapterState({'w': {'kernel': factors(c)}}, {}) for c in (1.0, 2.0)]
>>> p = lj.multi.apply(adapter, base, lj.multi.stack(states), index=jnp.array([1, 0, -1]))
>>> lj.ops.dense(jnp.ones((3, 3)), p['w']['kernel']).tolist()   # rows: adapter 1, 0, none
[[6.0, 6.0], [3.0, 3.0], [0.0, 0.0]]
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax import base as base_lib
from lowrank_jax import structured

IMPLS = ("onehot", "gather")


@flax.struct.dataclass
class PerExample(structured.Structured):
  """`base + a_k diag(d_k) b_k` with k = the example's index: K factored updates of one kernel.

  Shapes: base `(*in_shape, *out_shape)`, a `(K, *in_shape, r)`, d `(K,)` or `(K, r)`,
  b `(K, r, *out_shape)`, index int `(*index_shape)`, a prefix of the input's leading (batch)
  axes: `(B,)` for one adapter per example, `(B, T)` for one per token.

  `impl` chooses the product: "gather" (the default) gathers each example's A_k, d_k, B_k and
  runs batched matmuls (the branch's own flops, B gathered factors); "onehot" computes
  `x @ [A_0 … A_{K-1}]` (one matmul with K·r columns), zeroes the blocks of the other adapters
  and multiplies by the stacked B (two plain matmuls, K times the branch's flops). On CPU, a
  training step of the small Llama preset with LoRA r8 on every linear layer and K = 4 took
  0.99x and 1.08x (two runs) the CPU time of a one-adapter step with "gather", 1.44x with
  "onehot" (`python -m experiments.bench_multi`). Embedding lookups
  (`embed`) take each token's row of every A_k and mix them one-hot, whatever `impl`.
  """
  base: Any
  a: jax.Array
  d: jax.Array
  b: jax.Array
  index: Any = None
  dropout_key: Any = None
  dropout_rate: float = flax.struct.field(pytree_node=False, default=0.0)
  impl: str = flax.struct.field(pytree_node=False, default="gather")

  @property
  def shape(self):
    return tuple(self.base.shape)

  @property
  def dtype(self):
    return self.base.dtype

  @property
  def num_adapters(self) -> int:
    return self.a.shape[0]

  def materialize(self):
    raise TypeError("PerExample: a stack of K adapters has no single dense value; merge one "
                    "adapter's params (adapter.apply(base, lj.multi.take(stacked, k))) instead")

  def conv(self, x, **conv_kwargs):
    raise TypeError("PerExample: per-example adapters run dense products and embedding lookups, "
                    "not convolutions")

  def _checked_index(self, lead: tuple[int, ...]) -> jax.Array:
    if self.index is None:
      raise ValueError("PerExample: no per-example index; pass adapter_index= to the model's "
                       "apply (llama.apply, generate) or bind it with lj.multi.with_index(params, "
                       "index)")
    n = self.index.ndim
    if tuple(self.index.shape) != tuple(lead[:n]):
      raise ValueError(f"PerExample: index of shape {tuple(self.index.shape)} must match the "
                       f"leading (batch) axes of the input, which are {tuple(lead)}")
    return self.index

  def _mix(self, index: jax.Array, dtype) -> jax.Array:
    """Per-position coefficients (*index_shape, K·r): d_k on example k's block, 0 elsewhere, NaN
    on every block for an index outside [-1, K)."""
    k, r = self.a.shape[0], self.a.shape[-1]
    d = jnp.broadcast_to(jnp.asarray(self.d, dtype).reshape(k, -1), (k, r))
    # NaN is added, not multiplied: XLA rewrites one_hot·x as a select, which drops a NaN factor.
    nan_if_invalid = jnp.where((index >= -1) & (index < k), 0, jnp.nan).astype(dtype)
    mix = jax.nn.one_hot(index, k, dtype=dtype)[..., None] * d + nan_if_invalid[..., None, None]
    return mix.reshape(index.shape + (k * r,))

  def matmul(self, x, in_ndim: int = 1):
    k, r = self.a.shape[0], self.a.shape[-1]
    in_shape, out_shape = self.a.shape[1:-1], self.b.shape[2:]
    if in_ndim != len(in_shape):
      raise ValueError(f"PerExample: the product contracts {in_ndim} input axes, the adapter's "
                       f"kernel has {len(in_shape)} (shape {self.shape})")
    lead = x.shape[:x.ndim - in_ndim]
    index = self._checked_index(lead)
    y = structured.dense(x, self.base, in_ndim=in_ndim)
    xb = structured.dropout(x, self.dropout_rate, self.dropout_key,
                            deterministic=self.dropout_key is None)
    n, d_in, d_out = index.size, math.prod(in_shape), math.prod(out_shape)
    x3 = xb.reshape(n, -1, d_in)
    a = self.a.astype(x.dtype).reshape(k, d_in, r)
    b = self.b.astype(x.dtype).reshape(k * r, d_out)
    mix = self._mix(index.reshape(n), x.dtype)                       # (n, K·r)
    if self.impl == "onehot":
      h = x3 @ a.transpose(1, 0, 2).reshape(d_in, k * r)              # (n, m, K·r)
      branch = (h * mix[:, None, :]) @ b
    elif self.impl == "gather":
      safe = jnp.clip(index.reshape(n), 0, k - 1)
      coef = jnp.take_along_axis(mix.reshape(n, k, r), safe[:, None, None], axis=1)[:, 0]
      h = jnp.einsum("nmi,nir->nmr", x3, jnp.take(a, safe, axis=0)) * coef[:, None, :]
      branch = jnp.einsum("nmr,nro->nmo", h, jnp.take(b.reshape(k, r, d_out), safe, axis=0))
    else:
      raise ValueError(f"PerExample: impl={self.impl!r}; valid: {IMPLS}")
    return y + branch.reshape(lead + tuple(out_shape)).astype(y.dtype)

  def embed(self, ids):
    k, r = self.a.shape[0], self.a.shape[-1]
    if self.a.ndim != 3:
      raise ValueError(f"PerExample: an embedding table must be 2-D, got shape {self.shape}")
    index = self._checked_index(tuple(ids.shape))
    y = structured.embed(ids, self.base)
    index = index.reshape(index.shape + (1,) * (ids.ndim - index.ndim))
    index = jnp.broadcast_to(index, ids.shape)
    rows = jnp.take(self.a, ids, axis=1).astype(y.dtype)   # (K, *ids, r)
    h = jnp.moveaxis(rows, 0, -2).reshape(ids.shape + (k * r,))             # (*ids, K·r)
    mixed = h * self._mix(index, h.dtype)
    return y + (mixed @ self.b.astype(h.dtype).reshape(k * r, -1)).astype(y.dtype)


def is_per_example(x: Any) -> bool:
  """Whether `x` is a `PerExample` weight."""
  return isinstance(x, PerExample)


# ---------------------------------------------------------------------------------------------
# Stacks of adapter states.
# ---------------------------------------------------------------------------------------------

def stack(states: Sequence[base_lib.AdapterState]) -> base_lib.AdapterState:
  """Stacks K adapter states of one adapter along a new leading axis.

  Raises:
    ValueError: no states, or a state whose structure, leaf shapes or dtypes differ from the
      first one's (naming the state, the leaf path and both values).
  """
  states = list(states)
  if not states:
    raise ValueError("multi.stack: needs at least one adapter state")
  ref, ref_def = jax.tree_util.tree_flatten_with_path(states[0])
  ref_paths = [jax.tree_util.keystr(p) for p, _ in ref]
  for i, s in enumerate(states[1:], 1):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(s)
    paths = [jax.tree_util.keystr(p) for p, _ in leaves]
    if treedef != ref_def:
      only0, only_i = sorted(set(ref_paths) - set(paths)), sorted(set(paths) - set(ref_paths))
      raise ValueError(f"multi.stack: state {i} does not have the structure of state 0 (leaves "
                       f"only in state 0: {only0[:4]}, only in state {i}: {only_i[:4]}"
                       f"{'' if only0 or only_i else ', same leaves in other containers'}); "
                       f"stack states of one adapter made on one params tree")
    for path, (_, x0), (_, x) in zip(ref_paths, ref, leaves):
      if jnp.shape(x0) != jnp.shape(x) or jnp.result_type(x0) != jnp.result_type(x):
        raise ValueError(f"multi.stack: state {i} differs from state 0 at {path}: shape "
                         f"{jnp.shape(x)} dtype {jnp.result_type(x)} vs shape {jnp.shape(x0)} "
                         f"dtype {jnp.result_type(x0)}; stack states of one adapter config "
                         f"(same method, rank and targets)")
  return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def size(stacked: base_lib.AdapterState) -> int:
  """K, the number of adapters in a stack (the leading axis of every leaf).

  Raises:
    ValueError: an empty stack or leaves of different leading sizes.
  """
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(stacked)}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(f"multi: not a stack of adapter states (leading axis sizes "
                     f"{sorted(map(str, sizes))}); build it with lj.multi.stack(states)")
  return sizes.pop()


def take(stacked: base_lib.AdapterState, k: int) -> base_lib.AdapterState:
  """The k-th adapter state of a stack."""
  return jax.tree.map(lambda x: x[k], stacked)


# ---------------------------------------------------------------------------------------------
# Params with per-example adapters.
# ---------------------------------------------------------------------------------------------

def _combine(path: str, leaves: list[Any], impl: str) -> Any:
  """One leaf of K adapted params trees: the leaf itself if all K share it, else a PerExample."""
  first = leaves[0]
  if all(leaf is first for leaf in leaves):
    return first
  if all(type(leaf) is type(first) and isinstance(leaf, structured.DiagLowRank)
         for leaf in leaves):
    base = _combine(path, [leaf.base for leaf in leaves], impl)
    factors = [leaf._factors() for leaf in leaves]   # pylint: disable=protected-access
    a, d, b = (jnp.stack([jnp.asarray(f[i]) for f in factors]) for i in range(3))
    return PerExample(base, a, d, b, dropout_key=first.dropout_key,
                      dropout_rate=first.dropout_rate, impl=impl)
  kinds = sorted({type(leaf).__name__ for leaf in leaves})
  raise TypeError(f"multi.apply: {path} is a {'/'.join(kinds)} leaf, which has no factored "
                  f"per-example product; supported: the `base + a diag(d) b` weights "
                  f"(structured.DiagLowRank: LoRA, rsLoRA, PiSSA, CorDA, AdaLoRA, IncreLoRA, "
                  f"SORSA, LoLDU); for another method run each adapter on its own examples")


def apply(adapter: base_lib.Adapter, base: Any, stacked: base_lib.AdapterState,
          index: Optional[Any] = None, *, rng: Optional[jax.Array] = None,
          impl: str = "gather") -> Any:
  """Params whose adapted kernels are `PerExample` weights: each example runs its own adapter.

  Args:
    adapter: the adapter every state of the stack belongs to.
    base: the frozen tree its `init` returned.
    stacked: `stack([state_0, ..., state_{K-1}])`.
    index: optional int per example (see `with_index`); None leaves it to be bound later.
    rng: adapter dropout key, as for `adapter.apply` (the same dropout mask for every adapter).
    impl: "onehot" or "gather" (see `PerExample`).

  Returns:
    A params tree of `base`'s structure.

  Raises:
    ValueError: a bad stack or index, a stack that is not this adapter's (its own check), a bad
      `impl`.
    TypeError: a method without a factored per-example product (naming the leaf).
  """
  if impl not in IMPLS:
    raise ValueError(f"multi.apply: impl={impl!r}; valid: {IMPLS}")
  k = size(stacked)
  trees = [adapter.apply(base, take(stacked, i), rng=rng) for i in range(k)]
  params = jax.tree_util.tree_map_with_path(
      lambda path, *leaves: _combine(jax.tree_util.keystr(path), list(leaves), impl),
      *trees, is_leaf=structured.is_structured)
  return params if index is None else with_index(params, index)


def num_adapters(params: Any) -> int:
  """K of the `PerExample` leaves of `params`.

  Raises:
    ValueError: no `PerExample` leaf, or leaves with different K.
  """
  ks = {leaf.num_adapters for leaf in jax.tree.leaves(params, is_leaf=is_per_example)
        if is_per_example(leaf)}
  if not ks:
    raise ValueError("multi: the params hold no per-example adapters; build them with "
                     "lj.multi.apply(adapter, base, lj.multi.stack(states))")
  if len(ks) > 1:
    raise ValueError(f"multi: the params mix stacks of {sorted(ks)} adapters")
  return ks.pop()


def check_index(index: Any, k: int) -> jax.Array:
  """`index` as int32, checked: integer, at least 1-D, values in [-1, k) when concrete.

  Raises:
    ValueError: a non-integer or 0-d index, or values outside [-1, k) (naming them).
  """
  if not isinstance(index, jax.core.Tracer):
    index = np.asarray(index)
  if not jnp.issubdtype(index.dtype, jnp.integer) or index.ndim < 1:
    raise ValueError(f"multi: the adapter index must be an integer array with one entry per "
                     f"example (shape (batch,) or (batch, length)), got {index.dtype} of shape "
                     f"{tuple(index.shape)}")
  if not isinstance(index, jax.core.Tracer):
    bad = np.unique(index[(index < -1) | (index >= k)])
    if bad.size:
      raise ValueError(f"multi: adapter index values {bad.tolist()[:8]} are out of range; valid: "
                       f"0..{k - 1} (one of the {k} stacked adapters) or -1 (the base model)")
  return jnp.asarray(index, jnp.int32)


def with_index(params: Any, index: Any) -> Any:
  """Binds the per-example adapter index to every `PerExample` leaf of `params`.

  Args:
    params: params from `apply`.
    index: int `(B,)` (one adapter per example) or `(B, T)` (one per token): values in 0..K-1,
      or -1 for the base model alone.

  Raises:
    ValueError: params without per-example adapters, or a bad index (see `check_index`).
  """
  index = check_index(index, num_adapters(params))

  def bind(leaf):
    if not is_per_example(leaf):
      return leaf
    return leaf.replace(index=index, base=bind(leaf.base))

  return jax.tree.map(bind, params, is_leaf=is_per_example)
