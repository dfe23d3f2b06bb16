"""Models as pure functions over nested-dict params, built on `lowrank_jax.ops`.

Each module exposes a frozen config dataclass with presets, `init(key, cfg) -> params`,
`apply(params, inputs, cfg, *, deterministic=True, rng=None)` and `hf_name_map(cfg)`.

>>> from lowrank_jax import models
>>> spec = models.get_model("mlp_digits")
>>> import jax; params = spec.init(jax.random.key(0))
>>> sorted(params)
['dense_0', 'dense_1']
"""
from __future__ import annotations

import types
from typing import Any, NamedTuple

import jax

from lowrank_jax.models import cnn, llama, minilm, mlp, vit


class ModelSpec(NamedTuple):
  """A registry entry: the model module and its config."""
  name: str
  module: types.ModuleType
  config: Any

  def init(self, key: jax.Array, **kwargs):
    return self.module.init(key, self.config, **kwargs)

  def apply(self, params, inputs, **kwargs):
    return self.module.apply(params, inputs, self.config, **kwargs)

  def hf_name_map(self) -> dict[str, str]:
    return self.module.hf_name_map(self.config)


_REGISTRY: dict[str, tuple[types.ModuleType, Any]] = {
    "mlp_digits": (mlp, mlp.PRESETS["digits"]),
    "mlp_mnist": (mlp, mlp.PRESETS["mnist"]),
    "cnn_mnist": (cnn, cnn.PRESETS["mnist"]),
    "cnn_digits": (cnn, cnn.PRESETS["digits"]),
    "cnn_cifar": (cnn, cnn.PRESETS["cifar"]),
    "vit_tiny": (vit, vit.PRESETS["vit_tiny"]),
    "vit_test": (vit, vit.PRESETS["test"]),
    "minilm": (minilm, minilm.MiniLMConfig.all_minilm_l6_v2()),
    "minilm_tiny": (minilm, minilm.MiniLMConfig.tiny()),
    "llama_tiny": (llama, llama.PRESETS["tiny"]),
    "llama_small": (llama, llama.PRESETS["small"]),
    "tinyllama_1_1b": (llama, llama.PRESETS["tinyllama_1_1b"]),
    "llama2_7b": (llama, llama.PRESETS["llama2_7b"]),
}


def list_models() -> list[str]:
  return sorted(_REGISTRY)


def get_model(name: str) -> ModelSpec:
  """Registry lookup; raises ValueError listing the valid names.

  `minilm` is the all-MiniLM-L6-v2 shape; its pretrained params come from `minilm.load_pretrained()`.
  """
  if name not in _REGISTRY:
    raise ValueError(f"Unknown model {name!r}; valid names: {list_models()}")
  module, cfg = _REGISTRY[name]
  return ModelSpec(name, module, cfg)


__all__ = ["ModelSpec", "get_model", "list_models", "cnn", "llama", "minilm", "mlp", "vit"]
