"""Llama-family HF checkpoints, the way users have them: tiny random checkpoints written by hand
(HF names, (out, in) weights, a config.json in the transformers 4.x or 5.x layout, sharded with an
index or not, float32 or bfloat16) load to logits that match a float64 numpy forward written here
from the architecture's definition; the saver round-trips; bad checkpoints fail naming the cause."""
import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

import lowrank_jax as lj
from lowrank_jax.models import llama

_apply = jax.jit(llama.apply, static_argnums=2)  # eager dispatch is slow on 2 cores
_init = jax.jit(llama.init, static_argnums=(1, 2))
IDS = np.array([3, 17, 42, 5, 9, 49, 0, 21])

# An architecture, described the way the reference reads it (not through LlamaConfig).
BASE = dict(model_type="llama", vocab=50, hidden=32, inter=40, layers=2, heads=4, kv=2,
            head_dim=None, theta=10000.0, eps=1e-6, tie=False, qkv_bias=False, o_bias=False,
            mlp_bias=False, scaling=None, max_pos=128)
# wavelengths 2π/θ^(-2i/D) for D=8, θ=1e4: 6.3, 63, 628, 6283; with an original context of 64,
# low 1 and high 4 the first is kept, the second interpolated and the last two divided by 8.
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
CASES = {
    "gqa_untied_v4_unsharded": dict(),
    "mqa_tied_v5_sharded": dict(kv=1, tie=True, theta=5e5, layout="v5", shards=2),
    "llama3_rope_v4_head_dim": dict(hidden=24, head_dim=8, scaling=LLAMA3, shards=3),
    "llama3_rope_v5": dict(hidden=24, head_dim=8, scaling=LLAMA3, layout="v5"),
    "linear_rope_v4": dict(scaling={"type": "linear", "factor": 4.0}),
    "llama_attention_and_mlp_bias": dict(qkv_bias=True, o_bias=True, mlp_bias=True, shards=2),
    "qwen2_qkv_bias_tied": dict(model_type="qwen2", qkv_bias=True, tie=True, kv=1),
    "mistral_gqa_v5": dict(model_type="mistral", layout="v5", theta=1e6),
}


def _spec(**overrides):
  s = dict(BASE, layout="v4", shards=1, dtype="float32")
  s.update(overrides)
  return s


def _hf_config(s):
  """config.json in transformers 4.x (top-level rope keys) or 5.x (`rope_parameters`) layout."""
  arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
  c = {"architectures": [arch[s["model_type"]]], "model_type": s["model_type"],
       "vocab_size": s["vocab"], "hidden_size": s["hidden"], "intermediate_size": s["inter"],
       "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"],
       "num_key_value_heads": s["kv"], "rms_norm_eps": s["eps"], "hidden_act": "silu",
       "max_position_embeddings": s["max_pos"], "tie_word_embeddings": s["tie"],
       "bos_token_id": 1, "eos_token_id": 2, "use_cache": True, "initializer_range": 0.02,
       "attention_dropout": 0.0, "torch_dtype": s["dtype"],
       "transformers_version": "5.0.0" if s["layout"] == "v5" else "4.46.0"}
  if s["head_dim"]:
    c["head_dim"] = s["head_dim"]
  if s["model_type"] == "llama":
    assert s["qkv_bias"] == s["o_bias"]
    c.update(attention_bias=s["qkv_bias"], mlp_bias=s["mlp_bias"], pretraining_tp=1)
  elif s["model_type"] == "mistral":
    c["sliding_window"] = None
  else:
    assert s["qkv_bias"] and not s["o_bias"] and not s["mlp_bias"]
    c.update(use_sliding_window=False, sliding_window=4096, max_window_layers=2)
  scaling = dict(s["scaling"] or {})
  if s["layout"] == "v5":
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    c["rope_parameters"] = {"rope_theta": s["theta"], "rope_type": rope_type, **scaling}
  else:
    c.update(rope_theta=s["theta"], rope_scaling=s["scaling"])
  return c


def _random_state_dict(s, seed=0):
  """Float64 weights in HF names and (out, in) layout, rounded to the stored dtype."""
  rng = np.random.default_rng(seed)
  d, f = s["hidden"], s["inter"]
  hd = s["head_dim"] or d // s["heads"]
  sd = {"model.embed_tokens.weight": rng.normal(size=(s["vocab"], d)),
        "model.norm.weight": 1 + 0.1 * rng.normal(size=(d,))}
  if not s["tie"]:
    sd["lm_head.weight"] = 0.3 * rng.normal(size=(s["vocab"], d))
  for i in range(s["layers"]):
    p = f"model.layers.{i}."
    linears = {"self_attn.q_proj": ((s["heads"] * hd, d), s["qkv_bias"]),
               "self_attn.k_proj": ((s["kv"] * hd, d), s["qkv_bias"]),
               "self_attn.v_proj": ((s["kv"] * hd, d), s["qkv_bias"]),
               "self_attn.o_proj": ((d, s["heads"] * hd), s["o_bias"]),
               "mlp.gate_proj": ((f, d), s["mlp_bias"]), "mlp.up_proj": ((f, d), s["mlp_bias"]),
               "mlp.down_proj": ((d, f), s["mlp_bias"])}
    for name, (shape, bias) in linears.items():
      sd[p + name + ".weight"] = rng.normal(size=shape) / np.sqrt(shape[1])
      if bias:
        sd[p + name + ".bias"] = 0.3 * rng.normal(size=shape[:1])
    sd[p + "input_layernorm.weight"] = 1 + 0.1 * rng.normal(size=(d,))
    sd[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.normal(size=(d,))
  stored = ml_dtypes.bfloat16 if s["dtype"] == "bfloat16" else np.float32
  return {k: v.astype(stored).astype(np.float64) for k, v in sd.items()}


def _write(path, s, sd, config=None):
  """Writes config.json and the weights: model.safetensors, or `shards` files and an index."""
  stored = ml_dtypes.bfloat16 if s["dtype"] == "bfloat16" else np.float32
  tensors = {k: v.astype(stored) for k, v in sd.items()}
  path.mkdir(parents=True, exist_ok=True)
  names = sorted(tensors)
  if s["shards"] == 1:
    safetensors.numpy.save_file(tensors, str(path / "model.safetensors"))
  else:
    n = s["shards"]
    files = [f"model-{j + 1:05d}-of-{n:05d}.safetensors" for j in range(n)]
    weight_map = {name: files[j * n // len(names)] for j, name in enumerate(names)}
    for file in files:
      safetensors.numpy.save_file({k: tensors[k] for k in names if weight_map[k] == file},
                                  str(path / file))
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
         "weight_map": weight_map}))
  (path / "config.json").write_text(json.dumps(config or _hf_config(s)))
  return path


def _reference_inv_freq(hd, theta, scaling):
  """RoPE inverse frequencies θ^(-2i/D), then Llama-3 or linear scaling, one frequency at a time."""
  freqs = [theta ** (-2 * i / hd) for i in range(hd // 2)]
  scaling = scaling or {}
  kind, factor = scaling.get("rope_type", scaling.get("type")), scaling.get("factor")
  out = []
  for fr in freqs:
    if kind == "linear":
      fr = fr / factor
    elif kind == "llama3":
      old, lo, hi = (scaling[k] for k in ("original_max_position_embeddings", "low_freq_factor",
                                           "high_freq_factor"))
      wavelength = 2 * math.pi / fr
      if wavelength > old / lo:        # low frequencies: interpolated by the factor
        fr = fr / factor
      elif wavelength >= old / hi:     # medium: a smooth blend of the two
        smooth = (old / wavelength - lo) / (hi - lo)
        fr = (1 - smooth) * fr / factor + smooth * fr
    out.append(fr)
  return np.array(out)


def _reference_logits(sd, s, ids, scaling="as_spec"):
  """Float64 Llama forward: RMSNorm, rotate-half RoPE, GQA by repeating kv heads, causal softmax
  attention, SwiGLU MLP, optional biases, lm head or the tied embedding."""
  t, nh, nkv = len(ids), s["heads"], s["kv"]
  hd = s["head_dim"] or s["hidden"] // nh
  inv = _reference_inv_freq(hd, s["theta"], s["scaling"] if scaling == "as_spec" else scaling)
  ang = np.arange(t)[:, None] * inv[None, :]
  cos, sin = np.cos(np.concatenate([ang, ang], 1)), np.sin(np.concatenate([ang, ang], 1))

  def rms(x, w):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + s["eps"]) * w

  def linear(x, name):
    y = x @ sd[name + ".weight"].T
    return y + sd[name + ".bias"] if name + ".bias" in sd else y

  def heads(x, n):  # (t, n*hd) -> (n, t, hd)
    return x.reshape(t, n, hd).transpose(1, 0, 2)

  def rotate(x):
    x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
    return x * cos + np.concatenate([-x2, x1], -1) * sin

  x = sd["model.embed_tokens.weight"][ids]
  for i in range(s["layers"]):
    p = f"model.layers.{i}."
    h = rms(x, sd[p + "input_layernorm.weight"])
    q = rotate(heads(linear(h, p + "self_attn.q_proj"), nh))
    k = rotate(heads(linear(h, p + "self_attn.k_proj"), nkv))
    v = heads(linear(h, p + "self_attn.v_proj"), nkv)
    k, v = np.repeat(k, nh // nkv, axis=0), np.repeat(v, nh // nkv, axis=0)
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(hd)
    scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    o = (probs @ v).transpose(1, 0, 2).reshape(t, nh * hd)
    x = x + linear(o, p + "self_attn.o_proj")
    h = rms(x, sd[p + "post_attention_layernorm.weight"])
    g, u = linear(h, p + "mlp.gate_proj"), linear(h, p + "mlp.up_proj")
    x = x + linear(g / (1 + np.exp(-g)) * u, p + "mlp.down_proj")
  head = sd["model.embed_tokens.weight"] if s["tie"] else sd["lm_head.weight"]
  return rms(x, sd["model.norm.weight"]) @ head.T


def _logits(params, cfg):
  with jax.default_matmul_precision("highest"):
    return np.asarray(_apply(params, jnp.asarray(IDS)[None], cfg)[0], np.float64)


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_logits_match_float64_reference(tmp_path, case):
  s = _spec(**CASES[case])
  sd = _random_state_dict(s)
  params, cfg = llama.load_hf_checkpoint(_write(tmp_path / case, s, sd))
  assert cfg.num_kv_heads == s["kv"] and cfg.tie_word_embeddings == s["tie"]
  assert ("lm_head" in params) != s["tie"]
  assert cfg.rope_theta == s["theta"]
  ref = _reference_logits(sd, s, IDS)
  np.testing.assert_allclose(_logits(params, cfg), ref, rtol=1e-5, atol=1e-5)
  if s["scaling"]:  # the scaling is visible at these positions: the check above can fail
    assert np.abs(_reference_logits(sd, s, IDS, scaling=None) - ref).max() > 1e-3


def test_bf16_checkpoint_stays_bf16_and_takes_fp32_lora(tmp_path):
  """bf16 weights are kept bf16 and the forward computes in bf16: logits match the float64
  reference on the same (bf16-rounded) weights to 3% of the logit scale."""
  s = _spec(dtype="bfloat16", shards=2, qkv_bias=True, o_bias=True)
  sd = _random_state_dict(s)
  params, cfg = llama.load_hf_checkpoint(_write(tmp_path / "bf16", s, sd))
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  ref = _reference_logits(sd, s, IDS)
  np.testing.assert_allclose(_logits(params, cfg), ref, atol=0.03 * np.abs(ref).max())
  # fp32 LoRA factors on the bf16 base: the factored forward and the gradient run.
  adapter = lj.lora(rank=2, targets=r"layers/layer_\d+/attention/(q_proj|v_proj)/kernel")
  base, state = adapter.init(jax.random.key(0), params)
  assert {x.dtype for x in jax.tree.leaves(state.trainable)} == {jnp.dtype(jnp.float32)}
  loss = lambda tr: jnp.mean(llama.apply(adapter.apply(base, state._replace(trainable=tr)),
                                         jnp.asarray(IDS)[None], cfg).astype(jnp.float32) ** 2)
  grads = jax.jit(jax.grad(loss))(state.trainable)
  leaves = jax.tree.leaves(grads)
  assert all(g.dtype == jnp.float32 and np.isfinite(g).all() for g in leaves)
  assert any(np.abs(g).max() > 0 for g in leaves)
  # The merged bf16 model saves bf16 and reloads bit for bit.
  merged = lj.merge(adapter.apply(base, state))
  llama.save_hf_checkpoint(merged, cfg, tmp_path / "saved", max_shard_size="10KB")
  assert json.loads((tmp_path / "saved" / "config.json").read_text())["torch_dtype"] == "bfloat16"
  back, back_cfg = llama.load_hf_checkpoint(tmp_path / "saved")
  assert back_cfg == cfg
  jax.tree.map(np.testing.assert_array_equal, back, merged)


def _randomized(state, key):
  """Non-zero B factors (LoRA's init has B = 0, so merging would change nothing)."""
  leaves, treedef = jax.tree.flatten(state.trainable)
  keys = jax.random.split(key, len(leaves))
  leaves = [0.1 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  return state._replace(trainable=jax.tree.unflatten(treedef, leaves))


@pytest.mark.parametrize("case", ["qwen2_qkv_bias_tied", "llama_attention_and_mlp_bias"])
def test_merged_adapted_model_saves_and_reloads_to_identical_logits(tmp_path, case):
  s = _spec(**CASES[case])
  params, cfg = llama.load_hf_checkpoint(_write(tmp_path / "in", s, _random_state_dict(s)))
  adapter = lj.lora(rank=2, targets=r".*/kernel")
  base, state = adapter.init(jax.random.key(1), params)
  state = _randomized(state, jax.random.key(2))
  adapted = adapter.apply(base, state)
  merged = lj.merge(adapted)
  assert not np.allclose(_logits(merged, cfg), _logits(params, cfg), atol=1e-3)
  np.testing.assert_allclose(_logits(merged, cfg), _logits(adapted, cfg), rtol=1e-5, atol=1e-5)
  llama.save_hf_checkpoint(merged, cfg, tmp_path / "out", max_shard_size=4000)
  assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
  back, back_cfg = llama.load_hf_checkpoint(tmp_path / "out")
  assert back_cfg == cfg
  np.testing.assert_array_equal(_logits(back, back_cfg), _logits(merged, cfg))
  with pytest.raises(TypeError, match="merge"):
    llama.save_hf_checkpoint(adapted, cfg, tmp_path / "structured")


def test_save_round_trip_config_switches(tmp_path):
  cfg = llama.LlamaConfig(vocab_size=40, hidden_size=24, intermediate_size=32, head_dim=8,
                          num_heads=4, num_kv_heads=1, qkv_bias=True, o_bias=True, mlp_bias=True,
                          tie_word_embeddings=True, rope_theta=5e5, rope_scaling=LLAMA3)
  params = _init(jax.random.key(0), cfg, jnp.bfloat16)
  assert "lm_head" not in params
  assert params["layers"]["layer_0"]["mlp"]["up_proj"]["bias"].shape == (32,)
  assert not params["layers"]["layer_0"]["attention"]["o_proj"]["bias"].any()  # zero-init
  llama.save_hf_checkpoint(params, cfg, tmp_path, max_shard_size=3000)
  assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
  llama.save_hf_checkpoint(params, cfg, tmp_path)  # one file replaces the shards and their index
  assert sorted(f.name for f in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
  back, back_cfg = llama.load_hf_checkpoint(tmp_path)
  assert back_cfg == cfg and back_cfg.rope_scaling == llama.RopeScaling(**LLAMA3)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  assert llama.load_hf_checkpoint(tmp_path, dtype=jnp.float32)[0]["embed"]["embedding"].dtype == (
      jnp.float32)


def _bad_config(**changes):
  c = _hf_config(_spec())
  c.update(changes)
  return {k: v for k, v in c.items() if v is not Ellipsis}


@pytest.mark.parametrize("config, match", [
    (_bad_config(quantization_config={"bits": 4}), "quantization_config"),
    (_bad_config(model_type="gpt2"), "model_type"),
    (_bad_config(hidden_act="gelu"), "hidden_act"),
    (_bad_config(attention_dropout=0.1), "attention_dropout"),
    (_bad_config(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_type='yarn'"),
    (_bad_config(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "low_freq_factor"),
    (_bad_config(rope_parameters={"rope_theta": 5e5, "rope_type": "default"}), "rope_theta"),
    (_bad_config(vocab_size=Ellipsis), "vocab_size"),
    (dict(_bad_config(model_type="mistral", attention_bias=Ellipsis, mlp_bias=Ellipsis,
                      pretraining_tp=Ellipsis), sliding_window=16), "sliding_window=16"),
    (dict(_bad_config(model_type="qwen2", attention_bias=Ellipsis, mlp_bias=Ellipsis),
          use_sliding_window=True, sliding_window=16), "use_sliding_window"),
    (dict(_bad_config(model_type="qwen2", attention_bias=Ellipsis, mlp_bias=Ellipsis),
          layer_types=["full_attention", "sliding_attention"], sliding_window=16), "layer_types"),
    (_bad_config(sliding_window=4096), r"\['sliding_window'\]"),  # not a Llama key
])
def test_config_keys_that_cannot_be_honoured_are_refused_by_name(config, match):
  with pytest.raises(ValueError, match=match):
    llama.config_from_hf(config)


def test_harmless_and_default_keys():
  c = _bad_config(max_length=20, _name_or_path="x", rope_scaling=None, sliding_window=Ellipsis)
  assert llama.config_from_hf(c).rope_scaling is None
  v5 = _bad_config(rope_theta=Ellipsis, rope_scaling=Ellipsis,
                   rope_parameters={"rope_type": "default", "rope_theta": 5e5})
  assert llama.config_from_hf(v5).rope_theta == 5e5  # not the 4.x default 1e4
  qwen = _bad_config(model_type="qwen2", attention_bias=Ellipsis, mlp_bias=Ellipsis,
                     pretraining_tp=Ellipsis, layer_types=["full_attention"] * 2)
  cfg = llama.config_from_hf(qwen)
  assert cfg.qkv_bias and not cfg.o_bias and not cfg.mlp_bias
  # A Mistral window at least as long as the model's context changes nothing.
  mistral = dict(_bad_config(model_type="mistral", attention_bias=Ellipsis, mlp_bias=Ellipsis),
                 sliding_window=128)
  assert llama.config_from_hf(mistral).max_position_embeddings == 128


def _broken(tmp_path, edit, **overrides):
  s = _spec(**overrides)
  sd = _random_state_dict(s)
  edit(sd)
  return _write(tmp_path / "ckpt", s, sd)


@pytest.mark.parametrize("edit, overrides, match", [
    (lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"), {},
     r"missing tensors: \['model.layers.1.mlp.up_proj.weight'\]"),
    (lambda sd: sd.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(32)}), {},
     "unexpected tensor model.layers.0.self_attn.q_proj.bias"),
    (lambda sd: sd.update({"model.layers.1.self_attn.k_proj.weight": np.zeros((32, 32))}), {},
     r"model.layers.1.self_attn.k_proj.weight has shape \(32, 32\), the config needs \(16, 32\)"),
    (lambda sd: sd.update({"lm_head.weight": np.ones((50, 32))}), {"tie": True},
     "lm_head.weight differs"),
    (lambda sd: sd.update({"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4)}), {},
     "rotary_emb.inv_freq does not match"),
])
def test_tensors_missing_extra_or_misshapen_fail_by_name(tmp_path, edit, overrides, match):
  with pytest.raises(ValueError, match=match):
    llama.load_hf_checkpoint(_broken(tmp_path, edit, shards=2, **overrides))


def test_stored_rope_buffer_is_consumed_when_it_matches(tmp_path):
  inv = np.array([10000.0 ** (-2 * i / 8) for i in range(4)])
  path = _broken(tmp_path, lambda sd: sd.update(
      {"model.layers.0.self_attn.rotary_emb.inv_freq": inv}))
  assert "rotary_emb" not in str(jax.tree_util.tree_structure(llama.load_hf_checkpoint(path)[0]))


def test_bad_directories(tmp_path):
  with pytest.raises(FileNotFoundError, match="no config.json"):
    llama.load_hf_checkpoint(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(_bad_config(rope_scaling={"type": "dynamic",
                                                                             "factor": 2.0})))
  with pytest.raises(ValueError, match=r"config.json: rope_type='dynamic' is not supported"):
    llama.load_hf_checkpoint(tmp_path)
  (tmp_path / "config.json").unlink()
  path = _broken(tmp_path, lambda sd: None, shards=2)
  (path / "model-00002-of-00002.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
    llama.load_hf_checkpoint(path)
  index = json.loads((path / "model.safetensors.index.json").read_text())
  index["weight_map"]["model.layers.0.mlp.up_proj.weight"] = "model-00002-of-00002.safetensors"
  (path / "model.safetensors.index.json").write_text(json.dumps(index))
  safetensors.numpy.save_file({"model.norm.weight": np.ones(32, np.float32)},
                              str(path / "model-00002-of-00002.safetensors"))
  with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj.weight"):
    llama.load_hf_checkpoint(path)
  params = _init(jax.random.key(0), llama.LlamaConfig.preset("tiny"), jnp.float32)
  with pytest.raises(ValueError, match="max_shard_size"):
    llama.save_hf_checkpoint(params, llama.LlamaConfig.preset("tiny"), tmp_path / "o",
                             max_shard_size="lots")
  with pytest.raises(ValueError, match="extra leaves"):
    llama.save_hf_checkpoint(params, dataclasses.replace(llama.LlamaConfig.preset("tiny"),
                                                         tie_word_embeddings=True), tmp_path / "o")
