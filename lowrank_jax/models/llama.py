"""Llama-family decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) as pure functions.

Presets run from `tiny` (tests) to `tinyllama_1_1b` and `llama2_7b` shapes (benchmarks; random
init, use `jax.eval_shape(init, ...)` to get shapes without allocating). `load_hf_checkpoint(path)`
reads a local Hugging Face checkpoint directory of the Llama family (Llama, Mistral, Qwen2:
``config.json`` + ``model.safetensors`` or shards listed in ``model.safetensors.index.json``);
`save_hf_checkpoint` writes one in the same layout.

The family differs in small switches, all in `LlamaConfig`: grouped-query attention
(`num_kv_heads`, 1 for multi-query), `head_dim`, biases on the attention projections (`qkv_bias`,
`o_bias`) and on the MLP (`mlp_bias`), an lm head tied to the embedding (`tie_word_embeddings`),
and RoPE frequency scaling (`rope_scaling`: Llama-3's "llama3" or "linear").

Parameter paths (kernels in flax layout ``(d_in, d_out)``)::

  embed/embedding
  layers/layer_{i}/attention/{q_proj,k_proj,v_proj,o_proj}/kernel  (+ bias: qkv_bias, o_bias)
  layers/layer_{i}/mlp/{gate_proj,up_proj,down_proj}/kernel        (+ bias: mlp_bias)
  layers/layer_{i}/{input_norm,post_attention_norm}/scale
  final_norm/scale
  lm_head/kernel                                          (absent with tie_word_embeddings)

Name map to Hugging Face `LlamaForCausalLM` modules (`hf_name_map`; our path without its leaf)::

  embed                               -> model.embed_tokens
  layers/layer_0/attention/q_proj     -> model.layers.0.self_attn.q_proj   (k, v, o alike)
  layers/layer_0/mlp/gate_proj        -> model.layers.0.mlp.gate_proj      (up, down alike)
  layers/layer_0/input_norm           -> model.layers.0.input_layernorm
  layers/layer_0/post_attention_norm  -> model.layers.0.post_attention_layernorm
  final_norm                          -> model.norm
  lm_head                             -> lm_head

Leaves: kernel <-> weight (transposed), bias <-> bias, embedding <-> weight, scale <-> weight. RoPE
uses the HF "rotate half" convention, so HF checkpoints load without permuting q/k.

>>> import jax, jax.numpy as jnp
>>> from lowrank_jax.models import llama
>>> cfg = llama.LlamaConfig.preset("tiny")
>>> params = llama.init(jax.random.key(0), cfg)
>>> llama.apply(params, jnp.zeros((1, 8), jnp.int32), cfg).shape
(1, 8, 256)
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax import multi
from lowrank_jax import ops
from lowrank_jax import quant
from lowrank_jax import structured
from lowrank_jax.models import _layers as L
from lowrank_jax.models import monet

ROPE_TYPES = ("linear", "llama3")
FFNS = ("swiglu", "monet")
ATTENTION_IMPLS = ("xla", "cudnn")
# Config fields that choose how the same function is computed (precision, memory, kernels), not
# its shapes or weights: a run may set them on a loaded checkpoint (`model.config`).
EXECUTION_FIELDS = ("compute_dtype", "remat", "remat_layers", "scan_layers", "attention")
# `lowrank_jax.sharding` rules (regex on the param path -> spec per dim): Megatron-style tensor
# parallelism (column-parallel q/k/v/gate/up, row-parallel o/down, vocab-parallel embedding and
# lm head), fsdp on each kernel's other dim; norms replicated.
PARTITION_RULES = (
    (r"embed/embedding", ("tensor", "fsdp")),
    (r".*/(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel", ("fsdp", "tensor")),
    (r".*/(o_proj|down_proj)/kernel", ("tensor", "fsdp")),
    (r".*/(q_proj|k_proj|v_proj|gate_proj|up_proj)/bias", ("tensor",)),
    (r".*/(o_proj|down_proj)/bias|.*norm/scale", ()),
    (r"lm_head/kernel", ("fsdp", "tensor")),
)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling (the HF `rope_scaling` dict without its "default" type).

  Attributes:
    rope_type: "linear" (every inverse frequency divided by `factor`, i.e. positions divided by
      `factor`) or "llama3" (Llama 3.1: wavelengths longer than
      `original_max_position_embeddings / low_freq_factor` divided by `factor`, shorter than
      `original_max_position_embeddings / high_freq_factor` kept, interpolated in between).
    factor: the scaling factor (> 0).
    low_freq_factor: "llama3" only.
    high_freq_factor: "llama3" only (> low_freq_factor).
    original_max_position_embeddings: "llama3" only: the pretraining context length.
  """
  rope_type: str
  factor: float
  low_freq_factor: float | None = None
  high_freq_factor: float | None = None
  original_max_position_embeddings: int | None = None

  def __post_init__(self):
    L.check_choice("rope_scaling.rope_type", self.rope_type, ROPE_TYPES)
    if not self.factor > 0:
      raise ValueError(f"rope_scaling.factor must be > 0, got {self.factor!r}")
    llama3 = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    for f in llama3:
      given = getattr(self, f) is not None
      if given != (self.rope_type == "llama3"):
        raise ValueError(f"rope_scaling.{f} is {'required' if not given else 'not used'} with "
                         f"rope_type={self.rope_type!r} (llama3 takes {list(llama3)})")
    if self.rope_type == "llama3" and not (
        0 < self.low_freq_factor < self.high_freq_factor
        and self.original_max_position_embeddings > 0):
      raise ValueError("rope_scaling (llama3) needs 0 < low_freq_factor < high_freq_factor and "
                       f"original_max_position_embeddings > 0, got {self}")


# ---------------------------------------------------------------------------------------------
# Precision and memory: compute dtype and per-layer rematerialization.
# ---------------------------------------------------------------------------------------------

REMAT_POLICIES = {
    "none": None,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def _check_precision(cfg: LlamaConfig) -> None:
  L.check_choice("LlamaConfig.remat", cfg.remat, REMAT_POLICIES)
  if cfg.compute_dtype is not None:
    L.check_choice("LlamaConfig.compute_dtype", cfg.compute_dtype, COMPUTE_DTYPES)
  if cfg.remat_layers is not None:
    layers = tuple(cfg.remat_layers)
    if not all(isinstance(i, int) and 0 <= i < cfg.num_layers for i in layers):
      raise ValueError(f"LlamaConfig.remat_layers={cfg.remat_layers!r}: valid entries are layer "
                       f"indices 0..{cfg.num_layers - 1}")
    object.__setattr__(cfg, "remat_layers", layers)
  if cfg.scan_layers:
    _check_scan(cfg)


def _check_scan(cfg: LlamaConfig) -> None:
  """`scan_layers` needs layers of one structure: refuses the fields that make them differ."""
  if not isinstance(cfg.scan_layers, bool):
    raise ValueError(f"LlamaConfig.scan_layers={cfg.scan_layers!r}; valid: True or False")
  per_layer = [f for f in ("layer_intermediate_sizes", "layer_qk_freqs", "layer_v_head_dims",
                           "remat_layers") if getattr(cfg, f) is not None]
  if per_layer:
    raise ValueError(f"LlamaConfig.scan_layers=True scans identical layers; {per_layer[0]} makes "
                     f"them differ; unset it or scan_layers")
  if cfg.ffn != "swiglu":
    raise ValueError(f"LlamaConfig.scan_layers=True takes ffn='swiglu'; ffn={cfg.ffn!r} shares "
                     f"routers across layers; unset scan_layers")


def stack_layers(layers: Mapping[str, Any], num_layers: int) -> Any:
  """The trees `layers["layer_0"]` .. `layers[f"layer_{num_layers - 1}"]` stacked along a new
  leading axis of every array (structured weights stay structured, their arrays stacked)."""
  trees = [layers[f"layer_{i}"] for i in range(num_layers)]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _scan_layers(layers, x, positions, mask, cfg: LlamaConfig, deterministic: bool, rng):
  """The decoder layers as one `lax.scan` over their stacked params (`cfg.scan_layers`), each
  step `cfg.remat`'s checkpoint of `decoder_layer`; the layer index (dropout keys) is the scanned
  counter, so the result is the unrolled loop's."""
  def step(h, xs):
    lp, i = xs
    h, _, _ = decoder_layer(lp, h, positions, mask, cfg, None, 0, i, deterministic, rng)
    return h, None
  if cfg.remat != "none":
    step = jax.checkpoint(step, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
  stacked = stack_layers(layers, cfg.num_layers)
  x, _ = jax.lax.scan(step, x, (stacked, jnp.arange(cfg.num_layers, dtype=jnp.int32)))
  return x


def remat_applies(cfg: LlamaConfig, layer: int) -> bool:
  """Whether decoder layer `layer` is rematerialised (`cfg.remat`, `cfg.remat_layers`)."""
  return cfg.remat != "none" and (cfg.remat_layers is None or layer in cfg.remat_layers)


def cast_to_compute(params: Any, cfg: LlamaConfig) -> Any:
  """`params` with every float array in `cfg.compute_dtype` (quantized weights dequantize to it);
  unchanged when it is None. Inside a step the casts of trainable params are differentiated, so
  their gradients and optimizer state keep the params' own dtype."""
  if cfg.compute_dtype is None:
    return params
  dtype = jnp.dtype(cfg.compute_dtype)

  def cast(x):
    if quant.is_quantized(x):
      return x.astype(dtype)
    if isinstance(x, (jax.Array, np.ndarray)) and jnp.issubdtype(x.dtype, jnp.floating):
      return x.astype(dtype)
    return x
  return jax.tree.map(cast, params, is_leaf=quant.is_quantized)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Llama-family decoder hyperparameters.

  Attributes:
    vocab_size, hidden_size, intermediate_size, num_layers, num_heads: the shapes.
    num_kv_heads: key/value heads (grouped-query attention; 1 is multi-query attention).
    head_dim: per-head size; None means hidden_size // num_heads.
    max_position_embeddings: the longest sequence the model is meant for.
    rope_theta: RoPE base.
    rms_norm_eps: RMSNorm epsilon.
    dropout_rate: residual dropout in training.
    qkv_bias: biases on q/k/v projections (HF Llama `attention_bias`; always on in Qwen2).
    o_bias: bias on the output projection (HF Llama `attention_bias`; never in Qwen2).
    mlp_bias: biases on gate/up/down projections (HF Llama `mlp_bias`).
    tie_word_embeddings: logits = hidden @ embedding.T; there is no `lm_head` param.
    rope_scaling: None, a `RopeScaling`, or a mapping of its fields (converted).
    compute_dtype: the dtype of activations and products, e.g. "bfloat16"; the params keep their
      own (param) dtype and are cast at use, quantized bases dequantize to it, so fp32 adapter
      params and their optimizer state can train on a bf16 base. None computes in the params'
      dtypes.
    remat: rematerialization of each decoder layer in the backward (`jax.checkpoint` around the
      layer; a run with a KV cache never remats): "none", "nothing_saveable" (save only the
      layer's input), "dots_saveable" or "dots_with_no_batch_dims_saveable" (also save matmul
      outputs, the latter only those without batch dims: projections, not attention scores).
    remat_layers: the layers `remat` applies to; None: all.
    scan_layers: run the decoder layers (without a KV cache) as one `jax.lax.scan` instead of a
      Python loop: the step compiles one layer instead of `num_layers`, and a remat policy's
      saved residuals are the scan's stacked outputs. The params keep their per-layer layout
      (`layers/layer_{i}/...`, so checkpoints, Hugging Face I/O, adapter targets and sharding
      rules are unchanged); each call stacks them along a new leading axis (`stack_layers`), which
      costs one copy of the layer params (as stored: codes for a quantized base) among the
      step's temporaries. Needs identical layers: no per-layer sizes, no `remat_layers`, ffn
      "swiglu". Decoding with a cache runs the loop.
    attention: the implementation of `jax.nn.dot_product_attention` without a KV cache: "xla"
      (its XLA formula: every head's (T, S) scores and probabilities are stored and, unless the
      layer is rematerialized, kept for the backward) or "cudnn" (cuDNN's fused flash attention,
      which stores no scores; JAX's limits: a CUDA GPU, bfloat16 or float16 activations). Decoding
      with a KV cache uses the XLA formula (the same function). "cudnn" needs uncompressed heads.
    ffn: "swiglu" (the MLP) or "monet" (`models.monet`: params `moe`, and `router` every
      `monet.groups` layers, replace `mlp`; routing always uses batch statistics, in training and
      in eval alike, so the model stays a pure function of (params, batch)).
    monet: with ffn "monet": a `monet.MonetConfig` or a mapping of its fields (None: its
      defaults).
    layer_intermediate_sizes: per-layer MLP inner sizes of a compressed model (one per layer);
      None: `intermediate_size` everywhere.
    layer_qk_freqs: per layer, per key/value head, the indices (into the `head_dim // 2` RoPE
      frequencies) of the rotary pairs a compressed model keeps in its query/key heads; a
      layer's q/k head size is twice its number of kept pairs (equal for all heads of a layer).
      Head j of a compressed layer holds original dims `f[j]` (first half) and
      `f[j] + head_dim // 2` (second half), so rotate-half still pairs them. The query heads of
      a group use their key/value head's pairs. Attention logits keep the original
      1/sqrt(head_dim) scale. None: all pairs in their order.
    layer_v_head_dims: per-layer value (and o_proj input) head sizes of a compressed model;
      None: `head_dim` everywhere.
  """
  vocab_size: int = 256
  hidden_size: int = 64
  intermediate_size: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int | None = None
  max_position_embeddings: int = 2048
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-5
  dropout_rate: float = 0.0
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  tie_word_embeddings: bool = False
  rope_scaling: RopeScaling | None = None
  # Precision and memory (see `cast_to_compute` and `REMAT_POLICIES`).
  compute_dtype: str | None = None
  remat: str = "none"
  remat_layers: tuple[int, ...] | None = None
  scan_layers: bool = False
  attention: str = "xla"
  ffn: str = "swiglu"
  monet: monet.MonetConfig | None = None
  layer_intermediate_sizes: tuple[int, ...] | None = None
  layer_qk_freqs: tuple[tuple[tuple[int, ...], ...], ...] | None = None
  layer_v_head_dims: tuple[int, ...] | None = None

  def __post_init__(self):
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
              "num_kv_heads", "max_position_embeddings"):
      if getattr(self, f) <= 0:
        raise ValueError(f"LlamaConfig.{f} must be positive, got {getattr(self, f)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"LlamaConfig.num_heads={self.num_heads} must be a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if self.head_dim is None and self.hidden_size % self.num_heads:
      raise ValueError(f"LlamaConfig.hidden_size={self.hidden_size} is not divisible by "
                       f"num_heads={self.num_heads}; set head_dim")
    if self.dim_per_head % 2:
      raise ValueError(f"LlamaConfig head dim must be even for RoPE, got {self.dim_per_head}")
    if not self.rope_theta > 0:
      raise ValueError(f"LlamaConfig.rope_theta must be > 0, got {self.rope_theta}")
    if isinstance(self.rope_scaling, Mapping):
      object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
    if not isinstance(self.rope_scaling, (RopeScaling, type(None))):
      raise TypeError(f"LlamaConfig.rope_scaling must be None, a RopeScaling or a mapping of its "
                      f"fields, got {type(self.rope_scaling).__name__}")
    L.check_choice("LlamaConfig.ffn", self.ffn, FFNS)
    L.check_choice("LlamaConfig.attention", self.attention, ATTENTION_IMPLS)
    if self.attention == "cudnn" and (self.layer_qk_freqs is not None
                                      or self.layer_v_head_dims is not None):
      raise ValueError("LlamaConfig.attention='cudnn' needs uncompressed heads; this config sets "
                       "layer_qk_freqs or layer_v_head_dims; use attention='xla'")
    if self.ffn != "monet" and self.monet is not None:
      raise ValueError(f"LlamaConfig.monet is set but ffn={self.ffn!r}; set ffn='monet'")
    if self.ffn == "monet":
      m = self.monet
      m = monet.MonetConfig(**m) if isinstance(m, Mapping) else (m or monet.MonetConfig())
      if not isinstance(m, monet.MonetConfig):
        raise TypeError(f"LlamaConfig.monet must be None, a MonetConfig or a mapping of its "
                        f"fields, got {type(m).__name__}")
      monet.check_hidden_size(m, self.hidden_size)
      object.__setattr__(self, "monet", m)
    _check_precision(self)
    self._check_layer_sizes()

  def _check_layer_sizes(self):
    """Normalises the per-layer size fields to tuples and checks them."""
    for f in ("layer_intermediate_sizes", "layer_v_head_dims", "layer_qk_freqs"):
      value = getattr(self, f)
      if value is None:
        continue
      if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or (
          len(value) != self.num_layers):
        raise ValueError(f"LlamaConfig.{f} must hold one entry per layer "
                         f"(num_layers={self.num_layers}), got {value!r}")
      if f == "layer_qk_freqs":
        value = tuple(tuple(tuple(int(i) for i in head) for head in layer) for layer in value)
        self._check_qk_freqs(value)
      else:
        value = tuple(int(v) for v in value)
        if min(value) < 1:
          raise ValueError(f"LlamaConfig.{f} must be positive, got {value}")
      object.__setattr__(self, f, value)

  def _check_qk_freqs(self, freqs):
    half = self.dim_per_head // 2
    for i, layer in enumerate(freqs):
      sizes = {len(head) for head in layer}
      if len(layer) != self.num_kv_heads or len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"LlamaConfig.layer_qk_freqs[{i}] must hold num_kv_heads="
                         f"{self.num_kv_heads} non-empty index lists of one length, got {layer}")
      for head in layer:
        if len(set(head)) != len(head) or min(head) < 0 or max(head) >= half:
          raise ValueError(f"LlamaConfig.layer_qk_freqs[{i}] has {head}: indices must be "
                           f"distinct and in [0, head_dim // 2 = {half})")

  def mlp_size(self, layer: int) -> int:
    """MLP inner size of layer `layer`."""
    sizes = self.layer_intermediate_sizes
    return self.intermediate_size if sizes is None else sizes[layer]

  def qk_head_dim(self, layer: int) -> int:
    """Query/key head size of layer `layer`."""
    freqs = self.layer_qk_freqs
    return self.dim_per_head if freqs is None else 2 * len(freqs[layer][0])

  def v_head_dim(self, layer: int) -> int:
    """Value head size of layer `layer`."""
    dims = self.layer_v_head_dims
    return self.dim_per_head if dims is None else dims[layer]

  @property
  def dim_per_head(self) -> int:
    return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

  @classmethod
  def preset(cls, name: str) -> "LlamaConfig":
    """Named shapes: see `PRESETS`."""
    L.check_choice("preset", name, PRESETS)
    return PRESETS[name]


PRESETS: dict[str, LlamaConfig] = {
    # Tests: 2 layers, hidden 64, GQA 4 query heads over 2 kv heads.
    "tiny": LlamaConfig(),
    # CPU-sized benchmarks (~10M params).
    "small": LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=688, num_layers=4,
                         num_heads=8, num_kv_heads=4),
    # TinyLlama/TinyLlama-1.1B shapes (1.10B params).
    "tinyllama_1_1b": LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                  num_layers=22, num_heads=32, num_kv_heads=4,
                                  max_position_embeddings=2048),
    # Llama-2-7B shapes (6.74B params).
    "llama2_7b": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                             num_layers=32, num_heads=32, num_kv_heads=32,
                             max_position_embeddings=4096),
}


def init(key: jax.Array, cfg: LlamaConfig, dtype=jnp.float32) -> dict:
  """Random params (normal, std 0.02; norms at one; biases, where `cfg` has them, at zero)."""
  d = cfg.hidden_size
  lin = lambda k, i, o, bias: L.dense_init(k, i, o, bias=bias, std=0.02, dtype=dtype)
  mb = cfg.mlp_bias
  k_embed, k_head, k_layers = jax.random.split(key, 3)
  params: dict = {"embed": L.embed_init(k_embed, cfg.vocab_size, d, dtype=dtype), "layers": {}}
  for i in range(cfg.num_layers):
    ks = jax.random.split(jax.random.fold_in(k_layers, i), 7)
    f, qk, vd = cfg.mlp_size(i), cfg.qk_head_dim(i), cfg.v_head_dim(i)
    params["layers"][f"layer_{i}"] = {
        "attention": {"q_proj": lin(ks[0], d, cfg.num_heads * qk, cfg.qkv_bias),
                      "k_proj": lin(ks[1], d, cfg.num_kv_heads * qk, cfg.qkv_bias),
                      "v_proj": lin(ks[2], d, cfg.num_kv_heads * vd, cfg.qkv_bias),
                      "o_proj": lin(ks[3], cfg.num_heads * vd, d, cfg.o_bias)},
        "mlp": {"gate_proj": lin(ks[4], d, f, mb), "up_proj": lin(ks[5], d, f, mb),
                "down_proj": lin(ks[6], f, d, mb)},
        "input_norm": L.rms_norm_init(d, dtype),
        "post_attention_norm": L.rms_norm_init(d, dtype),
    }
    if cfg.ffn == "monet":
      del params["layers"][f"layer_{i}"]["mlp"]
      params["layers"][f"layer_{i}"].update(monet.init_layer(ks[4], i, d, cfg.monet, dtype))
  params["final_norm"] = L.rms_norm_init(d, dtype)
  if not cfg.tie_word_embeddings:
    params["lm_head"] = lin(k_head, d, cfg.vocab_size, False)
  return params


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
  """RoPE inverse frequencies (D/2,) float32 for `cfg`, with its `rope_scaling` applied."""
  d = cfg.dim_per_head
  inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
  s = cfg.rope_scaling
  if s is not None and s.rope_type == "linear":
    inv_freq = inv_freq / s.factor
  elif s is not None and s.rope_type == "llama3":
    wavelen = 2 * math.pi / inv_freq
    old = s.original_max_position_embeddings
    smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    interpolated = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    inv_freq = np.where(wavelen > old / s.low_freq_factor, inv_freq / s.factor,
                        np.where(wavelen < old / s.high_freq_factor, inv_freq, interpolated))
  return inv_freq.astype(np.float32)


def rope(x: jax.Array, positions: jax.Array, theta: float, *,
         inv_freq: jax.Array | np.ndarray | None = None) -> jax.Array:
  """Rotary embedding, HF rotate-half convention. x (B, T, H, D), positions (B, T).

  `inv_freq` (D/2,) overrides the unscaled frequencies `theta ** (-2i/D)` (see `rope_inv_freq`);
  an `inv_freq` of shape (H, D/2) gives each head its own frequencies (a compressed model).
  """
  d = x.shape[-1]
  if inv_freq is None:
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  if np.ndim(inv_freq) == 2:
    ang = positions.astype(jnp.float32)[..., None, None] * inv_freq    # (B, T, H, D/2)
    ang = jnp.concatenate([ang, ang], axis=-1)                         # (B, T, H, D)
  else:
    ang = positions.astype(jnp.float32)[..., None] * inv_freq          # (B, T, D/2)
    ang = jnp.concatenate([ang, ang], axis=-1)[:, :, None, :]          # (B, T, 1, D)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x * jnp.cos(ang) + rotated * jnp.sin(ang)).astype(x.dtype)


def _layer_inv_freq(cfg: LlamaConfig, layer: int):
  """(query, key) RoPE frequencies of a layer: both (D/2,), or per head (H, D/2) and
  (H_kv, D/2) when `cfg.layer_qk_freqs` selects the kept pairs."""
  inv_freq = rope_inv_freq(cfg)
  if cfg.layer_qk_freqs is None:
    return inv_freq, inv_freq
  k_freq = inv_freq[np.asarray(cfg.layer_qk_freqs[layer])]            # (H_kv, D/2)
  return np.repeat(k_freq, cfg.num_heads // cfg.num_kv_heads, axis=0), k_freq


def _attention(p, x, positions, mask, cfg, kv=None, index=None, layer=0):
  """Self-attention of layer `layer`; with a layer cache `kv` ({"k", "v"}) the new keys/values are
  written at slot `index` and the queries attend over the whole cache. Returns (output, updated
  kv or None)."""
  b, t, _ = x.shape
  hd, qk, vd = cfg.dim_per_head, cfg.qk_head_dim(layer), cfg.v_head_dim(layer)
  q = L.dense(p["q_proj"], x).reshape(b, t, cfg.num_heads, qk)
  k = L.dense(p["k_proj"], x).reshape(b, t, cfg.num_kv_heads, qk)
  v = L.dense(p["v_proj"], x).reshape(b, t, cfg.num_kv_heads, vd)
  q_freq, k_freq = _layer_inv_freq(cfg, layer)
  q = rope(q, positions, cfg.rope_theta, inv_freq=q_freq)
  k = rope(k, positions, cfg.rope_theta, inv_freq=k_freq)
  if kv is not None:
    write = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), index,
                                                                  axis=1)
    kv = {"k": write(kv["k"], k), "v": write(kv["v"], v)}
    k, v = kv["k"].astype(q.dtype), kv["v"].astype(q.dtype)
  if qk == vd == hd:
    impl = "xla" if kv is not None else cfg.attention
    if impl == "cudnn":
      _check_cudnn(q.dtype)
    o = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)   # GQA built in
  else:  # compressed head sizes: written out, at the original 1/sqrt(head_dim) scale
    group = cfg.num_heads // cfg.num_kv_heads
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    o = L.attention(q, k, v, mask, scale=1.0 / math.sqrt(hd))
  return L.dense(p["o_proj"], o.reshape(b, t, cfg.num_heads * vd)), kv


def _check_cudnn(dtype) -> None:
  """Refuses `attention="cudnn"` where cuDNN attention cannot run, before JAX's deeper error."""
  if jax.default_backend() != "gpu":
    raise ValueError(f"LlamaConfig.attention='cudnn' runs on a CUDA GPU; the backend is "
                     f"{jax.default_backend()!r}; use attention='xla'")
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    raise ValueError(f"LlamaConfig.attention='cudnn' takes bfloat16 or float16 activations, got "
                     f"{jnp.dtype(dtype).name}; set compute_dtype='bfloat16' or use "
                     f"attention='xla'")


def _attention_mask(q_segments, kv_segments, q_slots, kv_slots):
  """Boolean (B, 1, T, S): query t sees key s iff s is not after t and both share a segment."""
  causal = kv_slots[None, :] <= q_slots[:, None]                       # (T, S)
  same_segment = q_segments[:, :, None] == kv_segments[:, None, :]     # (B, T, S)
  return (causal & same_segment)[:, None]


def _mlp(p, x):
  g = L.dense(p["gate_proj"], x)
  u = L.dense(p["up_proj"], x)
  return L.dense(p["down_proj"], jax.nn.silu(g) * u)


def lm_logits(params: dict, h: jax.Array, cfg: LlamaConfig) -> jax.Array:
  """Logits from final hidden states: `lm_head`, or the embedding transposed when tied."""
  params = cast_to_compute(params, cfg)
  if cfg.tie_word_embeddings:
    return ops.dense(h, ops.materialize(params["embed"]["embedding"]).T)
  return ops.dense(h, params["lm_head"]["kernel"])


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
  """An empty KV cache of `max_len` slots per row for `apply(..., cache=...)`.

  A pure pytree:

  - ``layers/layer_{i}/{k,v}``: the (rotated) keys and the values of every slot, shape
    (batch, max_len, num_kv_heads, head size of the layer's keys / values) in `dtype`;
  - ``segment_ids``: int32 (batch, max_len), the segment id of the token in each slot (0: padding);
  - ``index``: int32 scalar, the next slot to write. All rows advance together, one slot per token
    fed; a row's padding slots hold segment 0, which its tokens never attend.

  A token never attends a slot written after it (the causal mask runs over slots), so the zeros
  the cache starts with are never read.

  Raises:
    ValueError: `batch` or `max_len` is not a positive integer.
  """
  for name, value in (("batch", batch), ("max_len", max_len)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
      raise ValueError(f"init_cache: {name} must be a positive integer, got {value!r}")
  slots = lambda dim: jnp.zeros((batch, max_len, cfg.num_kv_heads, dim), dtype)
  return {"layers": {f"layer_{i}": {"k": slots(cfg.qk_head_dim(i)), "v": slots(cfg.v_head_dim(i))}
                     for i in range(cfg.num_layers)},
          "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
          "index": jnp.zeros((), jnp.int32)}


def decoder_layer(lp, x, positions, mask, cfg: LlamaConfig, kv, first_slot, i: int,
                  deterministic: bool, rng, gates=None):
  """Layer `i`: pre-norm attention and FFN with residuals; the FFN is the SwiGLU MLP, or Monet
  with the router `gates` its group shares. Returns (x, updated kv, gates)."""
  h, kv = _attention(lp["attention"], L.rms_norm(lp["input_norm"], x, cfg.rms_norm_eps),
                     positions, mask, cfg, kv, first_slot, layer=i)
  x = x + L.dropout(h, cfg.dropout_rate, L.fold(rng, i, 0), deterministic)
  h = L.rms_norm(lp["post_attention_norm"], x, cfg.rms_norm_eps)
  if cfg.ffn == "monet":
    h, gates = monet.apply_layer(lp, h, gates, cfg.monet)
  else:
    h = _mlp(lp["mlp"], h)
  x = x + L.dropout(h, cfg.dropout_rate, L.fold(rng, i, 1), deterministic)
  return x, kv, gates


def hidden_states(params: dict, input_ids: jax.Array, cfg: LlamaConfig, *,
                  positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                  attention_mask: jax.Array | None = None, cache: dict | None = None,
                  deterministic: bool = True, rng: jax.Array | None = None):
  """Final-norm hidden states (B, T, hidden); with `cache`, (hidden states, updated cache).

  Arguments as in `apply`.
  """
  b, t = input_ids.shape
  first_slot = 0 if cache is None else cache["index"]
  if positions is None:
    positions = jnp.broadcast_to(first_slot + jnp.arange(t), (b, t))
  segments = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  if attention_mask is not None:
    segments = segments * attention_mask.astype(jnp.int32)
  q_slots = first_slot + jnp.arange(t)
  if cache is None:
    kv_segments, kv_slots = segments, q_slots
  else:
    if t > cache["segment_ids"].shape[1]:
      raise ValueError(f"apply: {t} tokens do not fit a cache of "
                       f"{cache['segment_ids'].shape[1]} slots")
    kv_segments = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], segments, first_slot,
                                                      axis=1)
    kv_slots = jnp.arange(kv_segments.shape[1])
  mask = _attention_mask(segments, kv_segments, q_slots, kv_slots)
  new_layers, gates = {}, None
  params = cast_to_compute(params, cfg)
  x = ops.embed(input_ids, params["embed"]["embedding"])
  scan = cfg.scan_layers and cache is None
  if scan:
    x = _scan_layers(params["layers"], x, positions, mask, cfg, deterministic, rng)
  for i in range(0 if scan else cfg.num_layers):
    kv = None if cache is None else cache["layers"][f"layer_{i}"]
    layer = decoder_layer
    if cache is None and remat_applies(cfg, i):
      layer = jax.checkpoint(decoder_layer, policy=REMAT_POLICIES[cfg.remat],
                             static_argnums=(4, 7, 8))
    x, new_layers[f"layer_{i}"], gates = layer(params["layers"][f"layer_{i}"], x, positions, mask,
                                               cfg, kv, first_slot, i, deterministic, rng,
                                               gates)
  h = L.rms_norm(params["final_norm"], x, cfg.rms_norm_eps)
  if cache is None:
    return h
  return h, {"layers": new_layers, "segment_ids": kv_segments, "index": first_slot + t}


def apply(params: dict, input_ids: jax.Array, cfg: LlamaConfig, *,
          positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
          attention_mask: jax.Array | None = None, cache: dict | None = None,
          deterministic: bool = True, rng: jax.Array | None = None,
          adapter_index: jax.Array | None = None):
  """Next-token logits (B, T, vocab) with causal attention; with `cache`, (logits, new cache).

  Token t attends token s iff s is not after t and both have the same segment id. Segment id 0
  marks padding: padding tokens attend only padding, real tokens never do. Packing several
  examples into one row: give each example its own segment id (1, 2, ...) and positions that
  restart at 0 per example; each example's logits are then those of the example run alone.

  With a cache (`init_cache`), the T tokens (a prompt, or one decoded token) fill slots
  ``cache["index"]`` .. ``+T-1`` and attend every earlier slot of the same segment, so prefill and
  decode are the same call. The caller keeps ``index + T`` within the cache's slots (a write past
  the end is clamped by XLA, not detected under jit).

  Args:
    params: nested-dict params; kernels may be structured weights (run factored).
    input_ids: int (B, T).
    cfg: the model config.
    positions: int (B, T) RoPE positions; defaults to the slot numbers (0..T-1 without a cache).
    segment_ids: int (B, T) segment of each token (0: padding); defaults to all ones.
    attention_mask: {0,1} (B, T) key padding mask; a 0 sets that token's segment id to 0.
    cache: a KV cache from `init_cache` (or a previous call) to read and extend.
    deterministic: if False, applies residual dropout (`cfg.dropout_rate`) with `rng`.
    rng: dropout key.
    adapter_index: int (B,) adapter of each example (-1: none) for params holding a stack of
      per-example adapters (`lowrank_jax.multi.apply`).
  """
  if adapter_index is not None:
    params = multi.with_index(params, adapter_index)
  out = hidden_states(params, input_ids, cfg, positions=positions, segment_ids=segment_ids,
                      attention_mask=attention_mask, cache=cache, deterministic=deterministic,
                      rng=rng)
  if cache is None:
    return lm_logits(params, out, cfg)
  h, cache = out
  return lm_logits(params, h, cfg), cache


def num_params(cfg: LlamaConfig) -> int:
  """Parameter count without allocating."""
  shapes = jax.eval_shape(lambda: init(jax.random.key(0), cfg))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


# ---------------------------------------------------------------------------------------------
# Hugging Face names and checkpoints.
# ---------------------------------------------------------------------------------------------

def _hf_modules(cfg: LlamaConfig) -> list[tuple[str, str, str, bool]]:
  """(our module path, HF module name, kind, has a bias) for every module of `cfg`."""
  if cfg.ffn != "swiglu":
    raise ValueError(f"ffn={cfg.ffn!r} has no Hugging Face Llama layout (names, checkpoints)")
  mods = [("embed", "model.embed_tokens", "embedding", False)]
  for i in range(cfg.num_layers):
    o, h = f"layers/layer_{i}", f"model.layers.{i}"
    mods += [(f"{o}/attention/{n}", f"{h}.self_attn.{n}", "linear", cfg.qkv_bias)
             for n in ("q_proj", "k_proj", "v_proj")]
    mods += [(f"{o}/attention/o_proj", f"{h}.self_attn.o_proj", "linear", cfg.o_bias)]
    mods += [(f"{o}/mlp/{n}", f"{h}.mlp.{n}", "linear", cfg.mlp_bias)
             for n in ("gate_proj", "up_proj", "down_proj")]
    mods += [(f"{o}/input_norm", f"{h}.input_layernorm", "norm", False),
             (f"{o}/post_attention_norm", f"{h}.post_attention_layernorm", "norm", False)]
  mods += [("final_norm", "model.norm", "norm", False)]
  if not cfg.tie_word_embeddings:
    mods += [("lm_head", "lm_head", "linear", False)]
  return mods


_LEAF = {"linear": ("kernel", True), "embedding": ("embedding", False), "norm": ("scale", False)}


def _hf_tensors(cfg: LlamaConfig) -> dict[str, tuple[tuple[str, ...], bool]]:
  """{HF tensor name: (our param path, transposed)} for every tensor of `cfg`."""
  out = {}
  for ours, hf, kind, bias in _hf_modules(cfg):
    leaf, transpose = _LEAF[kind]
    out[f"{hf}.weight"] = ((*ours.split("/"), leaf), transpose)
    if bias:
      out[f"{hf}.bias"] = ((*ours.split("/"), "bias"), False)
  return out


def hf_name_map(cfg: LlamaConfig) -> dict[str, str]:
  """{our module path (param path without its leaf): HF `LlamaForCausalLM` module name}."""
  return {ours: hf for ours, hf, _, _ in _hf_modules(cfg)}


# Per-layer inner sizes of a compressed model (`LlamaConfig` fields of the same names), written to
# config.json only when set; Hugging Face transformers does not read them.
_LAYER_SIZE_KEYS = ("layer_intermediate_sizes", "layer_qk_freqs", "layer_v_head_dims")

# config.json keys, by what they do. Every key of a config must be in one of these sets: a key
# that is not is refused, because a key we do not know may change the math (e.g. a new attention
# variant) and ignoring it would load a wrong model without a word.
_HONOURED_KEYS = frozenset({
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
    "rope_theta", "rope_scaling", "rope_parameters", "rms_norm_eps", "hidden_act",
    "tie_word_embeddings", "attention_dropout", "layer_types"} | set(_LAYER_SIZE_KEYS))
_FAMILY_KEYS = {
    "llama": frozenset({"attention_bias", "mlp_bias"}),
    "mistral": frozenset({"sliding_window"}),
    "qwen2": frozenset({"sliding_window", "use_sliding_window", "max_window_layers"}),
}
# Keys that do not change the forward: bookkeeping, token ids, generation defaults, and
# `pretraining_tp` (a sliced matmul, the same product).
_HARMLESS_KEYS = frozenset({
    "architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
    "initializer_range", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id",
    "sep_token_id", "decoder_start_token_id", "pretraining_tp", "return_dict",
    "output_attentions", "output_hidden_states", "torchscript", "use_bfloat16", "is_decoder",
    "is_encoder_decoder", "tokenizer_class", "id2label", "label2id", "problem_type",
    "finetuning_task", "task_specific_params", "prefix", "max_length", "min_length",
    "do_sample", "early_stopping", "num_beams", "num_beam_groups", "num_return_sequences",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "bad_words_ids", "forced_bos_token_id", "forced_eos_token_id",
    "suppress_tokens", "begin_suppress_tokens", "diversity_penalty", "output_scores",
    "return_dict_in_generate", "remove_invalid_values", "chunk_size_feed_forward",
    "tie_encoder_decoder", "add_cross_attention", "pruned_heads", "tf_legacy_loss"})
# HF's defaults for keys a config.json may leave out, per family.
_FAMILY_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048, "attention_bias": False, "mlp_bias": False},
    "mistral": {"max_position_embeddings": 4096 * 32, "sliding_window": 4096},
    "qwen2": {"max_position_embeddings": 32768, "sliding_window": 4096,
              "use_sliding_window": False},
}
_ROPE_KEYS = {"default": (), "linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                         "original_max_position_embeddings")}


def _refuse(key: str, value: Any, valid: str) -> ValueError:
  return ValueError(f"config.json: {key}={value!r} is not supported; valid: {valid}")


def _rope_from_hf(hf: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
  """(rope_theta, rope_scaling) from either layout: transformers 4.x (top-level `rope_theta` and
  `rope_scaling`) or 5.x (one `rope_parameters` dict holding `rope_theta`, `rope_type`, ...)."""
  rope: dict[str, Any] = {}
  for key in ("rope_scaling", "rope_parameters"):
    value = hf.get(key)
    if value is None:
      continue
    if not isinstance(value, Mapping):
      raise _refuse(key, value, "null or a dict")
    for k, v in value.items():
      if k in rope and rope[k] != v:
        raise ValueError(f"config.json: rope_scaling and rope_parameters disagree on {k!r} "
                         f"({rope[k]!r} vs {v!r})")
      rope[k] = v
  thetas = {float(v) for v in (hf.get("rope_theta"), rope.pop("rope_theta", None)) if v is not None}
  if len(thetas) > 1:
    raise ValueError(f"config.json: rope_theta and rope_parameters.rope_theta disagree: {thetas}")
  theta = thetas.pop() if thetas else 10000.0
  types = {rope.pop(k) for k in ("rope_type", "type") if k in rope}
  if len(types) > 1:
    raise ValueError(f"config.json: rope type given twice, differently: {sorted(types)}")
  rope_type = types.pop() if types else "default"
  if rope_type not in _ROPE_KEYS:
    raise _refuse("rope_type", rope_type, str(list(_ROPE_KEYS)))
  wanted = _ROPE_KEYS[rope_type]
  if set(rope) != set(wanted):
    raise ValueError(f"config.json: rope_type={rope_type!r} takes the keys {list(wanted)}, got "
                     f"{sorted(rope)}")
  if rope_type == "default":
    return theta, None
  return theta, RopeScaling(rope_type, **rope)


def _check_sliding_window(hf: Mapping[str, Any], family: str, max_positions: int) -> None:
  """Sliding-window attention is not implemented: refuses a window shorter than the context."""
  types = hf.get("layer_types") or []
  unknown_types = sorted(set(types) - {"full_attention", "sliding_attention"})
  if unknown_types:
    raise _refuse("layer_types", unknown_types, "'full_attention' or 'sliding_attention'")
  window = hf.get("sliding_window", _FAMILY_DEFAULTS[family].get("sliding_window"))
  if window is None or window >= max_positions:
    return
  valid = (f"sliding_window null or >= max_position_embeddings={max_positions} (sliding-window "
           "attention is not implemented)")
  if family == "mistral":
    raise _refuse("sliding_window", window, valid)
  if hf.get("use_sliding_window", False):
    raise _refuse("use_sliding_window", True, "false, or " + valid)
  if "sliding_attention" in types:
    raise _refuse("layer_types", types, "all 'full_attention', or " + valid)


def config_from_hf(hf: Mapping[str, Any]) -> LlamaConfig:
  """LlamaConfig from a HF `config.json` dict of model_type "llama", "mistral" or "qwen2".

  Reads both layouts (transformers 4.x top-level `rope_theta`/`rope_scaling`, 5.x
  `rope_parameters`). Every key is honoured, refused, or one of a fixed set of keys known not to
  change the forward (bookkeeping, token ids, generation defaults): a key outside these sets is
  refused, so that a config with a feature this model lacks never loads as a different model.
  Qwen2 has q/k/v biases and no o_proj bias (`qkv_bias=True, o_bias=False`); Llama's
  `attention_bias` puts biases on all four projections.

  Raises:
    ValueError: an unknown model_type, a missing required key, a key or value that is not
      supported (named, with the valid values).
  """
  family = hf.get("model_type")
  L.check_choice("config.json model_type", family, _FAMILY_KEYS)
  unknown = sorted(set(hf) - _HONOURED_KEYS - _FAMILY_KEYS[family] - _HARMLESS_KEYS)
  if unknown:
    raise ValueError(f"config.json keys {unknown} are not supported for model_type={family!r}: "
                     f"they may change the model, so they are refused rather than ignored; "
                     f"honoured keys: {sorted(_HONOURED_KEYS | _FAMILY_KEYS[family])}")
  missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads") if hf.get(k) is None]
  if missing:
    raise ValueError(f"config.json is missing the required keys {missing}")
  get = lambda k, default=None: hf[k] if hf.get(k) is not None else (
      _FAMILY_DEFAULTS[family].get(k, default))
  if get("hidden_act", "silu") != "silu":
    raise _refuse("hidden_act", hf["hidden_act"], "['silu']")
  if get("attention_dropout", 0.0) != 0.0:
    raise _refuse("attention_dropout", hf["attention_dropout"],
                  "[0.0] (attention-probability dropout is not implemented)")
  heads, max_positions = hf["num_attention_heads"], get("max_position_embeddings")
  _check_sliding_window(hf, family, max_positions)
  theta, scaling = _rope_from_hf(hf)
  head_dim = get("head_dim")
  if head_dim == hf["hidden_size"] // heads:
    head_dim = None
  attention_bias = bool(get("attention_bias", False))
  return LlamaConfig(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
      num_heads=heads, num_kv_heads=get("num_key_value_heads", heads), head_dim=head_dim,
      max_position_embeddings=max_positions, rope_theta=theta,
      rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
      qkv_bias=attention_bias or family == "qwen2", o_bias=attention_bias,
      mlp_bias=bool(get("mlp_bias", False)),
      tie_word_embeddings=bool(get("tie_word_embeddings", False)), rope_scaling=scaling,
      **{k: hf[k] for k in _LAYER_SIZE_KEYS if hf.get(k) is not None})


def config_to_hf(cfg: LlamaConfig, torch_dtype: str = "float32") -> dict[str, Any]:
  """A HF `config.json` dict for `cfg` (transformers 4.x layout, which 5.x reads too).

  Llama unless the biases are Qwen2's (q/k/v without o_proj), then Qwen2.

  Raises:
    ValueError: `cfg` is neither a Llama nor a Qwen2 model (o_proj bias without q/k/v biases;
      Qwen2's biases with `mlp_bias` or a non-default head_dim).
  """
  qwen2 = cfg.qkv_bias and not cfg.o_bias
  if cfg.o_bias and not cfg.qkv_bias:
    raise ValueError("config_to_hf: o_bias without qkv_bias is neither Llama nor Qwen2")
  if qwen2 and (cfg.mlp_bias or cfg.head_dim is not None):
    raise ValueError("config_to_hf: q/k/v biases without an o_proj bias are Qwen2's, which has "
                     "no mlp_bias and head_dim = hidden_size // num_heads")
  s = cfg.rope_scaling
  out = {"architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
         "model_type": "qwen2" if qwen2 else "llama",
         "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
         "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
         "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
         "max_position_embeddings": cfg.max_position_embeddings, "rope_theta": cfg.rope_theta,
         "rope_scaling": None if s is None else {
             k: v for k, v in dataclasses.asdict(s).items() if v is not None},
         "rms_norm_eps": cfg.rms_norm_eps, "hidden_act": "silu",
         "tie_word_embeddings": cfg.tie_word_embeddings, "torch_dtype": torch_dtype}
  out.update({k: getattr(cfg, k) for k in _LAYER_SIZE_KEYS if getattr(cfg, k) is not None})
  if qwen2:
    out.update(use_sliding_window=False, sliding_window=None)
  else:
    out.update(head_dim=cfg.dim_per_head, attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
  return out


# Some checkpoints store RoPE's `inv_freq` buffer; it is consumed if it matches the config (to
# bf16 precision: a model cast to bf16 casts its buffers too).
_ROTARY_BUFFER = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def _matches_rope(value: Any, cfg: LlamaConfig) -> bool:
  value, want = np.asarray(value, np.float64), rope_inv_freq(cfg)
  return value.shape == want.shape and np.allclose(value, want, rtol=1e-2, atol=0)


def from_hf_state_dict(tensors: Mapping[str, Any], cfg: LlamaConfig, dtype=None) -> dict:
  """HF state dict (PyTorch layout) -> our nested params.

  Every tensor is consumed: `lm_head.weight` of a tied model must equal the embedding, a stored
  RoPE `inv_freq` buffer must match the config, anything else unknown is an error.

  Args:
    tensors: {HF tensor name: array}.
    cfg: the model config.
    dtype: cast to this dtype; None keeps each tensor's stored dtype (bf16 stays bf16).
  Raises:
    ValueError: missing, unexpected or misshapen tensors (named).
  """
  tensors = dict(tensors)
  expected = _hf_tensors(cfg)
  shapes = jax.eval_shape(lambda: init(jax.random.key(0), cfg))
  problems = []
  if cfg.tie_word_embeddings and "lm_head.weight" in tensors:
    head = tensors.pop("lm_head.weight")
    embed = tensors.get("model.embed_tokens.weight")
    if embed is None or not np.array_equal(np.asarray(head), np.asarray(embed)):
      problems.append("lm_head.weight differs from model.embed_tokens.weight although "
                      "tie_word_embeddings is true")
  for name in sorted(set(tensors) - set(expected)):
    if not _ROTARY_BUFFER.fullmatch(name):
      problems.append(f"unexpected tensor {name} (not part of a {_describe(cfg)} model)")
    elif not _matches_rope(tensors[name], cfg):
      problems.append(f"{name} does not match the config's RoPE frequencies (rope_theta, "
                      "rope_scaling)")
  missing = [name for name in expected if name not in tensors]
  if missing:
    problems.append(f"{len(missing)} missing tensors: {missing[:8]}"
                    + (" ..." if len(missing) > 8 else ""))
  params: dict = {}
  for name, (path, transpose) in expected.items():
    if name not in tensors:
      continue
    want = _get(shapes, path).shape
    want = tuple(reversed(want)) if transpose else tuple(want)
    value = tensors.pop(name)  # frees each stored tensor once converted
    if tuple(value.shape) != want:
      problems.append(f"tensor {name} has shape {tuple(value.shape)}, the config needs {want}")
      continue
    value = jnp.asarray(value, dtype)
    _set(params, path, value.T if transpose else value)
  if problems:
    raise ValueError("checkpoint does not match its config: " + "; ".join(problems))
  return params


def _describe(cfg: LlamaConfig) -> str:
  switches = [f for f in ("qkv_bias", "o_bias", "mlp_bias", "tie_word_embeddings")
              if getattr(cfg, f)]
  return "Llama-family" + (f" ({', '.join(switches)})" if switches else " (no biases, untied)")


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
  for part in path:
    tree = tree[part]
  return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for part in path[:-1]:
    tree = tree.setdefault(part, {})
  tree[path[-1]] = value


def to_hf_state_dict(params: dict, cfg: LlamaConfig) -> dict[str, np.ndarray]:
  """Inverse of `from_hf_state_dict`: numpy arrays in the params' dtypes.

  Raises:
    TypeError: a structured (adapted) leaf: `lowrank_jax.merge` the params first.
    ValueError: params that `cfg` does not describe (a missing or an extra leaf, named).
  """
  expected = _hf_tensors(cfg)
  flat = {tuple(str(getattr(k, "key", k)) for k in kp): v for kp, v in
          jax.tree_util.tree_flatten_with_path(params, is_leaf=structured.is_structured)[0]}
  ours = {path for path, _ in expected.values()}
  extra, missing = sorted(set(flat) - ours), sorted(ours - set(flat))
  if extra or missing:
    raise ValueError(f"params do not match the config: extra leaves {['/'.join(p) for p in extra]}"
                     f", missing leaves {['/'.join(p) for p in missing]}")
  out = {}
  for name, (path, transpose) in expected.items():
    value = flat[path]
    if structured.is_structured(value):
      raise TypeError(f"{'/'.join(path)} is a structured weight ({type(value).__name__}); "
                      "save `lowrank_jax.merge(params)`")
    value = np.asarray(value)
    out[name] = np.ascontiguousarray(value.T if transpose else value)
  return out


INDEX_FILE = "model.safetensors.index.json"
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
               "GIB": 2**30}


def _read_safetensors(file: pathlib.Path) -> dict[str, jax.Array]:
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  # The flax framework reads bfloat16 on every safetensors version.
  with safe_open(str(file), framework="flax") as fh:
    return {name: fh.get_tensor(name) for name in fh.keys()}


def _read_checkpoint_tensors(path: pathlib.Path) -> dict[str, jax.Array]:
  """All tensors of a checkpoint: the files of its index, else `model.safetensors`, else every
  `*.safetensors` in the directory. A tensor stored twice, or a file or tensor that the index
  lists but that is not there, or a tensor in a file that the index does not list, is an error."""
  index_file = path / INDEX_FILE
  if index_file.is_file():
    weight_map = json.loads(index_file.read_text()).get("weight_map")
    if not isinstance(weight_map, Mapping):
      raise ValueError(f"{index_file} has no weight_map dict")
    files = sorted(set(weight_map.values()))
    absent = [f for f in files if not (path / f).is_file()]
    if absent:
      raise FileNotFoundError(f"{index_file} lists files that are not in {path}: {absent}")
  elif (path / "model.safetensors").is_file():
    weight_map, files = None, ["model.safetensors"]
  else:
    weight_map, files = None, sorted(f.name for f in path.glob("*.safetensors"))
    if not files:
      raise FileNotFoundError(f"no *.safetensors files in {path} (PyTorch .bin files are not read)")
  tensors: dict[str, jax.Array] = {}
  for file in files:
    for name, value in _read_safetensors(path / file).items():
      if name in tensors:
        raise ValueError(f"{path}: tensor {name} is stored twice (again in {file})")
      if weight_map is not None and weight_map.get(name) != file:
        raise ValueError(f"{path}: tensor {name} is in {file} but {INDEX_FILE} puts it in "
                         f"{weight_map.get(name)}")
      tensors[name] = value
  if weight_map is not None:
    absent = sorted(set(weight_map) - set(tensors))
    if absent:
      raise ValueError(f"{path}: {INDEX_FILE} lists tensors that are not in their files: "
                       f"{absent[:8]}")
  return tensors


def load_hf_checkpoint(path: str | pathlib.Path, dtype=None) -> tuple[dict, LlamaConfig]:
  """Loads a local HF Llama/Mistral/Qwen2 checkpoint directory.

  Reads `config.json` (see `config_from_hf`) and the weights: the shards listed in
  `model.safetensors.index.json`, else `model.safetensors`, else every `*.safetensors` file.

  Args:
    path: the checkpoint directory.
    dtype: cast every tensor to this dtype; None keeps the stored dtypes (bf16 stays bf16;
      adapters keep their own dtype, e.g. fp32 LoRA factors on a bf16 base).
  Returns:
    (params, cfg).
  Raises:
    FileNotFoundError: the directory, its config.json, or its weight files are missing.
    ValueError: a config key that cannot be honoured; missing, unexpected or misshapen tensors
      (each named).
  """
  path = pathlib.Path(path).expanduser()
  config_file = path / "config.json"
  if not config_file.is_file():
    raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint directory: no config.json")
  try:
    cfg = config_from_hf(json.loads(config_file.read_text()))
  except ValueError as e:  # json.JSONDecodeError is a ValueError too
    raise ValueError(f"{config_file}: {e}") from e
  try:
    params = from_hf_state_dict(_read_checkpoint_tensors(path), cfg, dtype)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e
  return params, cfg


def _shard_limit(max_shard_size: int | str | None) -> int | None:
  if max_shard_size is None or (isinstance(max_shard_size, int) and max_shard_size > 0):
    return max_shard_size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)\s*", str(max_shard_size).upper())
  if not m:
    raise ValueError(f"max_shard_size={max_shard_size!r} is not valid; valid: None, a positive "
                     "number of bytes, or a string like '500MB' or '2GiB'")
  return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


def save_hf_checkpoint(params: dict, cfg: LlamaConfig, path: str | pathlib.Path, *,
                       max_shard_size: int | str | None = None) -> None:
  """Writes `config.json` and the weights in the HF layout, in the params' dtypes.

  One `model.safetensors`, or with `max_shard_size` (bytes, or "500MB", "2GiB") shards
  `model-0000i-of-0000n.safetensors` of at most that size (a larger tensor gets a shard of its
  own) and `model.safetensors.index.json`. Weight files of an earlier checkpoint in `path` (the
  index, `model.safetensors`, `model-*-of-*.safetensors`) are replaced.

  Raises:
    TypeError: a structured (adapted) leaf: save `lowrank_jax.merge(params)`.
    ValueError: params that `cfg` does not describe, or a bad `max_shard_size`.
  """
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  limit = _shard_limit(max_shard_size)
  tensors = to_hf_state_dict(params, cfg)
  hf_cfg = config_to_hf(cfg, torch_dtype=str(tensors["model.embed_tokens.weight"].dtype))
  shards: list[dict[str, np.ndarray]] = [{}]
  shard_bytes = 0
  for name, value in tensors.items():
    if shards[-1] and limit is not None and shard_bytes + value.nbytes > limit:
      shards.append({})
      shard_bytes = 0
    shards[-1][name] = value
    shard_bytes += value.nbytes
  path = pathlib.Path(path).expanduser()
  path.mkdir(parents=True, exist_ok=True)
  for stale in [path / INDEX_FILE, path / "model.safetensors",
                *path.glob("model-*-of-*.safetensors")]:
    stale.unlink(missing_ok=True)
  names = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  for name, shard in zip(names, shards):
    safetensors.numpy.save_file(shard, str(path / name), metadata={"format": "pt"})
  if len(shards) > 1:
    index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
             "weight_map": {t: name for name, shard in zip(names, shards) for t in shard}}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2))
  (path / "config.json").write_text(json.dumps(hf_cfg, indent=2))


# ---------------------------------------------------------------------------------------------
# The trainer's view of a decoder LM (`models.ModelSpec.lm_logits`).
# ---------------------------------------------------------------------------------------------

def causal_lm_logits(params: dict, cfg: LlamaConfig, batch: Mapping[str, Any], *,
                     deterministic: bool = True, rng: jax.Array | None = None) -> jax.Array:
  """Next-token logits (B, T, vocab) of a batch's `input_ids`, with its packing (`positions`,
  `segment_ids`) when it has them."""
  return apply(params, batch["input_ids"], cfg, positions=batch.get("positions"),
               segment_ids=batch.get("segment_ids"), deterministic=deterministic, rng=rng)
