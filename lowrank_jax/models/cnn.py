"""A small CNN (3x3 convs, 2x2 average pooling, global average pooling, dense head).

Its conv kernels are real 4-D tensors (kh, kw, c_in, c_out), so FLoRA and conv-LoRA have targets.

Parameter paths: ``conv_{i}/{kernel,bias}``, ``head/{kernel,bias}``. Name map (`hf_name_map`) to a
PyTorch module with ``convs = nn.ModuleList(...)`` and ``fc``: ``conv_{i}`` -> ``convs.{i}``,
``head`` -> ``fc`` (conv weights are (out, in, kh, kw) there).

>>> import jax, jax.numpy as jnp
>>> from lowrank_jax.models import cnn
>>> cfg = cnn.CNNConfig()
>>> cnn.apply(cnn.init(jax.random.key(0), cfg), jnp.zeros((2, 28, 28, 1)), cfg).shape
(2, 10)
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lowrank_jax.models import _layers as L

MODALITY = "image"   # `classify` reads `batch["image"]`


@dataclasses.dataclass(frozen=True)
class CNNConfig:
  """Conv stack: `channels[i]` filters of `kernel_size` each, pooled by 2 after each conv."""
  in_channels: int = 1
  channels: tuple[int, ...] = (16, 32)
  kernel_size: int = 3
  num_classes: int = 10
  dropout_rate: float = 0.0

  def __post_init__(self):
    if self.in_channels <= 0 or self.num_classes <= 0 or self.kernel_size <= 0:
      raise ValueError("CNNConfig.in_channels, kernel_size and num_classes must be positive")
    if not self.channels or any(c <= 0 for c in self.channels):
      raise ValueError(f"CNNConfig.channels needs >= 1 positive sizes, got {self.channels}")

  @classmethod
  def preset(cls, name: str) -> "CNNConfig":
    L.check_choice("preset", name, PRESETS)
    return PRESETS[name]


PRESETS = {
    "mnist": CNNConfig(),
    "digits": CNNConfig(channels=(8, 16)),
    "cifar": CNNConfig(in_channels=3, channels=(32, 64, 128)),
}


def init(key: jax.Array, cfg: CNNConfig, dtype=jnp.float32) -> dict:
  """Random params of the CNN `cfg` describes: `conv_i` layers, then the dense `head`."""
  k = cfg.kernel_size
  params, c_in = {}, cfg.in_channels
  for i, c in enumerate(cfg.channels):
    params[f"conv_{i}"] = L.conv_init(jax.random.fold_in(key, i), (k, k), c_in, c, dtype=dtype)
    c_in = c
  params["head"] = L.dense_init(jax.random.fold_in(key, len(cfg.channels)), c_in,
                                cfg.num_classes, dtype=dtype)
  return params


def apply(params: dict, images: jax.Array, cfg: CNNConfig, *, deterministic: bool = True,
          rng: jax.Array | None = None) -> jax.Array:
  """Logits (B, num_classes) for images (B, H, W, in_channels)."""
  if images.ndim != 4 or images.shape[-1] != cfg.in_channels:
    raise ValueError(f"images must be (B, H, W, {cfg.in_channels}), got {images.shape}")
  x = images
  for i in range(len(cfg.channels)):
    x = jax.nn.relu(L.conv(params[f"conv_{i}"], x, padding="SAME"))
    if min(x.shape[1:3]) >= 2:
      x = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4.0
  x = jnp.mean(x, axis=(1, 2))
  x = L.dropout(x, cfg.dropout_rate, rng, deterministic)
  return L.dense(params["head"], x)


def classify(params: dict, cfg: CNNConfig, batch, *, deterministic: bool = True,
             rng: jax.Array | None = None) -> jax.Array:
  """Class logits of `batch["image"]` (the classifier interface shared with text models)."""
  return apply(params, batch["image"], cfg, deterministic=deterministic, rng=rng)


def dummy_batch(cfg: CNNConfig) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of a one-example `classify` batch (for `jax.eval_shape`)."""
  return {"image": jax.ShapeDtypeStruct((1, 8, 8, cfg.in_channels), jnp.float32)}


def hf_name_map(cfg: CNNConfig) -> dict[str, str]:
  """{our module path: torch module name}."""
  m = {f"conv_{i}": f"convs.{i}" for i in range(len(cfg.channels))}
  m["head"] = "fc"
  return m
