"""Multi-layer perceptron as pure functions.

Parameter paths: ``dense_{i}/{kernel,bias}`` for i = 0..len(features)-2 (the last one is the
output layer). Name map (`hf_name_map`) to a PyTorch ``nn.Sequential`` of Linear/activation pairs:
``dense_{i}`` -> ``layers.{2 i}``.

>>> import jax, jax.numpy as jnp
>>> from lowrank_jax.models import mlp
>>> cfg = mlp.MLPConfig(features=(64, 32, 10))
>>> mlp.apply(mlp.init(jax.random.key(0), cfg), jnp.zeros((4, 64)), cfg).shape
(4, 10)
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lowrank_jax.models import _layers as L

MODALITY = "image"   # `classify` reads `batch["image"]`
# `lowrank_jax.sharding` rules: kernels fsdp-sharded on their inputs (64, 784, 128, 256: divisible
# by 8), biases replicated.
PARTITION_RULES = ((r"dense_\d+/kernel", ("fsdp", None)), (r"dense_\d+/bias", ()))

ACTIVATIONS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "tanh": jnp.tanh, "silu": jax.nn.silu}


@dataclasses.dataclass(frozen=True)
class MLPConfig:
  """`features` = (input dim, hidden dims..., output dim)."""
  features: tuple[int, ...] = (64, 128, 10)
  activation: str = "relu"
  dropout_rate: float = 0.0

  def __post_init__(self):
    if len(self.features) < 2 or any(int(f) <= 0 for f in self.features):
      raise ValueError(f"MLPConfig.features needs >= 2 positive sizes, got {self.features}")
    L.check_choice("MLPConfig.activation", self.activation, ACTIVATIONS)

  @classmethod
  def preset(cls, name: str) -> "MLPConfig":
    L.check_choice("preset", name, PRESETS)
    return PRESETS[name]


PRESETS = {
    "digits": MLPConfig(features=(64, 128, 10)),
    "mnist": MLPConfig(features=(784, 256, 256, 10)),
}


def init(key: jax.Array, cfg: MLPConfig, dtype=jnp.float32) -> dict:
  """Random params of the MLP `cfg` describes: `dense_i` maps `features[i]` to `features[i+1]`."""
  f = cfg.features
  return {f"dense_{i}": L.dense_init(jax.random.fold_in(key, i), f[i], f[i + 1], dtype=dtype)
          for i in range(len(f) - 1)}


def apply(params: dict, x: jax.Array, cfg: MLPConfig, *, deterministic: bool = True,
          rng: jax.Array | None = None) -> jax.Array:
  """Logits (B, features[-1]); inputs with more than 2 dims are flattened."""
  x = x.reshape(x.shape[0], -1)
  if x.shape[-1] != cfg.features[0]:
    raise ValueError(f"MLP input has {x.shape[-1]} features, config expects {cfg.features[0]}")
  n = len(cfg.features) - 1
  for i in range(n):
    x = L.dense(params[f"dense_{i}"], x)
    if i < n - 1:
      x = ACTIVATIONS[cfg.activation](x)
      x = L.dropout(x, cfg.dropout_rate, L.fold(rng, i), deterministic)
  return x


def classify(params: dict, cfg: MLPConfig, batch, *, deterministic: bool = True,
             rng: jax.Array | None = None) -> jax.Array:
  """Class logits of `batch["image"]` (the classifier interface shared with text models)."""
  return apply(params, batch["image"], cfg, deterministic=deterministic, rng=rng)


def dummy_batch(cfg: MLPConfig) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of a one-example `classify` batch (for `jax.eval_shape`)."""
  return {"image": jax.ShapeDtypeStruct((1, cfg.features[0]), jnp.float32)}


def hf_name_map(cfg: MLPConfig) -> dict[str, str]:
  """{our module path: torch nn.Sequential name}."""
  return {f"dense_{i}": f"layers.{2 * i}" for i in range(len(cfg.features) - 1)}
