"""Llama decoder: forward, causality, GQA, presets, and a HF-layout safetensors checkpoint load
checked against an independent numpy forward written in the PyTorch (out, in) convention."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from lowrank_jax import structured
from lowrank_jax.models import llama

CFG = llama.LlamaConfig.preset("tiny")
_apply = jax.jit(llama.apply, static_argnums=2)  # eager dispatch is slow on 2 cores


def test_forward_shapes_and_jit():
  params = llama.init(jax.random.key(0), CFG)
  ids = jax.random.randint(jax.random.key(1), (2, 10), 0, CFG.vocab_size)
  logits = _apply(params, ids, CFG)
  assert logits.shape == (2, 10, CFG.vocab_size) and logits.dtype == jnp.float32
  assert params["layers"]["layer_0"]["attention"]["k_proj"]["kernel"].shape == (64, 32)  # GQA


def test_causality():
  params = llama.init(jax.random.key(0), CFG)
  ids = jax.random.randint(jax.random.key(1), (1, 12), 0, CFG.vocab_size)
  ids2 = ids.at[0, 7:].set((ids[0, 7:] + 5) % CFG.vocab_size)
  a, b = _apply(params, ids, CFG), _apply(params, ids2, CFG)
  np.testing.assert_allclose(a[0, :7], b[0, :7], atol=1e-5)
  assert not np.allclose(a[0, 7:], b[0, 7:], atol=1e-3)


def test_left_padding_mask():
  params = llama.init(jax.random.key(0), CFG)
  ids = jax.random.randint(jax.random.key(1), (1, 6), 0, CFG.vocab_size)
  ref = _apply(params, ids, CFG)
  padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), ids], axis=1)
  mask = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
  pos = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  out = _apply(params, padded, CFG, positions=pos, attention_mask=mask)
  np.testing.assert_allclose(out[:, 3:], ref, atol=1e-4)


def test_presets_param_counts():
  assert llama.num_params(llama.LlamaConfig.preset("tinyllama_1_1b")) == 1_100_048_384
  assert llama.num_params(llama.LlamaConfig.preset("llama2_7b")) == 6_738_415_616
  with pytest.raises(ValueError, match="valid values"):
    llama.LlamaConfig.preset("llama_70b")
  with pytest.raises(ValueError, match="num_kv_heads"):
    llama.LlamaConfig(num_heads=4, num_kv_heads=3)


def _np_reference(sd, cfg, ids):
  """Plain numpy Llama forward on a HF state dict (weights (out, in); y = x @ W.T)."""
  def rms(x, w):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.rms_norm_eps) * w

  hd = cfg.hidden_size // cfg.num_heads
  t = ids.shape[0]
  inv = 1.0 / cfg.rope_theta ** (np.arange(0, hd, 2) / hd)
  ang = np.arange(t)[:, None] * inv[None]
  cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

  def rot(x):  # x (heads, t, hd)
    x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
    return x * cos + np.concatenate([-x2, x1], -1) * sin

  x = sd["model.embed_tokens.weight"][ids]
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    h = rms(x, sd[p + "input_layernorm.weight"])
    q = (h @ sd[p + "self_attn.q_proj.weight"].T).reshape(t, cfg.num_heads, hd).transpose(1, 0, 2)
    k = (h @ sd[p + "self_attn.k_proj.weight"].T).reshape(t, cfg.num_kv_heads, hd).transpose(1, 0, 2)
    v = (h @ sd[p + "self_attn.v_proj.weight"].T).reshape(t, cfg.num_kv_heads, hd).transpose(1, 0, 2)
    q, k = rot(q), rot(k)
    rep = cfg.num_heads // cfg.num_kv_heads
    k, v = np.repeat(k, rep, 0), np.repeat(v, rep, 0)
    s = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + np.triu(np.full((t, t), -1e30), 1)
    s = np.exp(s - s.max(-1, keepdims=True))
    o = (s / s.sum(-1, keepdims=True)) @ v
    x = x + o.transpose(1, 0, 2).reshape(t, -1) @ sd[p + "self_attn.o_proj.weight"].T
    h = rms(x, sd[p + "post_attention_layernorm.weight"])
    g, u = h @ sd[p + "mlp.gate_proj.weight"].T, h @ sd[p + "mlp.up_proj.weight"].T
    x = x + (g / (1 + np.exp(-g)) * u) @ sd[p + "mlp.down_proj.weight"].T
  return rms(x, sd["model.norm.weight"]) @ sd["lm_head.weight"].T


def _write_hf_checkpoint(path, cfg, tie=False):
  """Writes config.json + sharded safetensors with HF names, (out, in) weights, float32."""
  rng = np.random.default_rng(0)
  d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.hidden_size // cfg.num_heads
  sd = {"model.embed_tokens.weight": rng.normal(size=(cfg.vocab_size, d)),
        "model.norm.weight": 1 + 0.1 * rng.normal(size=(d,))}
  if not tie:
    sd["lm_head.weight"] = 0.2 * rng.normal(size=(cfg.vocab_size, d))
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    shapes = {"self_attn.q_proj": (cfg.num_heads * hd, d), "self_attn.k_proj": (cfg.num_kv_heads * hd, d),
              "self_attn.v_proj": (cfg.num_kv_heads * hd, d), "self_attn.o_proj": (d, cfg.num_heads * hd),
              "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f)}
    for name, shape in shapes.items():
      sd[p + name + ".weight"] = rng.normal(size=shape) / np.sqrt(shape[1])
    sd[p + "input_layernorm.weight"] = 1 + 0.1 * rng.normal(size=(d,))
    sd[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.normal(size=(d,))
  sd = {k: v.astype(np.float32) for k, v in sd.items()}
  names = sorted(sd)
  half = len(names) // 2
  path.mkdir(parents=True, exist_ok=True)
  for j, part in enumerate((names[:half], names[half:])):
    safetensors.numpy.save_file({k: sd[k] for k in part},
                                str(path / f"model-0000{j + 1}-of-00002.safetensors"))
  (path / "config.json").write_text(json.dumps({
      "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
      "vocab_size": cfg.vocab_size, "hidden_size": d, "intermediate_size": f,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "rms_norm_eps": cfg.rms_norm_eps,
      "rope_theta": cfg.rope_theta, "max_position_embeddings": 128, "tie_word_embeddings": tie}))
  if tie:
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
  return sd


@pytest.mark.parametrize("tie", [False, True])
def test_hf_checkpoint_load_matches_numpy_reference(tmp_path, tie):
  cfg = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                          num_heads=4, num_kv_heads=2, max_position_embeddings=128)
  sd = _write_hf_checkpoint(tmp_path / "ckpt", cfg, tie=tie)
  params, loaded_cfg = llama.load_hf_checkpoint(tmp_path / "ckpt")
  assert loaded_cfg == dataclasses.replace(cfg, tie_word_embeddings=tie)  # tied: no lm_head param
  np.testing.assert_array_equal(params["layers"]["layer_1"]["attention"]["q_proj"]["kernel"],
                                sd["model.layers.1.self_attn.q_proj.weight"].T)
  ids = np.array([3, 17, 42, 5, 9, 63, 0, 21])
  out = _apply(params, jnp.asarray(ids)[None], loaded_cfg)[0]
  np.testing.assert_allclose(out, _np_reference(sd, cfg, ids), rtol=2e-4, atol=2e-4)


def test_save_load_round_trip_and_name_map(tmp_path):
  params = llama.init(jax.random.key(0), CFG)
  llama.save_hf_checkpoint(params, CFG, tmp_path)
  back, cfg = llama.load_hf_checkpoint(tmp_path)
  assert cfg == CFG
  jax.tree.map(np.testing.assert_array_equal, back, params)
  m = llama.hf_name_map(CFG)
  assert m["layers/layer_0/attention/q_proj"] == "model.layers.0.self_attn.q_proj"
  assert m["layers/layer_1/mlp/down_proj"] == "model.layers.1.mlp.down_proj"
  assert m["embed"] == "model.embed_tokens" and m["lm_head"] == "lm_head"
  with pytest.raises(FileNotFoundError, match="config.json"):
    llama.load_hf_checkpoint(tmp_path / "nope")


def test_structured_weight_on_q_proj():
  params = llama.init(jax.random.key(0), CFG)
  w = params["layers"]["layer_0"]["attention"]["q_proj"]["kernel"]
  lr = structured.LowRank(w, jnp.ones((64, 2)) * 0.1, jnp.ones((2, 64)) * 0.1, 1.0)
  adapted = jax.tree.map(lambda x: x, params)
  adapted["layers"]["layer_0"]["attention"]["q_proj"]["kernel"] = lr
  ids = jnp.arange(8, dtype=jnp.int32)[None]
  np.testing.assert_allclose(_apply(adapted, ids, CFG),
                             _apply(structured.merge(adapted), ids, CFG), atol=1e-4)


def test_attention_implementation_is_checked_before_any_work():
  with pytest.raises(ValueError, match=r"LlamaConfig.attention.*'flash'.*valid"):
    dataclasses.replace(CFG, attention="flash")
  with pytest.raises(ValueError, match="needs uncompressed heads"):
    dataclasses.replace(CFG, attention="cudnn", layer_v_head_dims=(8, 8))
  params = llama.init(jax.random.key(0), CFG)
  ids = jnp.zeros((1, 4), jnp.int32)
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="runs on a CUDA GPU"):
      llama.apply(params, ids, dataclasses.replace(CFG, attention="cudnn"))
  else:
    with pytest.raises(ValueError, match="bfloat16 or float16"):
      llama.apply(params, ids, dataclasses.replace(CFG, attention="cudnn"))


def test_cudnn_config_decodes_with_the_xla_formula():
  """With a KV cache the attention is XLA's whatever `attention` says: same logits as "xla"."""
  params = llama.init(jax.random.key(0), CFG)
  ids = jax.random.randint(jax.random.key(1), (1, 5), 0, CFG.vocab_size)
  outs = []
  for impl in ("xla", "cudnn"):
    cfg = dataclasses.replace(CFG, attention=impl)
    logits, _ = llama.apply(params, ids, cfg, cache=llama.init_cache(cfg, 1, 8))
    outs.append(np.asarray(logits))
  np.testing.assert_array_equal(outs[0], outs[1])
