"""Llama-style decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) as pure functions.

Presets run from `tiny` (tests) to `tinyllama_1_1b` and `llama2_7b` shapes (benchmarks; random
init, use `jax.eval_shape(init, ...)` to get shapes without allocating). `load_hf_checkpoint(path)`
reads a Hugging Face Llama checkpoint directory (``config.json`` + ``*.safetensors``) from local
disk.

Parameter paths (kernels in flax layout ``(d_in, d_out)``)::

  embed/embedding
  layers/layer_{i}/attention/{q_proj,k_proj,v_proj,o_proj}/kernel
  layers/layer_{i}/mlp/{gate_proj,up_proj,down_proj}/kernel
  layers/layer_{i}/{input_norm,post_attention_norm}/scale
  final_norm/scale
  lm_head/kernel

Name map to Hugging Face `LlamaForCausalLM` modules (`hf_name_map`; our path without its leaf)::

  embed                               -> model.embed_tokens
  layers/layer_0/attention/q_proj     -> model.layers.0.self_attn.q_proj   (k, v, o alike)
  layers/layer_0/mlp/gate_proj        -> model.layers.0.mlp.gate_proj      (up, down alike)
  layers/layer_0/input_norm           -> model.layers.0.input_layernorm
  layers/layer_0/post_attention_norm  -> model.layers.0.post_attention_layernorm
  final_norm                          -> model.norm
  lm_head                             -> lm_head

Leaves: kernel <-> weight (transposed), embedding <-> weight, scale <-> weight. RoPE uses the HF
"rotate half" convention, so HF checkpoints load without permuting q/k.

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
import pathlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax import ops
from lowrank_jax.models import _layers as L


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Llama decoder hyperparameters."""
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
  """Random params (normal, std 0.02; norms at one)."""
  d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.dim_per_head
  lin = lambda k, i, o: L.dense_init(k, i, o, bias=False, std=0.02, dtype=dtype)
  k_embed, k_head, k_layers = jax.random.split(key, 3)
  params: dict = {"embed": L.embed_init(k_embed, cfg.vocab_size, d, dtype=dtype), "layers": {}}
  for i in range(cfg.num_layers):
    ks = jax.random.split(jax.random.fold_in(k_layers, i), 7)
    params["layers"][f"layer_{i}"] = {
        "attention": {"q_proj": lin(ks[0], d, cfg.num_heads * hd),
                      "k_proj": lin(ks[1], d, cfg.num_kv_heads * hd),
                      "v_proj": lin(ks[2], d, cfg.num_kv_heads * hd),
                      "o_proj": lin(ks[3], cfg.num_heads * hd, d)},
        "mlp": {"gate_proj": lin(ks[4], d, f), "up_proj": lin(ks[5], d, f),
                "down_proj": lin(ks[6], f, d)},
        "input_norm": L.rms_norm_init(d, dtype),
        "post_attention_norm": L.rms_norm_init(d, dtype),
    }
  params["final_norm"] = L.rms_norm_init(d, dtype)
  params["lm_head"] = lin(k_head, d, cfg.vocab_size)
  return params


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, HF rotate-half convention. x (B, T, H, D), positions (B, T)."""
  d = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  ang = positions.astype(jnp.float32)[..., None] * inv_freq            # (B, T, D/2)
  ang = jnp.concatenate([ang, ang], axis=-1)[:, :, None, :]            # (B, T, 1, D)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x * jnp.cos(ang) + rotated * jnp.sin(ang)).astype(x.dtype)


def _attention(p, x, positions, mask, cfg, kv=None, index=None):
  """Self-attention; with a layer cache `kv` ({"k", "v"}) the new keys/values are written at slot
  `index` and the queries attend over the whole cache. Returns (output, updated kv or None)."""
  b, t, _ = x.shape
  hd = cfg.dim_per_head
  q = ops.dense(x, p["q_proj"]["kernel"]).reshape(b, t, cfg.num_heads, hd)
  k = ops.dense(x, p["k_proj"]["kernel"]).reshape(b, t, cfg.num_kv_heads, hd)
  v = ops.dense(x, p["v_proj"]["kernel"]).reshape(b, t, cfg.num_kv_heads, hd)
  q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
  if kv is not None:
    write = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), index,
                                                                  axis=1)
    kv = {"k": write(kv["k"], k), "v": write(kv["v"], v)}
    k, v = kv["k"].astype(q.dtype), kv["v"].astype(q.dtype)
  o = jax.nn.dot_product_attention(q, k, v, mask=mask)   # GQA built in
  return ops.dense(o.reshape(b, t, cfg.num_heads * hd), p["o_proj"]["kernel"]), kv


def _attention_mask(q_segments, kv_segments, q_slots, kv_slots):
  """Boolean (B, 1, T, S): query t sees key s iff s is not after t and both share a segment."""
  causal = kv_slots[None, :] <= q_slots[:, None]                       # (T, S)
  same_segment = q_segments[:, :, None] == kv_segments[:, None, :]     # (B, T, S)
  return (causal & same_segment)[:, None]


def _mlp(p, x):
  g = ops.dense(x, p["gate_proj"]["kernel"])
  u = ops.dense(x, p["up_proj"]["kernel"])
  return ops.dense(jax.nn.silu(g) * u, p["down_proj"]["kernel"])


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
  """An empty KV cache of `max_len` slots per row for `apply(..., cache=...)`.

  A pure pytree:

  - ``layers/layer_{i}/{k,v}``: the (rotated) keys and the values of every slot, shape
    (batch, max_len, num_kv_heads, head_dim) in `dtype`;
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
  slots = jnp.zeros((batch, max_len, cfg.num_kv_heads, cfg.dim_per_head), dtype)
  return {"layers": {f"layer_{i}": {"k": slots, "v": slots} for i in range(cfg.num_layers)},
          "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
          "index": jnp.zeros((), jnp.int32)}


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
  new_layers = {}
  x = ops.embed(input_ids, params["embed"]["embedding"])
  for i in range(cfg.num_layers):
    lp = params["layers"][f"layer_{i}"]
    kv = None if cache is None else cache["layers"][f"layer_{i}"]
    h, kv = _attention(lp["attention"], L.rms_norm(lp["input_norm"], x, cfg.rms_norm_eps),
                       positions, mask, cfg, kv, first_slot)
    new_layers[f"layer_{i}"] = kv
    x = x + L.dropout(h, cfg.dropout_rate, L.fold(rng, i, 0), deterministic)
    h = _mlp(lp["mlp"], L.rms_norm(lp["post_attention_norm"], x, cfg.rms_norm_eps))
    x = x + L.dropout(h, cfg.dropout_rate, L.fold(rng, i, 1), deterministic)
  h = L.rms_norm(params["final_norm"], x, cfg.rms_norm_eps)
  if cache is None:
    return h
  return h, {"layers": new_layers, "segment_ids": kv_segments, "index": first_slot + t}


def apply(params: dict, input_ids: jax.Array, cfg: LlamaConfig, *,
          positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
          attention_mask: jax.Array | None = None, cache: dict | None = None,
          deterministic: bool = True, rng: jax.Array | None = None):
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
  """
  out = hidden_states(params, input_ids, cfg, positions=positions, segment_ids=segment_ids,
                      attention_mask=attention_mask, cache=cache, deterministic=deterministic,
                      rng=rng)
  if cache is None:
    return ops.dense(out, params["lm_head"]["kernel"])
  h, cache = out
  return ops.dense(h, params["lm_head"]["kernel"]), cache


def num_params(cfg: LlamaConfig) -> int:
  """Parameter count without allocating."""
  shapes = jax.eval_shape(lambda: init(jax.random.key(0), cfg))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


# ---------------------------------------------------------------------------------------------
# Hugging Face names and checkpoints.
# ---------------------------------------------------------------------------------------------

def _hf_modules(cfg: LlamaConfig) -> list[tuple[str, str, str]]:
  mods = [("embed", "model.embed_tokens", "embedding")]
  for i in range(cfg.num_layers):
    o, h = f"layers/layer_{i}", f"model.layers.{i}"
    mods += [(f"{o}/attention/{n}", f"{h}.self_attn.{n}", "linear")
             for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    mods += [(f"{o}/mlp/{n}", f"{h}.mlp.{n}", "linear")
             for n in ("gate_proj", "up_proj", "down_proj")]
    mods += [(f"{o}/input_norm", f"{h}.input_layernorm", "norm"),
             (f"{o}/post_attention_norm", f"{h}.post_attention_layernorm", "norm")]
  mods += [("final_norm", "model.norm", "norm"), ("lm_head", "lm_head", "linear")]
  return mods


_LEAF = {"linear": ("kernel", True), "embedding": ("embedding", False), "norm": ("scale", False)}


def hf_name_map(cfg: LlamaConfig) -> dict[str, str]:
  """{our module path (param path without its leaf): HF `LlamaForCausalLM` module name}."""
  return {ours: hf for ours, hf, _ in _hf_modules(cfg)}


def config_from_hf(hf: Mapping[str, Any]) -> LlamaConfig:
  """LlamaConfig from a HF Llama `config.json` dict."""
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported; valid values: ['silu']")
  if hf.get("rope_scaling"):
    raise ValueError(f"rope_scaling={hf['rope_scaling']!r} is not supported; valid values: [None]")
  heads = hf["num_attention_heads"]
  head_dim = hf.get("head_dim")
  if head_dim == hf["hidden_size"] // heads:
    head_dim = None
  return LlamaConfig(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
      num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
      max_position_embeddings=hf.get("max_position_embeddings", 2048),
      rope_theta=float(hf.get("rope_theta", 10000.0)),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)))


def config_to_hf(cfg: LlamaConfig) -> dict[str, Any]:
  """A HF `config.json` dict for `cfg`."""
  return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
          "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
          "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
          "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
          "head_dim": cfg.dim_per_head, "max_position_embeddings": cfg.max_position_embeddings,
          "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_norm_eps, "hidden_act": "silu",
          "tie_word_embeddings": False, "torch_dtype": "float32"}


def from_hf_state_dict(tensors: Mapping[str, Any], cfg: LlamaConfig, dtype=jnp.float32,
                       tie_word_embeddings: bool = False) -> dict:
  """HF Llama state dict (PyTorch layout) -> our nested params.

  A missing `lm_head.weight` with `tie_word_embeddings` is filled from the embedding table.
  """
  tensors = dict(tensors)
  if "lm_head.weight" not in tensors and tie_word_embeddings:
    tensors["lm_head.weight"] = tensors.get("model.embed_tokens.weight")
  params: dict = {}
  missing = []
  for ours, hf, kind in _hf_modules(cfg):
    leaf, transpose = _LEAF[kind]
    value = tensors.get(f"{hf}.weight")
    if value is None:
      missing.append(f"{hf}.weight")
      continue
    value = jnp.asarray(value, dtype)
    node = params
    for part in ours.split("/"):
      node = node.setdefault(part, {})
    node[leaf] = value.T if transpose else value
  if missing:
    raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:5]}")
  return params


def to_hf_state_dict(params: dict, cfg: LlamaConfig) -> dict[str, np.ndarray]:
  """Inverse of `from_hf_state_dict` (dense params; `merge` structured weights first)."""
  out = {}
  for ours, hf, kind in _hf_modules(cfg):
    leaf, transpose = _LEAF[kind]
    node = params
    for part in ours.split("/"):
      node = node[part]
    value = np.asarray(node[leaf])
    out[f"{hf}.weight"] = np.ascontiguousarray(value.T if transpose else value)
  return out


def load_hf_checkpoint(path: str | pathlib.Path, dtype=jnp.float32) -> tuple[dict, LlamaConfig]:
  """Loads a local HF Llama checkpoint directory (`config.json` + one or more `*.safetensors`).

  Returns:
    (params, cfg).
  Raises:
    FileNotFoundError: the directory, its config.json or its safetensors files are missing.
  """
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path).expanduser()
  if not (path / "config.json").is_file():
    raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint directory: no config.json")
  hf_cfg = json.loads((path / "config.json").read_text())
  cfg = config_from_hf(hf_cfg)
  files = sorted(path.glob("*.safetensors"))
  if not files:
    raise FileNotFoundError(f"no *.safetensors files in {path} (PyTorch .bin files are not read)")
  tensors = {}
  for f in files:
    # The flax framework reads bfloat16 too (numpy has no bfloat16).
    with safe_open(str(f), framework="flax") as fh:
      for name in fh.keys():
        tensors[name] = fh.get_tensor(name)
  params = from_hf_state_dict(tensors, cfg, dtype,
                              tie_word_embeddings=hf_cfg.get("tie_word_embeddings", False))
  return params, cfg


def save_hf_checkpoint(params: dict, cfg: LlamaConfig, path: str | pathlib.Path) -> None:
  """Writes `config.json` + `model.safetensors` in the HF layout (float32)."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2))
  tensors = {k: v.astype(np.float32) for k, v in to_hf_state_dict(params, cfg).items()}
  safetensors.numpy.save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------
# The trainer's view of a decoder LM (`models.ModelSpec.lm_logits`).
# ---------------------------------------------------------------------------------------------

def causal_lm_logits(params: dict, cfg: LlamaConfig, batch: Mapping[str, Any], *,
                     deterministic: bool = True, rng: jax.Array | None = None) -> jax.Array:
  """Next-token logits (B, T, vocab) of a batch's `input_ids`, with its packing (`positions`,
  `segment_ids`) when it has them."""
  return apply(params, batch["input_ids"], cfg, positions=batch.get("positions"),
               segment_ids=batch.get("segment_ids"), deterministic=deterministic, rng=rng)
