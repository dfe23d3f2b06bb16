"""Factored adapters on unmodified `flax.nnx` models.

>>> import jax, jax.numpy as jnp, lowrank_jax as lj
>>> from flax import nnx
>>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
>>> graphdef, state = nnx.split(model, nnx.Param)
>>> adapter = lj.lora(2, targets='kernel')
>>> base, adapter_state = adapter.init(jax.random.key(1), nnx.to_pure_dict(state))
>>> nnx.replace_by_pure_dict(state, adapter.apply(base, adapter_state))
>>> adapted = lj.interop.nnx_merge(graphdef, state)
>>> type(adapted).__name__, type(adapted.kernel.get_value()).__name__
('FactoredLinear', 'LowRank')
>>> x = jnp.ones((2, 4))
>>> bool(jnp.allclose(adapted(x), model(x)))   # B = 0 at init
True

Mechanism: graph surgery on the module instances, stated. `nnx_route(module)` walks the module
graph; each `nnx.Linear`, `nnx.LinearGeneral` (no `batch_axis`), `nnx.Conv`, `nnx.Einsum` or
`nnx.Embed` whose kernel (`embedding`) Param holds a structured weight gets its class swapped, in
place, for a subclass (`FactoredLinear`, ...) whose `__call__` (and `attend`) computes the product
through the structured weight (`lowrank_jax.structured.dense` / `conv` / `embed`, factored), with
the layer's own `promote_dtype`, dtype, precision (forward pass, `jax.default_matmul_precision`),
bias and axis semantics. Fields, Variables and the graph structure are unchanged, so
`nnx.split`/`nnx.merge`/`nnx.state` keep working (a split of a routed module records the subclass).
`nnx_merge(graphdef, state, *states)` is `nnx.merge` followed by `nnx_route`: the usual flow is to
split the stock model once, put `adapter.apply(base, state)` into the Param state with
`nnx.replace_by_pure_dict`, and `nnx_merge` inside the differentiated function, so the adapter
state is what gets differentiated.

Every other structured Param value (a layer setting the factored path cannot honour, e.g. a custom
`dot_general`/`conv_general_dilated`/`einsum_op`, `preferred_element_type`, Conv padding
"CIRCULAR"/"REFLECT"/"CAUSAL", input dilation, feature groups, a mask, LinearGeneral `batch_axis`,
an Einsum kernel layout other than inputs-then-outputs, an Embed whose weight has no factored
transpose for `attend`, a subclass or another module type) is replaced by its merged dense value,
with a RuntimeWarning once per path and reason.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax import structured
from lowrank_jax.interop import _layers


def _promote(m, x, leaf, bias):
  """The layer's own promotion of (inputs, kernel, bias); the kernel is a 0-d stand-in."""
  x, k, bias = m.promote_dtype((x, jnp.zeros((), leaf.dtype), bias), dtype=m.dtype)
  return x, _layers.cast(leaf, k.dtype), bias


def _bias(m):
  return m.bias.get_value() if m.bias is not None else None


def _no_sharding(name: str, out_sharding) -> None:
  if out_sharding is not None:
    raise ValueError(f"lowrank_jax.interop: {name} with out_sharding={out_sharding} has no "
                     "factored path; call it without out_sharding or merge the weight")


def _common_blocker(m, default_op_name: str, default_op) -> Optional[str]:
  if getattr(m, default_op_name) is not default_op or getattr(m, "dot_general_cls", None):
    return f"a custom {default_op_name}"
  if m.preferred_element_type is not None:
    return f"preferred_element_type {m.preferred_element_type}"
  return _layers.precision_blocker(m.precision)


def _linear_blocker(m, leaf):
  del leaf
  return _common_blocker(m, "dot_general", jax.lax.dot_general)


def _linear_call(self, inputs, out_sharding=None):
  _no_sharding("Linear", out_sharding)
  x, w, bias = _promote(self, inputs, self.kernel.get_value(), _bias(self))
  with _layers.precision_scope(self.precision):
    return _layers.linear(x, w, bias, (x.ndim - 1,), 1)


def _linear_general_blocker(m, leaf):
  del leaf
  if m.batch_axis:
    return f"batch_axis {dict(m.batch_axis)}"
  return _common_blocker(m, "dot_general", None)


def _linear_general_call(self, inputs, out_sharding=None):
  _no_sharding("LinearGeneral", out_sharding)
  axis = _layers.normalize_axes(self.axis, inputs.ndim)
  x, w, bias = _promote(self, inputs, self.kernel.get_value(), _bias(self))
  with _layers.precision_scope(self.precision):
    return _layers.linear(x, w, bias, axis, len(self.out_features))


def _conv_blocker(m, leaf):
  return (_common_blocker(m, "conv_general_dilated", jax.lax.conv_general_dilated)
          or _layers.conv_blocker(padding=m.padding, input_dilation=m.input_dilation,
                                  feature_group_count=m.feature_group_count, mask=m.mask,
                                  n_spatial=len(m.kernel_size), kernel_ndim=leaf.ndim))


def _conv_call(self, inputs, out_sharding=None):
  _no_sharding("Conv", out_sharding)
  n = len(self.kernel_size)
  x, w, bias = _promote(self, inputs, self.kernel.get_value(), _bias(self))
  strides, padding, dilation = _layers.conv_geometry(
      strides=self.strides, padding=self.padding, kernel_dilation=self.kernel_dilation,
      n_spatial=n)
  with _layers.precision_scope(self.precision):
    return _layers.conv(x, w, bias, n_spatial=n, strides=strides, padding=padding,
                        dilation=dilation)


def _einsum_plan(equation: str, leaf):
  lhs = equation.replace(" ", "").split(",")[0]
  return _layers.einsum_plan(equation, len(lhs), leaf.ndim)


def _einsum_blocker(m, leaf):
  plan = _einsum_plan(m.einsum_str, leaf)
  return plan if isinstance(plan, str) else _common_blocker(m, "einsum_op", jnp.einsum)


def _einsum_call(self, inputs, einsum_str=None, out_sharding=None):
  _no_sharding("Einsum", out_sharding)
  leaf = self.kernel.get_value()
  plan = _einsum_plan(einsum_str or self.einsum_str, leaf)
  if isinstance(plan, str):
    raise ValueError(f"lowrank_jax.interop: Einsum called with {plan}; it has no factored path "
                     "(merge the weight, or call it with the equation it was routed for)")
  x, w, bias = _promote(self, inputs, leaf, _bias(self))
  with _layers.precision_scope(self.precision):
    return _layers.einsum(plan, x, w, bias)


def _embed_blocker(m, leaf):
  if m.num_embeddings == 1:
    return "num_embeddings 1"
  return _layers.attend_blocker(leaf)


def _embed_call(self, inputs, out_sharding=None):
  _no_sharding("Embed", out_sharding)
  if not jnp.issubdtype(inputs.dtype, jnp.integer):
    raise ValueError("Input type must be an integer or unsigned integer.")
  leaf = self.embedding.get_value()
  (k,) = self.promote_dtype((jnp.zeros((), leaf.dtype),), dtype=self.dtype, inexact=False)
  return _layers.embed(inputs, _layers.cast(leaf, k.dtype))


def _embed_attend(self, query, out_sharding=None):
  _no_sharding("Embed.attend", out_sharding)
  leaf = self.embedding.get_value()
  q, k = self.promote_dtype((query, jnp.zeros((), leaf.dtype)), dtype=self.dtype)
  return _layers.attend(q, _layers.cast(leaf, k.dtype))


class _Rule(NamedTuple):
  param: str                                         # the attribute holding the kernel Param
  blocker: Callable[[Any, Any], Optional[str]]       # (module, leaf) -> reason or None
  methods: dict                                      # name -> routed method
  kernel_shape: Callable[[Any], tuple]               # module -> the stock kernel's shape


_RULES = {
    nnx.Linear: _Rule("kernel", _linear_blocker, {"__call__": _linear_call},
                      lambda m: (m.in_features, m.out_features)),
    nnx.LinearGeneral: _Rule("kernel", _linear_general_blocker,
                             {"__call__": _linear_general_call},
                             lambda m: (tuple(m.batch_axis.values()) + tuple(m.in_features)
                                        + tuple(m.out_features))),
    nnx.Conv: _Rule("kernel", _conv_blocker, {"__call__": _conv_call},
                    lambda m: tuple(m.kernel_shape)),
    nnx.Einsum: _Rule("kernel", _einsum_blocker, {"__call__": _einsum_call},
                      lambda m: tuple(m.kernel_shape)),
    nnx.Embed: _Rule("embedding", _embed_blocker,
                     {"__call__": _embed_call, "attend": _embed_attend},
                     lambda m: (m.num_embeddings, m.features)),
}


def _dispatching(name: str, routed: Callable) -> Callable:
  """The routed method, or the stock one when the kernel holds a dense array again."""
  def method(self, *args, **kwargs):
    rule = _RULES[type(self).__mro__[1]]
    if isinstance(getattr(self, rule.param).get_value(), structured.Structured):
      return routed(self, *args, **kwargs)
    return getattr(super(type(self), self), name)(*args, **kwargs)
  method.__name__ = name
  method.__doc__ = routed.__doc__
  return method


@functools.cache
def factored_class(cls: type) -> type:
  """The routing subclass of a stock nnx layer class (`nnx.Linear` -> `FactoredLinear`)."""
  rule = _RULES[cls]
  namespace = {name: _dispatching(name, fn) for name, fn in rule.methods.items()}
  namespace["__module__"] = __name__
  namespace["__doc__"] = (f"`{cls.__module__}.{cls.__name__}` whose {rule.param} may hold a "
                          "structured weight, used factored (lowrank_jax.interop.nnx).")
  return type(f"Factored{cls.__name__}", (cls,), namespace)


def _stock_class(module) -> Optional[type]:
  t = type(module)
  if t in _RULES:
    return t
  if t.__module__ == __name__ and t.__mro__[1] in _RULES:
    return t.__mro__[1]
  return None


def nnx_route(module: nnx.Module) -> nnx.Module:
  """Routes `module`'s layers through the structured weights their Params hold (in place).

  See the module docstring. Returns `module`.

  Raises:
    ValueError: a structured weight whose dense shape differs from its layer's kernel shape.
  """
  for path, sub in nnx.iter_modules(module):
    stock = _stock_class(sub)
    rule = _RULES.get(stock)
    for name, var in list(vars(sub).items()):
      if not isinstance(var, nnx.Variable):
        continue
      value = var.get_value()
      if not isinstance(value, structured.Structured):
        continue
      where = "/".join(str(p) for p in path + (name,))
      if rule is not None and name == rule.param and tuple(value.shape) != rule.kernel_shape(sub):
        raise _layers.shape_error(f"lowrank_jax.interop.nnx_route: {where}", value,
                                  rule.kernel_shape(sub))
      reason = (f"{type(sub).__name__}.{name} is not a kernel lowrank_jax routes"
                if rule is None or name != rule.param else rule.blocker(sub, value))
      if reason is None:
        sub.__class__ = factored_class(stock)
      else:
        _layers.warn_once(f"lowrank_jax.interop.nnx_route: {where}: {reason}; using the merged "
                          "(dense) weight for it")
        var.set_value(structured.materialize(value))
  return module


def nnx_merge(graphdef, state, *states) -> nnx.Module:
  """`nnx.merge(graphdef, state, *states)` with layers routed through structured Param values."""
  return nnx_route(nnx.merge(graphdef, state, *states))
