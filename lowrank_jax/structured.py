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
  """Base class of structured weights. Subclasses are `flax.struct.dataclass` classes.

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
  """Whether `x` is a structured weight (a `Structured` instance) rather than a dense array."""
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
  """N-D convolution, channels last: x `(N, *spatial, C_in)`, w `(*k, C_in/groups, C_out)`."""
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


def no_dropout(rate: Any) -> bool:
  """Whether `rate` is a Python number equal to 0 (dropout statically off).

  An array rate (a traced or per-example value) always counts as on: its value is not known when
  the function is traced, and a rate of 0 then keeps every entry anyway.
  """
  return isinstance(rate, (int, float)) and rate == 0.0


def dropout(x: jax.Array, rate: Any, rng, deterministic: bool) -> jax.Array:
  """Inverted dropout: zeroes entries with probability `rate`, scales the rest by 1/(1 − rate).

  `rate` is a number, or an array of one rate per example (B,) that applies along the leading
  (batch) axis of `x` (so Self-Tuning Networks can train with per-example dropout rates, see
  `lowrank_jax.stn_train`). The identity when `deterministic` or `rate` is the number 0;
  otherwise `rng` is required.

  Raises:
    ValueError: `deterministic=False` with a nonzero rate and no `rng`, or an array `rate` whose
      shape is not () or (B,) for the batch size B of `x`.
  """
  if deterministic or no_dropout(rate):
    return x
  if rng is None:
    raise ValueError("dropout: deterministic=False with dropout rate > 0 needs an `rng` key")
  if not isinstance(rate, (int, float)):
    rate = jnp.asarray(rate)
    if rate.ndim == 1 and rate.shape[0] == x.shape[0]:
      rate = rate.reshape(rate.shape + (1,) * (x.ndim - 1)).astype(x.dtype)
    elif rate.ndim != 0:
      raise ValueError(f"dropout: an array rate must be a scalar or one rate per example "
                       f"({x.shape[0]},), got shape {rate.shape} for inputs of shape {x.shape}")
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


# ----------------------------------------------------------------------------------------------
# Additive weights; DiagLowRank: W' = base + a diag(d) b (LoRA & co. with d = scale, SORSA, LoLDU)
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


class DiagLowRank(Additive):
  """`base + a diag(d) b` on the matricized kernel, with factored products.

  Subclasses (flax dataclasses) implement `_factors() -> (a (*in_shape, r), d () or (r,),
  b (r, *out_shape))`: a scalar d is LoRA's scale, a vector d SORSA's singular values or LoLDU's
  diagonal. The first `len(in_shape)` axes of the kernel are its input axes (flax Dense,
  DenseGeneral, Conv, Embed). The rank-r branch never forms a d_in×d_out array.

  Subclasses may define the fields `dropout_key`/`dropout_rate` (input dropout of the branch,
  deterministic without a key) and `impl`: "custom_vjp" (rank-r branch with a hand-written
  backward of explicit contractions, the default) or "autodiff" (plain `((x@a)·d)@b`, JAX's own
  backward).
  """
  dropout_key = None
  dropout_rate = 0.0
  impl = "custom_vjp"

  def _factors(self):
    raise NotImplementedError

  def _branch_input(self, x):
    return dropout(x, self.dropout_rate, self.dropout_key, deterministic=self.dropout_key is None)

  def delta(self, dtype=jnp.float32) -> jax.Array:
    a, d, b = self._factors()
    dt = compute_dtype(dtype, a, d, b)
    return jnp.tensordot(a.astype(dt) * jnp.asarray(d, dt), b.astype(dt), axes=1)

  def matmul(self, x, in_ndim: int = 1):
    a, d, b = self._factors()
    if in_ndim != a.ndim - 1:
      return super().matmul(x, in_ndim)
    y = dense(x, self.base, in_ndim=in_ndim)
    branch = _kernels.lowrank_branch(self._branch_input(x), a, b, d, self.impl)
    return y + branch.astype(y.dtype)

  def conv(self, x, *, strides=1, padding="SAME", dilation=1, feature_group_count=1):
    a, d, b = self._factors()
    if feature_group_count != 1 or a.ndim - 1 != self.ndim - 1:
      return super().conv(x, strides=strides, padding=padding, dilation=dilation,
                          feature_group_count=feature_group_count)
    # PEFT's conv LoRA: A is a conv with the base's geometry and r output channels, B a 1x1 conv.
    y = conv(x, self.base, strides=strides, padding=padding, dilation=dilation)
    h = conv(self._branch_input(x), a.astype(x.dtype), strides=strides, padding=padding,
             dilation=dilation)
    return y + ((h * jnp.asarray(d, x.dtype)) @ b.astype(x.dtype)).astype(y.dtype)

  def embed(self, ids):
    a, d, b = self._factors()
    if a.ndim != 2:
      return super().embed(ids)
    y = embed(ids, self.base)
    h = jnp.take(a, ids, axis=0) * d
    return y + (h @ b).astype(y.dtype)


@flax.struct.dataclass
class LowRank(DiagLowRank):
  """`base + scale * (a @ b)`: the `DiagLowRank` with a scalar d = scale (LoRA, PiSSA, CorDA, ...).

  Shapes: base `(*in_shape, *out_shape)`, a `(*in_shape, r)`, b `(r, *out_shape)`.
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

  def _factors(self):
    return self.a, self.scale, self.b


class Wrapped(Structured):
  """A structured weight that stands for the kernel `w` it wraps: same shape, dtype, dense value
  and products. Subclasses (flax dataclasses with a `w` field) observe the products, e.g. record
  their inputs, and override `matmul` / `conv` to do so."""

  @property
  def shape(self):
    return tuple(self.w.shape)

  @property
  def dtype(self):
    return self.w.dtype

  def materialize(self):
    return materialize(self.w)

  def matmul(self, x: jax.Array, in_ndim: int = 1) -> jax.Array:
    return dense(x, self.w, in_ndim=in_ndim)

  def conv(self, x: jax.Array, **conv_kwargs) -> jax.Array:
    return conv(x, self.w, **conv_kwargs)

  def embed(self, ids: jax.Array) -> jax.Array:
    return embed(ids, self.w)
