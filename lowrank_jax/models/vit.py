"""Vision Transformer (pre-LN, [CLS] token) as pure functions; `vit_tiny` and a `test` preset.

The patch embedding is a real strided convolution (`ops.conv`), so conv-LoRA / FLoRA have a target.

Parameter paths::

  patch_embed/{kernel,bias}                kernel (p, p, channels, hidden)
  cls_token                                (1, 1, hidden)
  pos_embed                                (1, num_patches + 1, hidden)
  encoder/layer_{i}/norm1/{scale,bias}
  encoder/layer_{i}/attention/{query,key,value,output}/{kernel,bias}
  encoder/layer_{i}/norm2/{scale,bias}
  encoder/layer_{i}/mlp/{fc1,fc2}/{kernel,bias}
  encoder/norm/{scale,bias}
  head/{kernel,bias}

Name map to Hugging Face `ViTForImageClassification` modules (`hf_name_map`)::

  patch_embed                       -> vit.embeddings.patch_embeddings.projection
  encoder/layer_0/norm1             -> vit.encoder.layer.0.layernorm_before
  encoder/layer_0/attention/query   -> vit.encoder.layer.0.attention.attention.query  (key, value)
  encoder/layer_0/attention/output  -> vit.encoder.layer.0.attention.output.dense
  encoder/layer_0/norm2             -> vit.encoder.layer.0.layernorm_after
  encoder/layer_0/mlp/fc1           -> vit.encoder.layer.0.intermediate.dense
  encoder/layer_0/mlp/fc2           -> vit.encoder.layer.0.output.dense
  encoder/norm                      -> vit.layernorm
  head                              -> classifier

(`cls_token` / `pos_embed` are HF parameters `vit.embeddings.cls_token` / `.position_embeddings`.
HF conv weights are (out, in, kh, kw); ours are (kh, kw, in, out).)

>>> import jax, jax.numpy as jnp
>>> from lowrank_jax.models import vit
>>> cfg = vit.ViTConfig.preset("test")
>>> p = vit.init(jax.random.key(0), cfg)
>>> vit.apply(p, jnp.zeros((2, 28, 28, 1)), cfg).shape
(2, 10)
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lowrank_jax.models import _layers as L

MODALITY = "image"   # `classify` reads `batch["image"]`
# `lowrank_jax.sharding` rules (regex on the param path -> spec per dim): column-parallel
# query/key/value/fc1, row-parallel output/fc2 over `tensor`, fsdp on each kernel's other dim; the
# patch embedding, tokens, norms and biases replicated.
PARTITION_RULES = (
    (r".*/attention/(query|key|value)/kernel|.*/mlp/fc1/kernel", ("fsdp", "tensor")),
    (r".*/attention/output/kernel|.*/mlp/fc2/kernel", ("tensor", "fsdp")),
    (r".*/bias|.*norm\d?/scale|patch_embed/kernel|cls_token|pos_embed", ()),
)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """ViT hyperparameters."""
  image_size: int = 224
  patch_size: int = 16
  channels: int = 3
  hidden_size: int = 192
  num_layers: int = 12
  num_heads: int = 3
  mlp_dim: int = 768
  num_classes: int = 1000
  layer_norm_eps: float = 1e-6
  dropout_rate: float = 0.0

  def __post_init__(self):
    for f in ("image_size", "patch_size", "channels", "hidden_size", "num_layers", "num_heads",
              "mlp_dim", "num_classes"):
      if getattr(self, f) <= 0:
        raise ValueError(f"ViTConfig.{f} must be positive, got {getattr(self, f)}")
    if self.image_size % self.patch_size:
      raise ValueError(f"ViTConfig.image_size={self.image_size} is not divisible by "
                       f"patch_size={self.patch_size}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"ViTConfig.hidden_size={self.hidden_size} is not divisible by "
                       f"num_heads={self.num_heads}")

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @classmethod
  def preset(cls, name: str) -> "ViTConfig":
    L.check_choice("preset", name, PRESETS)
    return PRESETS[name]


PRESETS = {
    "vit_tiny": ViTConfig(),                                        # ViT-Ti/16, 5.7M params
    "test": ViTConfig(image_size=28, patch_size=7, channels=1, hidden_size=32, num_layers=2,
                      num_heads=2, mlp_dim=64, num_classes=10),     # Fashion-MNIST sized
}


def init(key: jax.Array, cfg: ViTConfig, dtype=jnp.float32) -> dict:
  """Random ViT params."""
  d, p = cfg.hidden_size, cfg.patch_size
  k_patch, k_pos, k_head, k_layers = jax.random.split(key, 4)
  params = {
      "patch_embed": L.conv_init(k_patch, (p, p), cfg.channels, d, dtype=dtype),
      "cls_token": jnp.zeros((1, 1, d), dtype),
      "pos_embed": (0.02 * jax.random.normal(k_pos, (1, cfg.num_patches + 1, d))).astype(dtype),
      "encoder": {},
      "head": L.dense_init(k_head, d, cfg.num_classes, std=0.02, dtype=dtype),
  }
  for i in range(cfg.num_layers):
    ks = jax.random.split(jax.random.fold_in(k_layers, i), 6)
    params["encoder"][f"layer_{i}"] = {
        "norm1": L.layer_norm_init(d, dtype),
        "attention": {n: L.dense_init(k, d, d, dtype=dtype)
                      for n, k in zip(("query", "key", "value", "output"), ks[:4])},
        "norm2": L.layer_norm_init(d, dtype),
        "mlp": {"fc1": L.dense_init(ks[4], d, cfg.mlp_dim, dtype=dtype),
                "fc2": L.dense_init(ks[5], cfg.mlp_dim, d, dtype=dtype)},
    }
  params["encoder"]["norm"] = L.layer_norm_init(d, dtype)
  return params


def apply(params: dict, images: jax.Array, cfg: ViTConfig, *, deterministic: bool = True,
          rng: jax.Array | None = None, return_features: bool = False) -> jax.Array:
  """Logits (B, num_classes) for images (B, H, W, C); or the [CLS] features if `return_features`."""
  if images.ndim != 4 or images.shape[1:] != (cfg.image_size, cfg.image_size, cfg.channels):
    raise ValueError(f"images must be (B, {cfg.image_size}, {cfg.image_size}, {cfg.channels}), "
                     f"got {images.shape}")
  x = L.conv(params["patch_embed"], images, strides=cfg.patch_size, padding="VALID")
  b = x.shape[0]
  x = x.reshape(b, -1, cfg.hidden_size)
  cls = jnp.broadcast_to(params["cls_token"], (b, 1, cfg.hidden_size)).astype(x.dtype)
  x = jnp.concatenate([cls, x], axis=1) + params["pos_embed"]
  x = L.dropout(x, cfg.dropout_rate, L.fold(rng, 0), deterministic)
  for i in range(cfg.num_layers):
    lp = params["encoder"][f"layer_{i}"]
    a = lp["attention"]
    h = L.layer_norm(lp["norm1"], x, cfg.layer_norm_eps)
    q, k, v = (L.split_heads(L.dense(a[n], h), cfg.num_heads) for n in ("query", "key", "value"))
    h = L.dense(a["output"], L.merge_heads(jax.nn.dot_product_attention(q, k, v)))
    x = x + L.dropout(h, cfg.dropout_rate, L.fold(rng, i + 1, 0), deterministic)
    h = L.layer_norm(lp["norm2"], x, cfg.layer_norm_eps)
    h = L.dense(lp["mlp"]["fc2"], jax.nn.gelu(L.dense(lp["mlp"]["fc1"], h), approximate=False))
    x = x + L.dropout(h, cfg.dropout_rate, L.fold(rng, i + 1, 1), deterministic)
  feats = L.layer_norm(params["encoder"]["norm"], x[:, 0], cfg.layer_norm_eps)
  return feats if return_features else L.dense(params["head"], feats)


def classify(params: dict, cfg: ViTConfig, batch, *, deterministic: bool = True,
             rng: jax.Array | None = None) -> jax.Array:
  """Class logits of `batch["image"]` (the classifier interface shared with text models)."""
  return apply(params, batch["image"], cfg, deterministic=deterministic, rng=rng)


def dummy_batch(cfg: ViTConfig) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of a one-example `classify` batch (for `jax.eval_shape`)."""
  return {"image": jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.channels), jnp.float32)}


def hf_name_map(cfg: ViTConfig) -> dict[str, str]:
  """{our module path: HF `ViTForImageClassification` module name}."""
  m = {"patch_embed": "vit.embeddings.patch_embeddings.projection"}
  for i in range(cfg.num_layers):
    o, h = f"encoder/layer_{i}", f"vit.encoder.layer.{i}"
    m[f"{o}/norm1"] = f"{h}.layernorm_before"
    for n in ("query", "key", "value"):
      m[f"{o}/attention/{n}"] = f"{h}.attention.attention.{n}"
    m[f"{o}/attention/output"] = f"{h}.attention.output.dense"
    m[f"{o}/norm2"] = f"{h}.layernorm_after"
    m[f"{o}/mlp/fc1"] = f"{h}.intermediate.dense"
    m[f"{o}/mlp/fc2"] = f"{h}.output.dense"
  m["encoder/norm"] = "vit.layernorm"
  m["head"] = "classifier"
  return m
