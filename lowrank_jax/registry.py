"""Method names -> the modules that declare them: the explicit registry the runner and configs use.

An explicit dict (scenic `get_model_cls` style), not an import-time global registry. Each method
module ends with `METHOD_FACTS = {name: base.MethodFacts(...)}`: its factory, whether `init` needs
calibration statistics, its rank allocation, what the generic config `rank` means for it, and
whether it exports to PEFT. Modules are imported when a method is asked for, so a method whose
module is absent or broken does not break the others (its lookup raises a clear error instead).

>>> from lowrank_jax import registry
>>> adapter = registry.make_adapter("lora", rank=2, targets=r"dense/kernel")
>>> adapter.name, adapter.hparams["rank"]
('lora', 2)
>>> registry.make_adapter("lora2")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: Unknown adapter method 'lora2'; valid names: [...]
"""
from __future__ import annotations

import importlib
import inspect
from typing import Callable

from lowrank_jax import base as base_lib

# name -> the module whose METHOD_FACTS declares it. "none" is the frozen-base baseline.
METHODS: dict[str, str] = {
    "none": "lowrank_jax.base",
    "lora": "lowrank_jax.adapters.lora",
    "pissa": "lowrank_jax.adapters.lora",
    "loldu": "lowrank_jax.adapters.loldu",
    "krona": "lowrank_jax.adapters.krona",
    "diffusekrona": "lowrank_jax.adapters.krona",
    "nola": "lowrank_jax.adapters.nola",
    "sorsa": "lowrank_jax.adapters.sorsa",
    "flora": "lowrank_jax.adapters.flora",
    "intrinsic": "lowrank_jax.adapters.intrinsic",
    "corda": "lowrank_jax.adapters.corda",
    "increlora": "lowrank_jax.adapters.increlora",
    "adalora": "lowrank_jax.adapters.adalora",
    "stn": "lowrank_jax.adapters.stn",
}


def list_methods(available_only: bool = False) -> list[str]:
  """Registered method names (sorted); with `available_only`, only those whose facts load."""
  names = sorted(METHODS)
  if available_only:
    names = [n for n in names if _try_facts(n)[0] is not None]
  return names


def _try_facts(name: str) -> tuple[base_lib.MethodFacts | None, str]:
  module_name = METHODS[name]
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    return None, f"module {module_name} cannot be imported ({e})"
  facts = getattr(module, "METHOD_FACTS", {}).get(name)
  if not isinstance(facts, base_lib.MethodFacts):
    return None, f"module {module_name} declares no METHOD_FACTS[{name!r}]"
  return facts, ""


def facts(name: str) -> base_lib.MethodFacts:
  """What method `name`'s module declares about it (`base.MethodFacts`).

  Raises:
    ValueError: unknown name (lists the valid names), or a registered method whose module is not
      available in this checkout or declares no facts for it.
  """
  if name not in METHODS:
    raise ValueError(f"Unknown adapter method {name!r}; valid names: {list_methods()}")
  found, why = _try_facts(name)
  if found is None:
    raise ValueError(f"Adapter method {name!r} is registered but not available: {why}. "
                     f"Available methods: {list_methods(available_only=True)}")
  return found


def method_of(adapter: base_lib.Adapter) -> str | None:
  """The registered method that builds adapters named like `adapter`, or None (e.g. a `chain`).

  A method's adapters carry its registry name or one of its `MethodFacts.adapter_names`; a
  DiffuseKronA adapter is a KronA adapter (`"krona"`), a `lora(init="pissa")` one is `"pissa"`.
  """
  for name in list_methods(available_only=True):
    if adapter.name == name or adapter.name in facts(name).adapter_names:
      return name
  return None


def needs_stats(name: str) -> bool:
  """Whether method `name`'s `init` needs calibration statistics."""
  return facts(name).needs_stats


def rank_allocation_fn(name: str) -> Callable[[base_lib.AdapterState], dict] | None:
  """`state -> {path: active rank}` for methods that grow/prune ranks, else None."""
  return facts(name).rank_allocation


def get_factory(name: str) -> Callable[..., base_lib.Adapter]:
  """The factory of method `name` (raises like `facts`)."""
  return facts(name).factory


def make_adapter(name: str, **kwargs) -> base_lib.Adapter:
  """Builds the adapter `name` with factory keyword arguments `kwargs`.

  Raises:
    ValueError: unknown/unavailable method, or arguments the factory does not accept.
  """
  fn = get_factory(name)
  try:
    return fn(**kwargs)
  except TypeError as e:
    raise ValueError(f"Adapter method {name!r} rejected its arguments {sorted(kwargs)}: {e}") \
        from None


def configured_adapter(name: str, rank: int, targets, *, alpha: float | None = None,
                       total_steps: int = 0) -> base_lib.Adapter:
  """The adapter of method `name` sized by the generic knob `rank` (`MethodFacts.config_kwargs`),
  with the run length `total_steps` also handed to a factory that takes it and that
  `config_kwargs` leaves out (AdaLoRA's pruning schedule needs it).

  Raises:
    ValueError: like `facts` and `make_adapter`.
  """
  kwargs = facts(name).config_kwargs(rank, alpha, targets, total_steps)
  return make_adapter(name, **with_run_settings(name, kwargs, total_steps=total_steps))


def with_run_settings(name: str, kwargs: dict, **run_settings) -> dict:
  """`kwargs` plus each of `run_settings` (e.g. `total_steps`, `base_lr`) that method `name`'s
  factory takes and `kwargs` leaves out; what `kwargs` sets wins."""
  accepted = inspect.signature(get_factory(name)).parameters
  return {**{k: v for k, v in run_settings.items() if k in accepted}, **kwargs}
