"""MoDeGPT: training-free structured compression of transformer blocks into a smaller dense model.

`modegpt(params, cfg, batches, config)` compresses the Llama-style decoder (`models.llama`) or the
MiniLM/BERT encoder (`models.minilm`). Per block, each module (a pair of matrices joined by an
inner dimension) is cut to a per-layer size and reconstructed from calibration statistics, with
the formulas of `compress.steps`:

- MLP (gate/up -> SiLU-gated product -> down; BERT: intermediate -> GELU -> output): Nyström
  column selection of the inner units by ridge leverage scores of the down projection's input
  correlation, and the down projection re-fitted by least squares.
- Query–key: CR decomposition, per key/value head. On the decoder the unit is a RoPE pair
  (dims i and i + D/2) and the kept pairs' frequencies are recorded in the config
  (`LlamaConfig.layer_qk_freqs`); the selection is per key/value head, shared by the query heads
  of its group (their correlations summed), so different groups may keep different frequencies.
- Value–output: SVD of ``(C^{1/2} + λI) W_V W_O`` per value head, with the output projections of
  all query heads of its group side by side (one shared value head per group). A value bias
  ``b_V`` is folded into the output bias (``b_O += b_V W_O``, exact because attention weights sum
  to one) and the new value bias is zero; a model with a value bias and no output bias (Qwen2) is
  refused.

Choices where the method leaves room: the statistics are collected once on the original model
(every layer's inputs are the uncompressed model's, not re-collected after compressing earlier
layers); the query/key scores use the projections without their biases; ridge values are relative
to the statistics' scale (see `compress.steps`).

Sparsity per layer: `allocation="influence"` spreads the target over layers by block influence
``1 − cos(x_in, x_out)`` (mean over calibration tokens; `compress.steps.allocate_sparsity`), or
`"uniform"`. A layer of sparsity φ keeps ``round((1 − φ)·n)`` q/k units (RoPE pairs or dims) and
value dims per head, and as many MLP units as brings the layer's block parameters (q, k, v, o
and MLP kernels and biases) closest to ``(1 − φ)`` times the original; the achieved fraction of
block parameters removed is in the report. A module whose size does not change is left as it is
(bit for bit), so `ratio=0` returns the model unchanged.

>>> import jax
>>> from lowrank_jax import compress
>>> from lowrank_jax.models import llama
>>> cfg = llama.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_heads=2,
...                         num_kv_heads=1, num_layers=2)
>>> params = llama.init(jax.random.key(0), cfg)
>>> batch = {"input_ids": jax.random.randint(jax.random.key(1), (2, 8), 0, 32)}
>>> small, small_cfg, report = compress.modegpt(params, cfg, [batch],
...                                             compress.CompressConfig(ratio=0.3))
>>> round(report["achieved_ratio"], 2)
0.3
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax import calibrate
from lowrank_jax import ops
from lowrank_jax.compress import steps
from lowrank_jax.models import _layers as L
from lowrank_jax.models import llama
from lowrank_jax.models import minilm

ALLOCATIONS = ("influence", "uniform")
# The config fields of a compressed model (`LlamaConfig`, `MiniLMConfig`).
_LAYER_SIZE_FIELDS = ("layer_intermediate_sizes", "layer_qk_freqs", "layer_qk_head_dims",
                      "layer_v_head_dims")


@dataclasses.dataclass(frozen=True)
class CompressConfig:
  """MoDeGPT settings.

  Attributes:
    ratio: target fraction of the block parameters (q, k, v, o and MLP kernels and biases)
      removed, in [0, cap].
    allocation: "influence" (softmax of block influence) or "uniform" (every layer `ratio`).
    temperature: ε of the influence softmax (> 0).
    cap: the largest sparsity of one layer, in (0, 1).
    mlp_ridge: λ of the ridge leverage scores, relative to the mean of diag(C_σ).
    vo_ridge: λ added to C^{1/2}, relative to its mean eigenvalue.
  """
  ratio: float = 0.3
  allocation: str = "influence"
  temperature: float = 0.15
  cap: float = 0.8
  mlp_ridge: float = 1e-2
  vo_ridge: float = 1e-4

  def __post_init__(self):
    L.check_choice("CompressConfig.allocation", self.allocation, ALLOCATIONS)
    if not 0 < self.cap < 1:
      raise ValueError(f"CompressConfig.cap must be in (0, 1), got {self.cap!r}")
    if not 0 <= self.ratio <= self.cap:
      raise ValueError(f"CompressConfig.ratio must be in [0, cap={self.cap}] (the fraction of "
                       f"block parameters removed), got {self.ratio!r}")
    for f in ("temperature", "mlp_ridge", "vo_ridge"):
      if not getattr(self, f) > 0:
        raise ValueError(f"CompressConfig.{f} must be > 0, got {getattr(self, f)!r}")


@dataclasses.dataclass(frozen=True)
class _Family:
  """How one model family names and runs its blocks."""
  layers: tuple[str, ...]            # path to the per-layer dicts
  q: str
  k: str
  v: str
  o: str
  mlp_in: tuple[str, ...]
  mlp_out: str
  rope: bool


_LLAMA = _Family(("layers",), "attention/q_proj", "attention/k_proj", "attention/v_proj",
                 "attention/o_proj", ("mlp/gate_proj", "mlp/up_proj"), "mlp/down_proj", True)
_MINILM = _Family(("encoder",), "attention/query", "attention/key", "attention/value",
                  "attention/output", ("mlp/intermediate",), "mlp/output", False)


def _family(cfg) -> _Family:
  if isinstance(cfg, llama.LlamaConfig):
    if cfg.qkv_bias and not cfg.o_bias:
      raise ValueError("modegpt: a value bias without an output-projection bias (Qwen2's "
                       "qkv_bias=True, o_bias=False) cannot be folded into the output bias")
    return _LLAMA
  if isinstance(cfg, minilm.MiniLMConfig):
    return _MINILM
  raise TypeError(f"modegpt: cfg must be a llama.LlamaConfig or a minilm.MiniLMConfig, got "
                  f"{type(cfg).__name__}")


def _heads(cfg) -> tuple[int, int, int]:
  """(query heads, key/value heads, original head size)."""
  if isinstance(cfg, llama.LlamaConfig):
    return cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head
  return cfg.num_heads, cfg.num_heads, cfg.hidden_size // cfg.num_heads


def _layer(params, fam: _Family, i: int) -> dict:
  tree = params
  for part in fam.layers:
    tree = tree[part]
  return tree[f"layer_{i}"]


def _get(layer: Mapping, path: str) -> dict:
  a, b = path.split("/")
  return layer[a][b]


def _check_uncompressed(cfg) -> None:
  set_ = [f for f in _LAYER_SIZE_FIELDS if getattr(cfg, f, None) is not None]
  if set_:
    raise ValueError(f"modegpt: cfg already has per-layer sizes {set_}: compress the original "
                     f"model instead")


# ---------------------------------------------------------------------------------------------
# Calibration: input correlations and block influence.
# ---------------------------------------------------------------------------------------------

def _forward(cfg):
  """(apply(params, batch), token mask(batch) or None) for calibration."""
  if isinstance(cfg, llama.LlamaConfig):
    apply = lambda p, b: llama.causal_lm_logits(p, cfg, b)
    mask = lambda b: (b["segment_ids"] > 0) if "segment_ids" in b else (
        b.get("attention_mask", jnp.ones(b["input_ids"].shape, bool)))
    return apply, mask
  apply = lambda p, b: minilm.encode(p, cfg, b["input_ids"], b.get("attention_mask"),
                                     b.get("token_type_ids"))
  mask = lambda b: b.get("attention_mask", jnp.ones(b["input_ids"].shape, bool))
  return apply, mask


def _stream_states(params, cfg, batch) -> list[jax.Array]:
  """Residual-stream states x_0 .. x_L (B, T, d), each up to a positive per-token factor (which
  cosines ignore): Llama's truncated models end in an RMSNorm with unit scale; BERT's blocks end
  in their LayerNorm, so a truncated encoder's output is the next block's input."""
  ids = batch["input_ids"]
  truncate = lambda n: dataclasses.replace(cfg, num_layers=n)
  if isinstance(cfg, llama.LlamaConfig):
    unit = {**params, "final_norm": {"scale": jnp.ones_like(params["final_norm"]["scale"])}}
    first = ops.embed(ids, params["embed"]["embedding"])
    run = lambda n: llama.hidden_states(unit, ids, truncate(n), positions=batch.get("positions"),
                                        segment_ids=batch.get("segment_ids"))
  else:
    e = params["embeddings"]
    first = L.layer_norm(e["norm"], ops.embed(ids, e["word_embeddings"]["embedding"])
                         + e["position_embeddings"]["embedding"][:ids.shape[1]][None]
                         + ops.embed(batch.get("token_type_ids", jnp.zeros_like(ids)),
                                     e["token_type_embeddings"]["embedding"]),
                         cfg.layer_norm_eps)
    run = lambda n: minilm.encode(params, truncate(n), ids, batch.get("attention_mask"),
                                  batch.get("token_type_ids"))
  return [first] + [run(n) for n in range(1, cfg.num_layers + 1)]


_jit_stream_states = jax.jit(_stream_states, static_argnums=1)   # compiled once per config


def block_influence(params, cfg, batches: Iterable[Mapping[str, Any]]) -> np.ndarray:
  """(L,) block influence ``1 − cos(x_in, x_out)`` of every block, averaged over the unmasked
  calibration tokens."""
  _, mask_fn = _forward(cfg)
  total, count = np.zeros(cfg.num_layers), 0.0
  for batch in batches:
    xs = _jit_stream_states(params, cfg, batch)
    m = np.asarray(mask_fn(batch), np.float64)
    for i in range(cfg.num_layers):
      a, b = np.asarray(xs[i], np.float64), np.asarray(xs[i + 1], np.float64)
      cos = np.sum(a * b, -1) / np.maximum(
          np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)
      total[i] += np.sum((1 - cos) * m)
    count += m.sum()
  if not count > 0:
    raise ValueError("block_influence: the calibration batches hold no unmasked token")
  return total / count


def _input_correlations(params, cfg, fam: _Family, batches) -> list[tuple[np.ndarray, ...]]:
  """Per layer: (attention input correlation (d, d), down-projection input correlation)."""
  apply, mask_fn = _forward(cfg)
  prefix = "/".join(fam.layers)
  stats = calibrate.collect(apply, params, batches, mask_fn=mask_fn,
                            targets=[rf"{prefix}/layer_\d+/{fam.q}/kernel",
                                     rf"{prefix}/layer_\d+/{fam.mlp_out}/kernel"])
  return [(np.asarray(_get(_layer(stats, fam, i), fam.q)["kernel"].cov, np.float64),
           np.asarray(_get(_layer(stats, fam, i), fam.mlp_out)["kernel"].cov, np.float64))
          for i in range(cfg.num_layers)]


# ---------------------------------------------------------------------------------------------
# Sizes.
# ---------------------------------------------------------------------------------------------

def block_param_count(params, cfg) -> int:
  """Parameters of every block's q, k, v, o and MLP kernels and biases (norms excluded)."""
  fam = _family(cfg)
  total = 0
  for i in range(cfg.num_layers):
    layer = _layer(params, fam, i)
    for path in (fam.q, fam.k, fam.v, fam.o, *fam.mlp_in, fam.mlp_out):
      total += sum(int(np.prod(x.shape)) for x in jax.tree.leaves(_get(layer, path)))
  return total


def _layer_counts(layer, fam: _Family, heads) -> tuple[int, int, int, int]:
  """(params of q/k per q/k head dim, of v/o per value head dim, of the MLP per unit, fixed)."""
  h, hkv, _ = heads
  width = lambda path: int(np.prod(_get(layer, path)["kernel"].shape[:1])) + (
      1 if "bias" in _get(layer, path) else 0)   # d_in (+ bias) per output column
  d = _get(layer, fam.o)["kernel"].shape[-1]
  per_qk = (h + hkv) * width(fam.q)
  per_v = hkv * width(fam.v) + h * d
  per_unit = sum(width(p) for p in fam.mlp_in) + d
  fixed = sum(int(np.prod(_get(layer, p)["bias"].shape)) for p in (fam.o, fam.mlp_out)
              if "bias" in _get(layer, p))
  return per_qk, per_v, per_unit, fixed


def _layer_sizes(phi: float, layer, fam: _Family, heads, mlp_size: int):
  """(kept q/k units, kept value dims, kept MLP units) of a layer of sparsity `phi`."""
  _, _, dh = heads
  per_qk, per_v, per_unit, fixed = _layer_counts(layer, fam, heads)
  unit = 2 if fam.rope else 1
  units = dh // unit
  full = per_qk * dh + per_v * dh + per_unit * mlp_size + fixed
  qk = max(1, int(round((1 - phi) * units)))
  vd = max(1, int(round((1 - phi) * dh)))
  rest = (1 - phi) * full - fixed - per_qk * qk * unit - per_v * vd
  mlp = min(mlp_size, max(1, int(round(rest / per_unit))))
  return qk, vd, mlp


# ---------------------------------------------------------------------------------------------
# One layer.
# ---------------------------------------------------------------------------------------------

def _cast(x, like):
  return jnp.asarray(x, like.dtype)


def _take_cols(p: Mapping, cols) -> dict:
  out = {"kernel": p["kernel"][:, cols]}
  if "bias" in p:
    out["bias"] = p["bias"][cols]
  return out


def _key_query(layer, fam: _Family, heads, cov_x, keep: int):
  """(new q params, new k params, kept RoPE pairs per kv head or None)."""
  h, hkv, dh = heads
  q, k = _get(layer, fam.q), _get(layer, fam.k)
  wq, wk = np.asarray(q["kernel"], np.float64), np.asarray(k["kernel"], np.float64)
  corr = lambda w: w.T @ cov_x @ w
  group = h // hkv
  q_cols, k_cols, kept = [], [], []
  for g in range(hkv):
    ck = corr(wk[:, g * dh:(g + 1) * dh])
    cq = sum(corr(wq[:, j * dh:(j + 1) * dh]) for j in range(g * group, (g + 1) * group))
    if fam.rope:
      pairs = steps.top_k(steps.cr_pair_scores(cq, ck), keep)
      dims = np.concatenate([pairs, pairs + dh // 2])
      kept.append(tuple(int(i) for i in pairs))
    else:
      dims = steps.top_k(steps.cr_scores(cq, ck), keep)
    k_cols.append(g * dh + dims)
    q_cols += [j * dh + dims for j in range(g * group, (g + 1) * group)]
  return (_take_cols(q, np.concatenate(q_cols)), _take_cols(k, np.concatenate(k_cols)),
          tuple(kept) if fam.rope else None)


def _value_output(layer, fam: _Family, heads, cov_x, keep: int, ridge: float):
  """(new v params, new o params)."""
  h, hkv, dh = heads
  v, o = _get(layer, fam.v), _get(layer, fam.o)
  wv, wo = np.asarray(v["kernel"], np.float64), np.asarray(o["kernel"], np.float64)
  group = h // hkv
  new_v, new_o = [], []
  for g in range(hkv):
    heads_o = wo[g * group * dh:(g + 1) * group * dh].reshape(group, dh, -1)
    a, b = steps.svd_value_output(cov_x, wv[:, g * dh:(g + 1) * dh], heads_o, keep, ridge)
    new_v.append(a)
    new_o.append(b.reshape(group * keep, -1))
  out_v = {"kernel": _cast(np.concatenate(new_v, 1), v["kernel"])}
  out_o = {"kernel": _cast(np.concatenate(new_o, 0), o["kernel"])}
  if "bias" in v:
    # Attention rows sum to one, so the value bias reaches the output as b_V W_O.
    bv = np.repeat(np.asarray(v["bias"], np.float64).reshape(hkv, 1, dh), group, 1).reshape(-1)
    out_v["bias"] = jnp.zeros((hkv * keep,), v["bias"].dtype)
    out_o["bias"] = _cast(np.asarray(o["bias"], np.float64) + bv @ wo, o["bias"])
  elif "bias" in o:
    out_o["bias"] = o["bias"]
  return out_v, out_o


def _mlp(layer, fam: _Family, cov_h, keep: int, ridge: float):
  """{path: new params} of the MLP."""
  idx = steps.nystrom_select(cov_h, keep, ridge)
  out = {p: _take_cols(_get(layer, p), idx) for p in fam.mlp_in}
  down = _get(layer, fam.mlp_out)
  out[fam.mlp_out] = {**down, "kernel": _cast(steps.nystrom_down(cov_h, idx, down["kernel"]),
                                              down["kernel"])}
  return out


def _set(layer: dict, path: str, value) -> dict:
  a, b = path.split("/")
  return {**layer, a: {**layer[a], b: value}}


# ---------------------------------------------------------------------------------------------
# The model.
# ---------------------------------------------------------------------------------------------

def _new_config(cfg, sizes, freqs):
  qk, vd, mlp = (tuple(s[j] for s in sizes) for j in range(3))
  if isinstance(cfg, llama.LlamaConfig):
    return dataclasses.replace(cfg, layer_intermediate_sizes=mlp, layer_qk_freqs=tuple(freqs),
                               layer_v_head_dims=vd)
  return dataclasses.replace(cfg, layer_intermediate_sizes=mlp, layer_qk_head_dims=qk,
                             layer_v_head_dims=vd)


def modegpt(params: dict, cfg, batches: Iterable[Mapping[str, Any]],
            config: CompressConfig = CompressConfig()) -> tuple[dict, Any, dict]:
  """Compresses a Llama-style decoder or a MiniLM encoder with MoDeGPT.

  Args:
    params: dense params of the model (no structured leaves).
    cfg: its `llama.LlamaConfig` or `minilm.MiniLMConfig` (uniform sizes).
    batches: calibration batches (read twice): Llama {"input_ids"} with optional "segment_ids"
      (0: padding), "positions"; MiniLM {"input_ids", "attention_mask"}, optional
      "token_type_ids".
    config: the `CompressConfig`.
  Returns:
    (new params, new config with the per-layer sizes, report) where the report holds
    "influence" and "sparsity" (per layer), "sizes" (per layer: kept q/k units (RoPE pairs on the
    decoder), value head dims, MLP units), "block_params" (before, after) and
    "achieved_ratio".
  Raises:
    TypeError: an unknown config type.
    ValueError: a config that already has per-layer sizes, a value bias without an output bias,
      no calibration batch.
  """
  fam = _family(cfg)
  _check_uncompressed(cfg)
  batches = list(batches)
  if not batches:
    raise ValueError("modegpt: `batches` yielded no calibration batch")
  heads = _heads(cfg)
  influence = block_influence(params, cfg, batches)
  if config.allocation == "influence":
    phis = steps.allocate_sparsity(influence, config.ratio, config.temperature, config.cap)
  else:
    phis = np.full(cfg.num_layers, config.ratio)
  corrs = _input_correlations(params, cfg, fam, batches)
  new_layers, sizes, freqs = {}, [], []
  all_pairs = tuple(tuple(range(heads[2] // 2)) for _ in range(heads[1]))
  for i in range(cfg.num_layers):
    layer = _layer(params, fam, i)
    cov_x, cov_h = corrs[i]
    mlp_size = _get(layer, fam.mlp_out)["kernel"].shape[0]
    qk, vd, mlp = _layer_sizes(float(phis[i]), layer, fam, heads, mlp_size)
    new = layer
    kept_pairs = all_pairs
    if qk < heads[2] // (2 if fam.rope else 1):
      q, k, kept_pairs = _key_query(layer, fam, heads, cov_x, qk)
      new = _set(_set(new, fam.q, q), fam.k, k)
    if vd < heads[2]:
      v, o = _value_output(layer, fam, heads, cov_x, vd, config.vo_ridge)
      new = _set(_set(new, fam.v, v), fam.o, o)
    if mlp < mlp_size:
      for path, value in _mlp(layer, fam, cov_h, mlp, config.mlp_ridge).items():
        new = _set(new, path, value)
    new_layers[f"layer_{i}"] = new
    sizes.append((qk, vd, mlp))
    freqs.append(kept_pairs)
  out = dict(params)
  out[fam.layers[0]] = {**params[fam.layers[0]], **new_layers}
  new_cfg = _new_config(cfg, sizes, freqs)
  before, after = block_param_count(params, cfg), block_param_count(out, new_cfg)
  report = {"influence": influence.tolist(), "sparsity": phis.tolist(), "sizes": sizes,
            "block_params": (before, after), "achieved_ratio": 1 - after / before}
  return out, new_cfg, report


def svd_baseline(params: dict, cfg, ratio: float) -> tuple[dict, int]:
  """Plain truncated SVD of every block kernel (q, k, v, o, MLP) at the parameter count of
  `modegpt` at `ratio`: a (m, n) kernel gets rank ``round((1 − ratio)·m·n / (m + n))`` (at
  least 1), i.e. factors of about ``(1 − ratio)`` of its parameters. The product is returned
  dense (the same function as the factored form); biases are kept.

  Returns:
    (params, block parameters of the factored form, biases included).
  Raises:
    ValueError: `ratio` outside [0, 1).
  """
  if not 0 <= ratio < 1:
    raise ValueError(f"svd_baseline: ratio must be in [0, 1), got {ratio!r}")
  fam = _family(cfg)
  new_layers, count = {}, 0
  for i in range(cfg.num_layers):
    layer = _layer(params, fam, i)
    for path in (fam.q, fam.k, fam.v, fam.o, *fam.mlp_in, fam.mlp_out):
      p = _get(layer, path)
      w = np.asarray(p["kernel"], np.float64)
      m, n = w.shape
      r = max(1, int(round((1 - ratio) * m * n / (m + n))))
      u, s, vt = np.linalg.svd(w, full_matrices=False)
      layer = _set(layer, path, {**p, "kernel": _cast((u[:, :r] * s[:r]) @ vt[:r], p["kernel"])})
      count += r * (m + n) + (int(np.prod(p["bias"].shape)) if "bias" in p else 0)
    new_layers[f"layer_{i}"] = layer
  out = dict(params)
  out[fam.layers[0]] = {**params[fam.layers[0]], **new_layers}
  return out, count
