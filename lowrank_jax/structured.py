"""Structured weights: pytree dataclasses that stand where a dense kernel stood.

Each structured weight knows its dense value (`materialize`, used by `merge` and as the universal
fallback) and implements the products a model needs (`matmul`, `conv`, `embed`) in factored form, so
the training step never forms the full-size update or its gradient.

Structured weights nest: the `base` of a `LowRank` may itself be structured (this is how `chain`
stacks two methods on one leaf).
"""
from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from lowrank_jax import _kernels


class Structured:
  """Base class of structured weights. Subclasses are `flax.struct.dataclass`es.

  Subclasses must implement `materialize()` and the `shape`/`dtype` of the dense value; they should
  override `matmul` / `conv` / `embed` with factored products where the method allows.
  """

  @property
  def shape(self) -> tuple[int, ...]:
    raise NotImplementedError

  @property
  def dtype(self):
    raise NotImplementedError

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  def materialize(self) -> jax.Array:
    raise NotImplementedError

  # Fallbacks: correct, dense, slower.
  def matmul(self, x: jax.Array, in_ndim: int = 1) -> jax.Array:
    return dense(x, self.materialize(), in_ndim=in_ndim)

  def conv(self, x: jax.Array, **conv_kwargs) -> jax.Array:
    return conv(x, self.materialize(), **conv_kwargs)

  def embed(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.materialize(), ids, axis=0)

  def __rmatmul__(self, x):
    return self.matmul(x)


def is_structured(x: Any) -> bool:
  return isinstance(x, Structured)


def materialize(w: Any) -> jax.Array:
  """Dense value of a dense array or a structured weight."""
  return w.materialize() if isinstance(w, Structured) else w


def merge(params: Any) -> Any:
  """Turns every structured leaf of `params` into a dense array of the original shape and dtype.

  This is LoRA-style merging, and the way to run any third-party model on adapted params.

  >>> import jax.numpy as jnp, lowrank_jax as lj
  >>> w = lj.LowRank(jnp.zeros((3, 2)), jnp.ones((3, 1)), jnp.ones((1, 2)), 0.5)
  >>> lj.merge({'kernel': w})['kernel'].tolist()
  [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]
  """
  return jax.tree_util.tree_map(materialize, params, is_leaf=is_structured)


# ----------------------------------------------------------------------------------------------
# Dense products used by structured weights and by the layer ops.
# ----------------------------------------------------------------------------------------------

def dense(x: jax.Array, w: Any, *, in_ndim: int = 1) -> jax.Array:
  """`x @ w` contracting the last `in_ndim` axes of x with the first `in_ndim` axes of w."""
  if isinstance(w, Structured):
    return w.matmul(x, in_ndim=in_ndim)
  if in_ndim == 1 and w.ndim == 2:
    return x @ w
  return jnp.tensordot(x, w, axes=in_ndim)


def _spatial_spec(n: int) -> str:
  return "DHW"[-n:] if n <= 3 else "".join(chr(ord("a") + i) for i in range(n))


def conv(x: jax.Array, w: Any, *, strides=1, padding="SAME", dilation=1,
         feature_group_count: int = 1) -> jax.Array:
  """N-D convolution, channels last: x (N, *spatial, C_in), w (*k, C_in/groups, C_out)."""
  if isinstance(w, Structured):
    return w.conv(x, strides=strides, padding=padding, dilation=dilation,
                  feature_group_count=feature_group_count)
  n = w.ndim - 2
  if x.ndim != n + 2:
    raise ValueError(f"conv: input of shape {x.shape} does not match a {n}-D kernel {w.shape}")
  as_tuple = lambda v: (v,) * n if isinstance(v, int) else tuple(v)
  sp = _spatial_spec(n)
  dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, (f"N{sp}C", f"{sp}IO", f"N{sp}C"))
  return jax.lax.conv_general_dilated(
      x, w.astype(x.dtype), window_strides=as_tuple(strides), padding=padding,
      rhs_dilation=as_tuple(dilation), dimension_numbers=dn,
      feature_group_count=feature_group_count)


def embed(ids: jax.Array, w: Any) -> jax.Array:
  """Embedding lookup of integer `ids` in a table w (vocab, d)."""
  if isinstance(w, Structured):
    return w.embed(ids)
  return jnp.take(w, ids, axis=0)


def compute_dtype(*arrays: Any):
  """The dtype to form dense values in: the promoted dtype of `arrays` and float32.

  bf16/fp16 inputs are computed in float32, float64 inputs (with `jax_enable_x64`) stay float64.
  """
  return jnp.result_type(jnp.float32, *arrays)


def _dropout(x, rate, key):
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


# ----------------------------------------------------------------------------------------------
# LowRank: W' = base + scale * A @ B  (LoRA, PiSSA, CorDA, ...)
# ----------------------------------------------------------------------------------------------

class Additive(Structured):
  """A structured weight of the form `base + delta()`: shape and dtype are the base's.

  Subclasses (flax dataclasses) have a `base` field (dense or structured) and implement
  `delta(dtype)`, the dense update computed in `compute_dtype(dtype, *factors)` (used only by
  `materialize`/`merge`, never in the step). `materialize` forms the update and the sum in
  `compute_dtype(base)` and casts to the base's dtype: a bf16 base is summed in float32 and
  rounded once, a float64 base is not rounded to float32 (a float64 base with float32 factors at
  init merges to the base exactly).
  """

  @property
  def shape(self):
    return tuple(self.base.shape)

  @property
  def dtype(self):
    return self.base.dtype

  def delta(self, dtype=jnp.float32) -> jax.Array:
    raise NotImplementedError

  def materialize(self):
    base = materialize(self.base)
    delta = self.delta(compute_dtype(base))
    dt = compute_dtype(base, delta)
    return (base.astype(dt) + delta.astype(dt)).astype(base.dtype)


@flax.struct.dataclass
class LowRank(Additive):
  """`base + scale * (a @ b)` on the matricized kernel.

  Shapes: base `(*in_shape, *out_shape)`, a `(*in_shape, r)`, b `(r, *out_shape)`; the first
  `len(in_shape)` axes of the kernel are its input axes (flax Dense, DenseGeneral, Conv, Embed).

  `impl` picks the training product: "custom_vjp" (rank-r branch with a hand-written backward of
  explicit contractions, the default), "autodiff" (plain `(x@a)@b`, JAX's own backward).
  """
  base: Any
  a: jax.Array
  b: jax.Array
  scale: Any = 1.0
  dropout_key: Any = None
  dropout_rate: float = flax.struct.field(pytree_node=False, default=0.0)
  impl: str = flax.struct.field(pytree_node=False, default="custom_vjp")

  @property
  def in_ndim(self) -> int:
    return self.a.ndim - 1

  @property
  def rank(self) -> int:
    return self.a.shape[-1]

  def delta(self, dtype=jnp.float32) -> jax.Array:
    dt = compute_dtype(dtype, self.a, self.b, self.scale)
    return jnp.tensordot(self.a.astype(dt), self.b.astype(dt), axes=1) * jnp.asarray(self.scale, dt)

  def matmul(self, x, in_ndim: int = 1):
    if in_ndim != self.in_ndim:
      return super().matmul(x, in_ndim)
    xd = _dropout(x, self.dropout_rate, self.dropout_key)
    y = dense(x, self.base, in_ndim=in_ndim)
    return y + _kernels.lowrank_branch(xd, self.a, self.b, self.scale, self.impl).astype(y.dtype)

  def conv(self, x, *, strides=1, padding="SAME", dilation=1, feature_group_count=1):
    if feature_group_count != 1 or self.in_ndim != self.ndim - 1:
      return super().conv(x, strides=strides, padding=padding, dilation=dilation,
                          feature_group_count=feature_group_count)
    # PEFT's conv LoRA: A is a conv with the base's geometry and r output channels, B a 1x1 conv.
    y = conv(x, self.base, strides=strides, padding=padding, dilation=dilation)
    xd = _dropout(x, self.dropout_rate, self.dropout_key)
    h = conv(xd, self.a.astype(x.dtype), strides=strides, padding=padding, dilation=dilation)
    return y + ((h * self.scale) @ self.b.astype(x.dtype)).astype(y.dtype)

  def embed(self, ids):
    if self.in_ndim != 1:
      return super().embed(ids)
    y = embed(ids, self.base)
    h = jnp.take(self.a, ids, axis=0)
    return y + ((h * self.scale) @ self.b).astype(y.dtype)
