"""Building block for methods that adapt each targeted leaf independently (most of them).

A leafwise method supplies three small functions; this module does targeting, per-path keys,
the nested state layout (mirroring the params tree, so adapter files and checkpoints have readable
names), and the trainable/frozen split.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from lowrank_jax import base as base_lib
from lowrank_jax import structured
from lowrank_jax import targeting
from lowrank_jax import tree as tree_lib


class LeafInfo(NamedTuple):
  """What a leaf-level init gets to know about its target."""
  path: str
  shape: tuple[int, ...]
  dtype: Any
  axes: targeting.KernelAxes

  @property
  def in_shape(self) -> tuple[int, ...]:
    return self.shape[:self.axes.in_ndim]

  @property
  def out_shape(self) -> tuple[int, ...]:
    return self.shape[self.axes.in_ndim:]

  @property
  def d_in(self) -> int:
    return math.prod(self.in_shape)

  @property
  def d_out(self) -> int:
    return math.prod(self.out_shape)


# init_leaf(key, info, w_dense, stats) -> (new_base_leaf or None, trainable_leaf, frozen_leaf or None)
InitLeaf = Callable[[jax.Array, LeafInfo, jax.Array, Any], tuple[Any, Any, Any]]
# apply_leaf(info_path, base_leaf, trainable_leaf, frozen_leaf, rng) -> structured weight
ApplyLeaf = Callable[[str, Any, Any, Any, Optional[jax.Array]], Any]


def flat_stats(stats: Any) -> dict[str, Any]:
  """Accepts stats as {path: s} or a nested dict mirroring params; returns {path: s}."""
  if stats is None:
    return {}
  if isinstance(stats, dict) and any("/" in str(k) for k in stats):
    return dict(stats)
  return tree_lib.unnest(stats)


def leafwise(name: str, *, targets: targeting.Targets, init_leaf: InitLeaf,
             apply_leaf: ApplyLeaf, penalty_leaf: Optional[Callable[[Any, Any], jax.Array]] = None,
             kernel_axes: targeting.AxesSpec = None, needs_stats: bool = False,
             update: Optional[base_lib.UpdateFn] = None,
             update_grad: str = "total",
             state_spec: Optional[Callable[[LeafInfo], Any]] = None) -> base_lib.Adapter:
  """Makes an `Adapter` from leaf-level functions.

  Args:
    name: method name.
    targets: regex / list of regexes / callable selecting leaves (see `targeting.resolve`).
    init_leaf: `(key, info, w, stats) -> (new_base_leaf | None, trainable, frozen | None)`; `w` is
      the dense value of the leaf; returning None as base keeps the original leaf (additive methods
      keep `params` leaves, so `base` holds no copies).
    apply_leaf: `(path, base_leaf, trainable, frozen, rng) -> structured weight`.
    penalty_leaf: optional `(trainable, frozen) -> scalar`; the adapter's penalty is its mean over
      adapted leaves.
    kernel_axes: in/out axes for kernels of more than 2 dims (see `targeting.kernel_axes`).
    needs_stats: if True, `init` requires calibration statistics for every target.
    update: optional `adapter.update`.
    update_grad: which gradient `update` sees, "task" or "total" (see `base.Adapter`).
    state_spec: optional `info -> (trainable, frozen)` of `jax.ShapeDtypeStruct`s, what `init_leaf`
      makes for that leaf; needed only by inits that cannot be traced abstractly (host-side
      solvers), for `apply` to check a state it did not make. By default `init_leaf` is traced
      with `jax.eval_shape`.
  """
  if update_grad not in base_lib.UPDATE_GRADS:
    raise ValueError(f"{name}: update_grad must be one of {base_lib.UPDATE_GRADS}, got "
                     f"{update_grad!r}")

  # (path, base leaf shape, base leaf dtype) -> spec of (trainable, frozen) that init makes there.
  expected_specs: dict[tuple, Any] = {}

  def expected_spec(path, leaf):
    """The (trainable, frozen) spec init makes for this base leaf, or None if it can't be traced."""
    cache_key = (path, tuple(leaf.shape), jnp.dtype(leaf.dtype))
    if cache_key not in expected_specs:
      info = LeafInfo(path, tuple(leaf.shape), leaf.dtype,
                      targeting.kernel_axes(path, tuple(leaf.shape), kernel_axes))
      if state_spec is not None:
        expected_specs[cache_key] = state_spec(info)
        return expected_specs[cache_key]
      stats_like = jax.ShapeDtypeStruct((info.d_in, info.d_in), jnp.float32) if needs_stats \
          else None
      try:
        expected_specs[cache_key] = jax.eval_shape(
            lambda w, s: init_leaf(jax.random.key(0), info, w, s)[1:],
            jax.ShapeDtypeStruct(info.shape, info.dtype), stats_like)
      except jax.errors.JAXTypeError:     # an init that needs concrete values (host-side solvers)
        return None
    return expected_specs[cache_key]

  def init(key, params, stats=None):
    paths = targeting.resolve(params, targets)
    leaves = dict(targeting.named_leaves(params))
    st = flat_stats(stats)
    new_base, trainable, frozen = {}, {}, {}
    for path in paths:
      leaf = leaves[path]
      if not jnp.issubdtype(leaf.dtype, jnp.floating):
        raise ValueError(f"{name}: target {path} has dtype {leaf.dtype}; only float leaves can be "
                         f"adapted")
      axes = targeting.kernel_axes(path, tuple(leaf.shape), kernel_axes)
      info = LeafInfo(path, tuple(leaf.shape), leaf.dtype, axes)
      if needs_stats and path not in st:
        raise ValueError(f"{name}: calibration stats missing for target {path}; pass "
                         f"stats=lowrank_jax.calibrate.collect(...) covering it "
                         f"(have {sorted(st)[:5]})")
      b, t, f = init_leaf(tree_lib.derive_key(key, path), info, structured.materialize(leaf),
                          st.get(path))
      if b is not None:
        new_base[path] = b
      trainable[path] = t
      if f is not None:
        frozen[path] = f
      out_leaf = leaf if b is None else b
      expected_specs[(path, tuple(out_leaf.shape), jnp.dtype(out_leaf.dtype))] = spec_of((t, f))
    base = tree_lib.replace_by_name(params, new_base, is_leaf=structured.is_structured) \
        if new_base else params
    return base, base_lib.AdapterState(tree_lib.nest(trainable), tree_lib.nest(frozen))

  def apply(base, state, *, rng=None):
    trainable = tree_lib.unnest(state.trainable)
    frozen = tree_lib.unnest(state.frozen) if state.frozen else {}
    leaves = dict(targeting.named_leaves(base))
    missing = [p for p in trainable if p not in leaves]
    if missing:
      raise ValueError(f"{name}: adapter state refers to paths not in the params tree: "
                       f"{missing[:5]}; mismatched state/params trees (was the state made by "
                       f"init on these params?)")
    check_state_paths(name, targeting.resolve(base, targets), trainable, frozen)
    for path, t in trainable.items():
      spec = expected_spec(path, leaves[path])
      if spec is not None:
        check_state_spec(name, path, leaves[path], spec, (t, frozen.get(path)))
    out = {}
    for path, t in trainable.items():
      leaf_rng = None if rng is None else tree_lib.derive_key(rng, path)
      out[path] = apply_leaf(path, leaves[path], t, frozen.get(path), leaf_rng)
    return tree_lib.replace_by_name(base, out, is_leaf=structured.is_structured)

  def penalty(state):
    if penalty_leaf is None:
      return jnp.zeros((), jnp.float32)
    trainable = tree_lib.unnest(state.trainable)
    frozen = tree_lib.unnest(state.frozen) if state.frozen else {}
    terms = [penalty_leaf(t, frozen.get(p)) for p, t in trainable.items()]
    return jnp.mean(jnp.stack(terms)) if terms else jnp.zeros((), jnp.float32)

  return base_lib.Adapter(init=init, apply=apply, penalty=penalty, update=update, name=name,
                          update_grad=update_grad)


def spec_of(tree: Any) -> Any:
  """Shape/dtype skeleton of a pytree of arrays (what `jax.eval_shape` returns)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree)


def check_state_paths(name: str, targeted: list[str], trainable: dict, frozen: dict):
  """Raises a ValueError unless the state holds exactly the targeted paths (frozen: a subset)."""
  extra = sorted(set(trainable) - set(targeted))
  absent = sorted(set(targeted) - set(trainable))
  stray = sorted(set(frozen) - set(trainable))
  if extra or absent or stray:
    raise ValueError(f"{name}: the adapter state does not cover this adapter's targets: state "
                     f"paths not targeted {extra[:5]}, targeted paths without state "
                     f"{absent[:5]}, frozen buffers without trainable state {stray[:5]}; the "
                     f"state must hold exactly the targeted paths {targeted[:5]} (was the state "
                     f"made by init of this adapter on these params?)")


def check_state_spec(name: str, path: str, leaf: Any, expected: Any, got: Any):
  """Raises a ValueError naming the field that differs from what init makes for this leaf.

  Args:
    name: method name.
    path: the adapted leaf.
    leaf: the base leaf (for the message).
    expected: `(trainable, frozen)` spec that init makes for this leaf (`spec_of`).
    got: the `(trainable, frozen)` actually given.
  """
  where = (f"{name}: the state for {path} (params leaf shape {tuple(leaf.shape)}, dtype "
           f"{jnp.dtype(leaf.dtype)}) is not what this adapter's init makes")
  hint = "(was the state made by this adapter, with the same hparams, on these params?)"
  exp_leaves, exp_def = jax.tree_util.tree_flatten_with_path(expected)
  got_leaves, got_def = jax.tree_util.tree_flatten_with_path(got)
  if exp_def != got_def:
    raise ValueError(f"{where}: structure differs, expected {exp_def}, got {got_def} {hint}")
  for (kp, e), (_, g) in zip(exp_leaves, got_leaves):
    field = ("trainable" if kp[0].idx == 0 else "frozen") + jax.tree_util.keystr(kp[1:])
    g_shape, g_dtype = tuple(jnp.shape(g)), jnp.result_type(g)
    if tuple(e.shape) != g_shape or not holds_dtype(g_dtype, jnp.dtype(e.dtype)):
      raise ValueError(f"{where}: {field} expected shape {tuple(e.shape)} dtype "
                       f"{jnp.dtype(e.dtype)} (or a wider float for a float field), got shape "
                       f"{g_shape} dtype {g_dtype} {hint}")


def holds_dtype(got: Any, expected: Any) -> bool:
  """True if a `got` array carries every `expected` value: the same dtype, or a wider float
  (float64 states of float32 adapters, as in float64 gradient checks)."""
  if got == expected:
    return True
  return (jnp.issubdtype(got, jnp.floating) and jnp.issubdtype(expected, jnp.floating)
          and jnp.promote_types(got, expected) == got)


def check_int(name: str, field: str, value: Any, lo: int = 1, *, allow_none: bool = False):
  """Raises a ValueError naming `name: field` unless value is an int >= lo (or None if allowed)."""
  if allow_none and value is None:
    return
  if isinstance(value, bool) or not isinstance(value, int) or value < lo:
    what = f"None or an int >= {lo}" if allow_none else f"an int >= {lo}"
    raise ValueError(f"{name}: {field} must be {what}, got {value!r}")


def check_state_shape(name: str, path: str, leaf: Any, state_shape: tuple[int, ...],
                      in_ndim: Optional[int] = None):
  """The one check, in every `apply_leaf`, that a leaf's state was made for this params leaf.

  `state_shape` is the kernel shape the state implies. States that only know the matricized shape
  pass `(d_in, d_out)` and `in_ndim`: the leaf is then compared matricized, its first `in_ndim`
  axes as inputs.

  Raises:
    ValueError: the shapes differ (naming the path, both shapes, and the likely cause).
  """
  shape = tuple(leaf.shape)
  if in_ndim is not None:
    shape = (math.prod(shape[:in_ndim]), math.prod(shape[in_ndim:]))
  if tuple(state_shape) != shape:
    raise ValueError(f"{name}: the state for {path} implies a kernel of shape "
                     f"{tuple(state_shape)}, the params leaf has shape {tuple(leaf.shape)}"
                     f"{' (matricized ' + str(shape) + ')' if in_ndim is not None else ''}; "
                     f"mismatched state/params trees (was the state made by init on these "
                     f"params?)")


def check_finite_weight(name: str, info: LeafInfo, w: Any):
  """Raises a ValueError naming the path if a weight handed to a decomposition holds NaN/Inf.

  Skipped while tracing (`w` abstract), where no value exists to check.
  """
  if isinstance(w, jax.core.Tracer):
    return
  n_bad = int(jnp.size(w) - jnp.sum(jnp.isfinite(w)))
  if n_bad:
    raise ValueError(f"{name}: the weight at {info.path} (shape {info.shape}) has {n_bad} NaN/Inf "
                     f"entries; a decomposition init needs a finite weight (all entries finite)")


def check_rank(name: str, info: LeafInfo, rank: int):
  if rank > min(info.d_in, info.d_out):
    raise ValueError(f"{name}: rank={rank} > min(d_in, d_out)={min(info.d_in, info.d_out)} "
                     f"for {info.path} (shape {info.shape}, in_axes {info.axes.in_axes}); "
                     f"valid ranks are 1..{min(info.d_in, info.d_out)}")
