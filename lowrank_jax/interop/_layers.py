"""Factored forward passes of the stock Flax layers, shared by the linen and nnx front ends.

Each function takes the layer's inputs and bias already promoted by the layer's own
`promote_dtype`, the structured weight, and the layer's settings, and reproduces the stock layer's
output (axes, bias broadcast, batch flattening) with the product computed through the structured
weight (`lowrank_jax.structured`), so no dense kernel of the adapted shape is formed. A layer
setting these functions cannot honour is reported by the `*_blocker` helpers as a reason string,
and the front end falls back to the merged kernel for that layer.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Optional

import jax
import jax.numpy as jnp

from lowrank_jax import _kernels
from lowrank_jax import structured

_WARNED: set = set()


def warn_once(message: str) -> None:
  """Warns (RuntimeWarning) the first time `message` is seen in this process."""
  if message not in _WARNED:
    _WARNED.add(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def cast(w: structured.Structured, dtype) -> structured.Structured:
  """`w` with every floating array (base and factors) cast to `dtype`.

  This is the structured counterpart of a layer promoting its kernel to the compute dtype: the
  factored product then runs in `dtype`, as the stock layer's product does.
  """
  def to(leaf):
    leaf = jnp.asarray(leaf)
    return leaf.astype(dtype) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf
  return jax.tree_util.tree_map(to, w)


def precision_name(precision) -> Optional[str]:
  """The `jax.default_matmul_precision` name of a layer's `precision`, or None for the default.

  Raises:
    ValueError: a per-operand pair of different precisions (no single matmul precision).
  """
  if precision is None:
    return None
  if isinstance(precision, (tuple, list)):
    if len(set(precision)) != 1:
      raise ValueError(f"per-operand precision {precision} has no single matmul precision")
    precision = precision[0]
  return precision.name.lower() if isinstance(precision, jax.lax.Precision) else str(precision)


def precision_scope(precision):
  """A context in which the factored products run at the layer's `precision` (forward pass).

  The products of the factored path are several `dot_general` calls; the layer's precision is applied
  to all of them through `jax.default_matmul_precision`.
  """
  name = precision_name(precision)
  return contextlib.nullcontext() if name is None else jax.default_matmul_precision(name)


def precision_blocker(precision) -> Optional[str]:
  try:
    precision_name(precision)
  except ValueError as e:
    return str(e)
  return None


def normalize_axes(axes, ndim: int) -> tuple[int, ...]:
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  return tuple(a % ndim for a in axes)


def linear(x, w, bias, axis: tuple[int, ...], n_features: int):
  """Dense / DenseGeneral / Linear / LinearGeneral without batch axes.

  `x` is contracted over `axis` (in that order) with the first `len(axis)` axes of `w`; the output
  is x's other axes followed by the feature axes, plus `bias` (shape of the feature axes).
  """
  n_in = len(axis)
  x = jnp.moveaxis(x, axis, tuple(range(x.ndim - n_in, x.ndim)))
  y = structured.dense(x, w, in_ndim=n_in)
  if bias is not None:
    y = y + jnp.reshape(bias, (1,) * (y.ndim - n_features) + tuple(bias.shape[-n_features:]))
  return y


def einsum_plan(equation: str, x_ndim: int, w_ndim: int):
  """How to run `einsum(equation, x, w)` as a dense product with `w`, or a reason why not.

  Routable equations have a kernel whose letters are contracted input letters followed by output
  letters (the layout whose first axes are the inputs), each letter once, no ellipsis and no letter
  summed within x alone. Returns `(x_perm, n_in, out_perm, kernel_out_letters)` or a string.
  """
  equation = equation.replace(" ", "")
  if "." in equation:
    return "einsum with an ellipsis"
  lhs, rest = equation.split(",")
  rhs, out = rest.split("->")
  if len(lhs) != x_ndim or len(rhs) != w_ndim:
    return f"einsum {equation!r} does not match ranks {x_ndim}, {w_ndim}"
  if len(set(lhs)) != len(lhs) or len(set(rhs)) != len(rhs) or len(set(out)) != len(out):
    return f"einsum {equation!r} repeats a letter in one operand"
  contracted = [c for c in rhs if c in lhs and c not in out]
  produced = [c for c in rhs if c in out and c not in lhs]
  if rhs != "".join(contracted + produced) or not contracted:
    return (f"einsum {equation!r}: kernel letters are not contracted input letters followed by "
            "output letters")
  kept = [c for c in lhs if c not in contracted]
  if any(c not in out for c in kept):
    return f"einsum {equation!r} sums an input letter that the kernel does not carry"
  x_perm = tuple(lhs.index(c) for c in kept + contracted)
  y_letters = kept + produced
  out_perm = tuple(y_letters.index(c) for c in out)
  return x_perm, len(contracted), out_perm, (out, rhs)


def einsum(plan, x, w, bias):
  """The routed einsum of `einsum_plan`'s plan, with `bias` broadcast over the output letters."""
  x_perm, n_in, out_perm, (out, rhs) = plan
  y = structured.dense(jnp.transpose(x, x_perm), w, in_ndim=n_in)
  y = jnp.transpose(y, out_perm)
  if bias is not None:
    shape = tuple(w.shape[rhs.index(c)] if c in rhs else 1 for c in out)
    y = y + jnp.reshape(bias, shape)
  return y


def conv(x, w, bias, *, n_spatial: int, strides, padding, dilation):
  """Conv (shared weights, no groups, no input dilation) with the stock layer's batch flattening:
  all leading batch axes are folded into one (or one is added) and restored afterwards."""
  n_batch = x.ndim - (n_spatial + 1)
  batch_shape = x.shape[:n_batch]
  x = jnp.reshape(x, (-1,) + x.shape[n_batch:])
  y = structured.conv(x, w, strides=strides, padding=padding, dilation=dilation)
  if bias is not None:
    y = y + bias.reshape((1,) * (y.ndim - bias.ndim) + bias.shape)
  return jnp.reshape(y, batch_shape + y.shape[1:])


def attend_blocker(w) -> Optional[str]:
  """Why `attend` (x @ wᵀ) cannot run factored for `w`, or None."""
  if not isinstance(w, structured.DiagLowRank):
    return f"attend (x @ Wᵀ) has no factored form for {type(w).__name__}"
  a, _, _ = w._factors()   # pylint: disable=protected-access
  if a.ndim != 2 or isinstance(w.base, structured.Structured):
    return "attend (x @ Wᵀ) is factored only for a 2-D dense base"
  return None


def attend(q, w):
  """`q @ wᵀ` for a `DiagLowRank` w = base + a diag(d) b: q @ baseᵀ + ((q @ bᵀ) d) @ aᵀ."""
  # pylint: disable=protected-access
  a, d, b = w._factors()
  y = q @ w.base.T
  branch = _kernels.lowrank_branch(w._branch_input(q), b.T, a.T, d, w.impl)
  return y + branch.astype(y.dtype)


def embed(ids, w):
  return structured.embed(ids, w)


def conv_blocker(*, padding, input_dilation, feature_group_count, mask, n_spatial,
                 kernel_ndim) -> Optional[str]:
  """Why a Conv cannot run factored, or None (the stock layer handles all of these)."""
  if isinstance(padding, str) and padding.upper() in ("CIRCULAR", "REFLECT", "CAUSAL"):
    return f"padding {padding!r}"
  if any(d != 1 for d in _as_tuple(input_dilation, n_spatial)):
    return f"input_dilation {input_dilation}"
  if feature_group_count != 1:
    return f"feature_group_count {feature_group_count}"
  if mask is not None:
    return "a kernel mask"
  if kernel_ndim != n_spatial + 2:
    return f"a {kernel_ndim}-D kernel for {n_spatial} spatial axes"
  return None


def _as_tuple(v, n: int) -> tuple[int, ...]:
  if v is None:
    return (1,) * n
  return (v,) * n if isinstance(v, int) else tuple(v)


def conv_geometry(*, strides, padding, kernel_dilation, n_spatial: int):
  """(strides, padding, dilation) in `lowrank_jax.structured.conv`'s form for a stock Conv."""
  if isinstance(padding, str):
    pad = padding
  elif isinstance(padding, int):
    pad = [(padding, padding)] * n_spatial
  else:
    pad = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
  return _as_tuple(strides, n_spatial), pad, _as_tuple(kernel_dilation, n_spatial)


def shape_error(where: str, leaf, expected) -> ValueError:
  return ValueError(f"{where}: the structured weight's dense shape {tuple(leaf.shape)} differs "
                    f"from the layer's kernel shape {tuple(expected)}")

