"""The adapter contract: a NamedTuple of pure functions, like `optax.GradientTransformation`.

>>> import jax, jax.numpy as jnp, lowrank_jax as lj
>>> params = {'dense': {'kernel': jnp.ones((4, 3)), 'bias': jnp.zeros(3)}}
>>> adapter = lj.lora(rank=2, alpha=4.0, targets=r'dense/kernel')
>>> base, state = adapter.init(jax.random.key(0), params)
>>> p2 = adapter.apply(base, state)            # same tree structure, a LowRank leaf
>>> bool(jnp.allclose(lj.merge(p2)['dense']['kernel'], params['dense']['kernel']))
True
>>> lj.count_params(state)
14
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import types
from typing import Any, Callable, Mapping, NamedTuple, Optional, Protocol

import jax
import jax.numpy as jnp

PyTree = Any


class AdapterState(NamedTuple):
  """An adapter's arrays, split by structure.

  Attributes:
    trainable: pytree differentiated and updated by the optimizer.
    frozen: pytree of buffers that are never trained (NOLA seeds, LoLDU pivots, masks, ...).
  """
  trainable: PyTree
  frozen: PyTree


EmptyState = AdapterState({}, {})


class InitFn(Protocol):

  def __call__(self, key: jax.Array, params: PyTree,
               stats: Optional[PyTree] = None) -> tuple[PyTree, AdapterState]:
    """Returns `(base, state)`: the frozen tree to keep instead of `params`, and the adapter state.

    Pure: `params` is not modified. For additive methods `base` shares the leaves of `params`; for
    residual methods (PiSSA, SORSA, CorDA, LoLDU) targeted leaves are replaced by their residual.
    """


class ApplyFn(Protocol):

  def __call__(self, base: PyTree, state: AdapterState, *,
               rng: Optional[jax.Array] = None) -> PyTree:
    """Returns params of the same tree structure as `base`, adapted leaves as structured weights.

    `rng` (optional) drives stochastic parts such as adapter dropout; `None` is deterministic.
    """


class PenaltyFn(Protocol):

  def __call__(self, state: AdapterState) -> jax.Array:
    """The method's regularizer, added to the task loss (0 for most methods)."""


class UpdateFn(Protocol):

  def __call__(self, state: AdapterState, grads: PyTree, step: jax.Array) -> AdapterState:
    """Changes the state outside the gradient (rank growth/pruning) with static shapes."""


def zero_penalty(state: AdapterState) -> jax.Array:
  """The penalty of a method without regularizer: a float32 scalar 0."""
  del state
  return jnp.zeros((), jnp.float32)


class Adapter(NamedTuple):
  """A parameter-efficient method as pure functions over parameter pytrees.

  Attributes:
    init: `(key, params, stats=None) -> (base, state)`.
    apply: `(base, state, *, rng=None) -> params'`.
    penalty: `state -> scalar` regularizer.
    update: optional `(state, grads, step) -> state` for methods that change during training.
    name: a short method name (used by `describe` and adapter files).
    hparams: the hyperparameters the adapter was built with (rank, alpha, init, targets, ...), so
      adapter files and exporters read them from the adapter instead of asking again.
    update_grad: which gradient `update` sees: "task" (of the task loss only, without
      `penalty`) or "total" (of task loss + penalty, what the optimizer sees).
  """
  init: InitFn
  apply: ApplyFn
  penalty: PenaltyFn = zero_penalty
  update: Optional[UpdateFn] = None
  name: str = "adapter"
  hparams: Mapping[str, Any] = types.MappingProxyType({})
  update_grad: str = "total"


UPDATE_GRADS = ("task", "total")


def with_trainable(state: AdapterState, trainable: PyTree) -> AdapterState:
  """`state` with its trainable tree replaced by `trainable` (the frozen buffers kept)."""
  return AdapterState(trainable, state.frozen)


def count_params(state_or_tree: Any) -> int:
  """Number of trainable scalars: of `state.trainable` for an AdapterState, else of the tree."""
  tree = state_or_tree.trainable if isinstance(state_or_tree, AdapterState) else state_or_tree
  return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))


def records_hparams(factory: Callable[..., Adapter]) -> Callable[..., Adapter]:
  """Makes the adapters `factory` builds carry the arguments they were built with.

  The call is bound to the factory's signature with its defaults applied, so `hparams` holds every
  argument (`rank`, `alpha`, `targets`, `init`, `dropout`, ...), not only those passed. Keyword
  arguments collected by `**kwargs` are merged in at the top level. A factory that delegates to
  another decorated factory (`pissa` -> `lora`) keeps the delegate's full set, updated by its
  own.

  Args:
    factory: a function returning an `Adapter`.

  Returns:
    The factory, same signature and docstring, returning adapters with `hparams` filled.
  """
  signature = inspect.signature(factory)

  @functools.wraps(factory)
  def build(*args, **kwargs):
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    adapter = factory(*args, **kwargs)
    return adapter._replace(hparams=types.MappingProxyType(
        {**adapter.hparams, **_flat_arguments(signature, bound.arguments)}))

  return build


def _flat_arguments(signature: inspect.Signature, arguments: Mapping[str, Any]) -> dict[str, Any]:
  flat = {}
  for name, value in arguments.items():
    if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
      flat.update(value)
    else:
      flat[name] = value
  return flat


def identity() -> Adapter:
  """The adapter that adapts nothing (useful as a baseline and in `partition`); no hparams."""
  return Adapter(init=lambda key, params, stats=None: (params, AdapterState({}, {})),
                 apply=lambda base, state, *, rng=None: base, name="identity")


ConfigKwargsFn = Callable[[int, Optional[float], Any, int], dict]


@dataclasses.dataclass(frozen=True)
class MethodFacts:
  """What a runner needs to know about one registered method, declared by the method's module.

  Each method module ends with `METHOD_FACTS = {registry name: MethodFacts(...)}`;
  `lowrank_jax.registry` reads it when the method is asked for.

  Attributes:
    factory: builds the adapter from keyword arguments.
    config_kwargs: `(rank, alpha, targets, total_steps) -> factory kwargs`, what the generic size
      knob `rank` means for this method (LoRA rank, NOLA basis counts, subspace dimension, ...).
      `alpha` is None when the caller leaves it to the method's default; `total_steps` (the run
      length, 0 when unknown) sizes schedules that depend on it.
    needs_stats: whether `init` needs calibration statistics (`lowrank_jax.calibrate.collect`).
    stats_sample_scale: the `sample_scale` those statistics are collected with (None: plain
      per-token sums; see `lowrank_jax.calibrate.collect`).
    rank_allocation: `state -> {path: active rank}` for methods whose ranks change during
      training, else None.
    peft_exportable: whether `lowrank_jax.adapter_io.export_peft` writes its state as a PEFT LoRA.
    residual_init: whether `init` replaces the targeted weights by a residual, so that the state
      alone does not give the update to the original weights (a PEFT export needs the initial
      factors).
    adapter_names: the names (`Adapter.name`) the factory gives its adapters when they differ from
      the registry name (CorDA's "corda_ipa" / "corda_kpa"), so an adapter's method can be found.
  """
  factory: Callable[..., Adapter]
  config_kwargs: ConfigKwargsFn
  needs_stats: bool = False
  stats_sample_scale: Optional[str] = None
  rank_allocation: Optional[Callable[[AdapterState], dict]] = None
  peft_exportable: bool = False
  residual_init: bool = False
  adapter_names: tuple[str, ...] = ()


def _identity_config(rank, alpha, targets, total_steps) -> dict:
  """The frozen-base baseline takes no arguments: only the head trains."""
  del rank, alpha, targets, total_steps
  return {}


METHOD_FACTS = {"none": MethodFacts(identity, _identity_config, adapter_names=("identity",))}
