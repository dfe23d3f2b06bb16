"""Factored adapters on unmodified `flax.linen` models.

>>> import jax, jax.numpy as jnp, flax.linen as nn, lowrank_jax as lj
>>> model = nn.Dense(3)
>>> x = jnp.ones((2, 4))
>>> params = model.init(jax.random.key(0), x)['params']
>>> adapter = lj.lora(2, targets='kernel')
>>> base, state = adapter.init(jax.random.key(1), params)
>>> y = lj.interop.linen_apply(model, {'params': adapter.apply(base, state)}, x)
>>> bool(jnp.allclose(y, model.apply({'params': params}, x)))   # B = 0 at init
True

Mechanism. `linen_apply(model, variables, ...)` calls `model.apply` under
`flax.linen.intercept_methods`. Linen layers read their kernels with `self.param`, which wants an
array, so structured leaves never enter the model: each one is looked up by its path (collection,
module path, parameter name) by an interceptor on the stock layers' methods:

- `nn.Dense`, `nn.DenseGeneral` (no `batch_dims`), `nn.Conv` (shared weights), `nn.Einsum`
  (`__call__`) and `nn.Embed` (`__call__` and `attend`) run their product through the structured
  weight (`lowrank_jax.structured.dense` / `conv` / `embed`, factored). The layer's own
  `promote_dtype` is applied to the inputs, the bias and a 0-d stand-in of the kernel's dtype; the
  structured weight's floating arrays are cast to the dtype the kernel got, so `dtype` /
  `param_dtype` behave as in the stock layer; the layer's `precision` applies to the factored
  products' forward pass (`jax.default_matmul_precision`); bias, feature axes, `axis` and batch
  flattening are the stock layer's.
- Two passes. A first, abstract pass (`jax.eval_shape`: no FLOPs) runs the model with every
  structured leaf replaced by an abstract array of its dense shape and records, per leaf, whether
  every layer call that reads it can be routed. flax's own parameter shape check runs in this pass,
  so a structured leaf whose dense shape differs from the layer's kernel stops with flax's
  `ScopeParamShapeError` naming the parameter and the module path. In the real pass, routed leaves
  stand in the variables as `jax.ShapeDtypeStruct` placeholders (never read: the interceptor
  computes the layer's output), and every other structured leaf is merged to its dense value.
- Falls back to the merged weight for one leaf, and warns once naming the module path and the
  reason: a layer setting the factored path cannot honour (a custom `dot_general` /
  `conv_general_dilated`, Conv padding "CIRCULAR"/"REFLECT"/"CAUSAL", input dilation, feature
  groups, a mask, DenseGeneral `batch_dims`, Einsum with an ellipsis, a kernel layout other than
  inputs-then-outputs or `preferred_element_type`, `attend` on a weight without a transposed
  factored product), a subclass or another layer type reading the leaf, or a leaf no layer read.

Not supported: structured leaves under lifted transforms that stack parameters (`nn.scan`,
`nn.vmap` over layers): their stacked shape fails the shape check above; a structured leaf that a
custom module reads directly while a stock layer also reads it (the placeholder then reaches the
custom module, which raises a TypeError).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from lowrank_jax import structured
from lowrank_jax.interop import _layers


class _Rule(NamedTuple):
  param: str                                   # the layer's parameter holding the kernel
  blocker: Callable[..., Optional[str]]        # (module, leaf, args, kwargs) -> reason or None
  forward: Callable[..., Any]                  # (module, leaf, args, kwargs) -> output


def _custom_dot_general(m) -> Optional[str]:
  if m.dot_general is not None or m.dot_general_cls is not None:
    return "a custom dot_general"
  return _layers.precision_blocker(m.precision)


def _bias(m):
  return m.get_variable("params", "bias") if m.use_bias else None


def _promote(m, x, leaf, bias):
  """The layer's own promotion of (inputs, kernel, bias); the kernel is a 0-d stand-in."""
  x, k, bias = m.promote_dtype(x, jnp.zeros((), leaf.dtype), bias, dtype=m.dtype)
  return x, _layers.cast(leaf, k.dtype), bias


def _dense(m, leaf, args, kwargs):
  x, w, bias = _promote(m, _input(args, kwargs), leaf, _bias(m))
  with _layers.precision_scope(m.precision):
    return _layers.linear(x, w, bias, (x.ndim - 1,), 1)


def _dense_general_blocker(m, leaf, args, kwargs):
  del leaf, args, kwargs
  if m.batch_dims:
    return f"batch_dims {m.batch_dims}"
  return _custom_dot_general(m)


def _dense_general(m, leaf, args, kwargs):
  x = _input(args, kwargs)
  features = (m.features,) if isinstance(m.features, int) else tuple(m.features)
  axis = _layers.normalize_axes(m.axis, x.ndim)
  x, w, bias = _promote(m, x, leaf, _bias(m))
  with _layers.precision_scope(m.precision):
    return _layers.linear(x, w, bias, axis, len(features))


def _kernel_size(m) -> tuple[int, ...]:
  return (m.kernel_size,) if isinstance(m.kernel_size, int) else tuple(m.kernel_size)


def _conv_blocker(m, leaf, args, kwargs):
  del args, kwargs
  if m.conv_general_dilated is not None or m.conv_general_dilated_cls is not None:
    return "a custom conv_general_dilated"
  n = len(_kernel_size(m))
  return (_layers.conv_blocker(padding=m.padding, input_dilation=m.input_dilation,
                               feature_group_count=m.feature_group_count, mask=m.mask,
                               n_spatial=n, kernel_ndim=leaf.ndim)
          or _layers.precision_blocker(m.precision))


def _conv(m, leaf, args, kwargs):
  n = len(_kernel_size(m))
  x, w, bias = _promote(m, _input(args, kwargs), leaf, _bias(m))
  strides, padding, dilation = _layers.conv_geometry(
      strides=m.strides, padding=m.padding, kernel_dilation=m.kernel_dilation, n_spatial=n)
  with _layers.precision_scope(m.precision):
    return _layers.conv(x, w, bias, n_spatial=n, strides=strides, padding=padding,
                        dilation=dilation)


def _embed_blocker(m, leaf, args, kwargs):
  del leaf, args, kwargs
  return "num_embeddings 1" if m.num_embeddings == 1 else None


def _embed(m, leaf, args, kwargs):
  ids = _input(args, kwargs)
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError("Input type must be an integer or unsigned integer.")
  (k,) = m.promote_dtype(jnp.zeros((), leaf.dtype), dtype=m.dtype, inexact=False)
  return _layers.embed(ids, _layers.cast(leaf, k.dtype))


def _attend_blocker(m, leaf, args, kwargs):
  del m, args, kwargs
  return _layers.attend_blocker(leaf)


def _attend(m, leaf, args, kwargs):
  q, k = m.promote_dtype(_input(args, kwargs, "query"), jnp.zeros((), leaf.dtype), dtype=m.dtype)
  return _layers.attend(q, _layers.cast(leaf, k.dtype))


def _einsum_str(m, args, kwargs) -> str:
  given = args[1] if len(args) > 1 else kwargs.get("einsum_str")
  return nn.merge_param("einsum_str", m.einsum_str, given)


def _einsum_blocker(m, leaf, args, kwargs):
  if m.preferred_element_type is not None:
    return f"preferred_element_type {m.preferred_element_type}"
  plan = _layers.einsum_plan(_einsum_str(m, args, kwargs), _input(args, kwargs).ndim, leaf.ndim)
  return plan if isinstance(plan, str) else _layers.precision_blocker(m.precision)


def _einsum(m, leaf, args, kwargs):
  x = _input(args, kwargs)
  plan = _layers.einsum_plan(_einsum_str(m, args, kwargs), x.ndim, leaf.ndim)
  x, w, bias = _promote(m, x, leaf, _bias(m))
  with _layers.precision_scope(m.precision):
    return _layers.einsum(plan, x, w, bias)


def _input(args, kwargs, name: str = "inputs"):
  return args[0] if args else kwargs[name]


_RULES = {
    (nn.Dense, "__call__"): _Rule("kernel", lambda m, *_: _custom_dot_general(m), _dense),
    (nn.DenseGeneral, "__call__"): _Rule("kernel", _dense_general_blocker, _dense_general),
    (nn.Conv, "__call__"): _Rule("kernel", _conv_blocker, _conv),
    (nn.Embed, "__call__"): _Rule("embedding", _embed_blocker, _embed),
    (nn.Embed, "attend"): _Rule("embedding", _attend_blocker, _attend),
    (nn.Einsum, "__call__"): _Rule("kernel", _einsum_blocker, _einsum),
}
ROUTED_LAYERS = tuple(sorted({f"nn.{cls.__name__}" for cls, _ in _RULES}))


def _leaf_path(module, rule: _Rule) -> tuple:
  return ("params",) + tuple(module.path) + (rule.param,)


def _interceptor(leaves: dict, verdicts: Optional[dict]):
  """The `nn.intercept_methods` interceptor. With `verdicts` (the abstract pass) it records, per
  structured leaf, None (routable) or the first reason it is not, and runs the stock method;
  without, it computes routed layers through their structured leaf."""
  def intercept(next_fun, args, kwargs, context):
    rule = _RULES.get((type(context.module), context.method_name))
    path = None if rule is None else _leaf_path(context.module, rule)
    if path not in leaves:
      return next_fun(*args, **kwargs)
    if verdicts is None:
      return rule.forward(context.module, leaves[path], args, kwargs)
    reason = rule.blocker(context.module, leaves[path], args, kwargs)
    if verdicts.get(path) is None:
      verdicts[path] = (f"{type(context.module).__name__}.{context.method_name} with {reason}"
                        if reason else None)
    return next_fun(*args, **kwargs)
  return intercept


def _placeholder(leaf) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype)


def linen_apply(model: nn.Module, variables: Any, *args, **kwargs) -> Any:
  """`model.apply(variables, *args, **kwargs)` with structured leaves run factored.

  Args:
    model: an unmodified linen module.
    variables: its variables, e.g. `{'params': adapter.apply(base, state)}`; structured leaves
      (`lowrank_jax.structured.Structured`) may stand where `params` kernels/embeddings stood.
    *args: passed to `model.apply`.
    **kwargs: passed to `model.apply` (`method`, `rngs`, `mutable`, the method's own arguments).

  Returns:
    What `model.apply` returns. Layers routed as the module docstring says compute with the
    structured weight (no dense kernel of the adapted shape in the forward or the backward); other
    structured leaves are merged, with a RuntimeWarning once per leaf and reason.

  Raises:
    flax.errors.ScopeParamShapeError: a structured leaf's dense shape differs from its layer's
      kernel (flax's own check, naming the parameter and the module path).
  """
  flat = traverse_util.flatten_dict(variables)
  leaves = {p: v for p, v in flat.items() if isinstance(v, structured.Structured)}
  if not leaves:
    return model.apply(variables, *args, **kwargs)
  verdicts: dict = {}
  abstract = {p: _placeholder(v) if p in leaves else v for p, v in flat.items()}
  with nn.intercept_methods(_interceptor(leaves, verdicts)):
    jax.eval_shape(lambda v: model.apply(traverse_util.unflatten_dict(v), *args, **kwargs),
                   abstract)
  routed = {p: leaves[p] for p, reason in verdicts.items() if reason is None}
  for p in leaves:
    if p not in routed:
      where = "/".join(p)
      why = verdicts.get(p) or ("not read by " + ", ".join(ROUTED_LAYERS)
                                + " in this call (another layer type reads it, or none does)")
      _layers.warn_once(f"lowrank_jax.interop.linen_apply: {where}: {why}; using the merged "
                        "(dense) weight for it")
  real = {p: (_placeholder(v) if p in routed else structured.materialize(v)) if p in leaves else v
          for p, v in flat.items()}
  with nn.intercept_methods(_interceptor(routed, None)):
    return model.apply(traverse_util.unflatten_dict(real), *args, **kwargs)
