"""Method names -> adapter factories: the explicit registry the runner and configs use.

An explicit dict (scenic `get_model_cls` style), not an import-time global registry. Each entry
names the module and factory function; modules are imported when a method is asked for, so a method whose
module is absent or broken does not break the others (its lookup raises a clear error instead).

>>> from lowrank_jax import registry
>>> adapter = registry.make_adapter("lora", rank=2, targets=r"dense/kernel")
>>> adapter.name
'lora'
>>> registry.make_adapter("lora2")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: Unknown adapter method 'lora2'; valid names: [...]
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

from lowrank_jax import base as base_lib

# name -> (module, factory name). "none" is the frozen-base baseline (only the head trains).
METHODS: dict[str, tuple[str, str]] = {
    "none": ("lowrank_jax.base", "identity"),
    "lora": ("lowrank_jax.adapters.lora", "lora"),
    "pissa": ("lowrank_jax.adapters.lora", "pissa"),
    "loldu": ("lowrank_jax.adapters.loldu", "loldu"),
    "krona": ("lowrank_jax.adapters.krona", "krona"),
    "diffusekrona": ("lowrank_jax.adapters.krona", "diffusekrona"),
    "nola": ("lowrank_jax.adapters.nola", "nola"),
    "sorsa": ("lowrank_jax.adapters.sorsa", "sorsa"),
    "flora": ("lowrank_jax.adapters.flora", "flora"),
    "intrinsic": ("lowrank_jax.adapters.intrinsic", "intrinsic_dimension"),
    "corda": ("lowrank_jax.adapters.corda", "corda"),
    "increlora": ("lowrank_jax.adapters.increlora", "increlora"),
    "adalora": ("lowrank_jax.adapters.adalora", "adalora"),
}

# Methods whose `init` needs calibration statistics (`lowrank_jax.calibrate.collect`).
NEEDS_STATS = frozenset({"corda"})

# Methods whose rank allocation changes during training: name -> (module, `state -> {path: rank}`).
RANK_ALLOCATION: dict[str, tuple[str, str]] = {
    "increlora": ("lowrank_jax.adapters.increlora", "rank_allocation"),
    "adalora": ("lowrank_jax.adapters.increlora", "rank_allocation"),
}


def needs_stats(name: str) -> bool:
  """Whether method `name`'s `init` needs calibration statistics."""
  return name in NEEDS_STATS


def rank_allocation_fn(name: str) -> Callable[[base_lib.AdapterState], dict] | None:
  """`state -> {path: active rank}` for methods that grow/prune ranks, else None."""
  if name not in RANK_ALLOCATION:
    return None
  module_name, attr = RANK_ALLOCATION[name]
  return getattr(importlib.import_module(module_name), attr)


def list_methods(available_only: bool = False) -> list[str]:
  """Registered method names (sorted); with `available_only`, only those whose module imports."""
  names = sorted(METHODS)
  if available_only:
    names = [n for n in names if _try_factory(n)[0] is not None]
  return names


def _try_factory(name: str) -> tuple[Callable[..., Any] | None, str]:
  module_name, attr = METHODS[name]
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    return None, f"module {module_name} cannot be imported ({e})"
  fn = getattr(module, attr, None)
  if fn is None:
    return None, f"module {module_name} has no factory {attr!r}"
  return fn, ""


def get_factory(name: str) -> Callable[..., base_lib.Adapter]:
  """The factory of method `name`.

  Raises:
    ValueError: unknown name (lists the valid names), or a registered method whose module is not
      available in this checkout.
  """
  if name not in METHODS:
    raise ValueError(f"Unknown adapter method {name!r}; valid names: {list_methods()}")
  fn, why = _try_factory(name)
  if fn is None:
    raise ValueError(f"Adapter method {name!r} is registered but not available: {why}. "
                     f"Available methods: {list_methods(available_only=True)}")
  return fn


def make_adapter(name: str, **kwargs) -> base_lib.Adapter:
  """Builds the adapter `name` with factory keyword arguments `kwargs`.

  Raises:
    ValueError: unknown/unavailable method, or arguments the factory does not accept.
  """
  fn = get_factory(name)
  if name == "none":
    return fn()
  try:
    return fn(**kwargs)
  except TypeError as e:
    raise ValueError(f"Adapter method {name!r} rejected its arguments {sorted(kwargs)}: {e}") \
        from None
