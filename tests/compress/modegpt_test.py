"""MoDeGPT on the Llama decoder and the MiniLM encoder: exactness, sizes, RoPE, GQA, checkpoints."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax import compress
from lowrank_jax import models
from lowrank_jax.models import llama
from lowrank_jax.models import minilm

CFG = llama.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_layers=2,
                        num_heads=4, num_kv_heads=2)          # GQA: 2 query heads per kv head


def _params(cfg, seed=0):
  """Random params with weights large enough that compression changes the outputs."""
  p = llama.init(jax.random.key(seed), cfg)
  return jax.tree.map(lambda x: x * 10 if x.ndim == 2 else x, p)


def _batches(n=2, vocab=48, seed=1):
  ids = jax.random.randint(jax.random.key(seed), (n, 2, 12), 0, vocab)
  return [{"input_ids": ids[i]} for i in range(n)]


@pytest.fixture(scope="module")
def compressed():
  params = _params(CFG)
  small, small_cfg, report = compress.modegpt(params, CFG, _batches(),
                                              compress.CompressConfig(ratio=0.4))
  return params, small, small_cfg, report


def test_ratio_zero_reproduces_the_model_exactly(fast_compile):
  cfg = dataclasses.replace(CFG, qkv_bias=True, o_bias=True, mlp_bias=True)
  params = _params(cfg)
  small, small_cfg, report = compress.modegpt(params, cfg, _batches(),
                                              compress.CompressConfig(ratio=0.0))
  ids = _batches()[0]["input_ids"]
  np.testing.assert_array_equal(llama.apply(small, ids, small_cfg), llama.apply(params, ids, cfg))
  assert report["achieved_ratio"] == 0.0


def test_achieved_reduction_matches_the_target(fast_compile, compressed):
  params, small, small_cfg, report = compressed
  before = compress.block_param_count(params, CFG)
  after = sum(int(np.prod(x.shape)) for i in range(2) for name in ("attention", "mlp")
              for x in jax.tree.leaves(small["layers"][f"layer_{i}"][name]))
  assert report["block_params"] == (before, after)
  assert abs(1 - after / before - 0.4) < 0.01
  assert abs(np.mean(report["sparsity"]) - 0.4) < 1e-9


def test_gqa_shapes_follow_the_config(compressed):
  _, small, small_cfg, _ = compressed
  want = jax.eval_shape(lambda: llama.init(jax.random.key(0), small_cfg))
  assert jax.tree.map(lambda x: x.shape, small) == jax.tree.map(lambda x: x.shape, want)
  for i, (qk, vd, mlp) in enumerate(compressed[3]["sizes"]):
    a = small["layers"][f"layer_{i}"]["attention"]
    assert a["q_proj"]["kernel"].shape == (32, 4 * 2 * qk)       # qk RoPE pairs per head
    assert a["k_proj"]["kernel"].shape == (32, 2 * 2 * qk)
    assert a["v_proj"]["kernel"].shape == (32, 2 * vd)
    assert a["o_proj"]["kernel"].shape == (4 * vd, 32)
    assert len(small_cfg.layer_qk_freqs[i]) == 2                  # one selection per kv group
    assert small_cfg.layer_intermediate_sizes[i] == mlp


def test_compressed_model_decodes_with_its_cache(fast_compile, compressed):
  _, small, small_cfg, _ = compressed

  @jax.jit
  def run(p, ids):
    cache = llama.init_cache(small_cfg, 2, 12)
    first, cache = llama.apply(p, ids[:, :8], small_cfg, cache=cache)
    step, _ = llama.apply(p, ids[:, 8:9], small_cfg, cache=cache)
    return llama.apply(p, ids, small_cfg), first, step

  full, first, step = run(small, _batches()[0]["input_ids"])
  np.testing.assert_allclose(first, full[:, :8], atol=1e-4)
  np.testing.assert_allclose(step[:, 0], full[:, 8], atol=1e-4)


def test_kept_everything_rope_selection_equals_the_original():
  """Every RoPE pair kept, in another order per kv head: the rotary structure survives."""
  params = _params(CFG)
  half, hd = 4, 8
  orders = (((2, 0, 3, 1), (1, 3, 0, 2)), ((3, 2, 1, 0), (0, 1, 2, 3)))
  cfg2 = dataclasses.replace(CFG, layer_qk_freqs=orders)
  p2 = jax.tree.map(lambda x: x, params)
  for i, layer_orders in enumerate(orders):
    a = p2["layers"][f"layer_{i}"]["attention"]
    dims = [np.concatenate([np.array(o), np.array(o) + half]) for o in layer_orders]
    k_cols = np.concatenate([g * hd + dims[g] for g in range(2)])
    q_cols = np.concatenate([h * hd + dims[h // 2] for h in range(4)])
    a["q_proj"]["kernel"] = a["q_proj"]["kernel"][:, q_cols]
    a["k_proj"]["kernel"] = a["k_proj"]["kernel"][:, k_cols]
  ids = _batches()[0]["input_ids"]
  np.testing.assert_allclose(llama.apply(p2, ids, cfg2), llama.apply(params, ids, CFG),
                             rtol=1e-5, atol=1e-5)


def test_modegpt_beats_svd_at_equal_size_on_calibration_data(compressed):
  params, small, small_cfg, _ = compressed
  svd, _ = compress.svd_baseline(params, CFG, 0.4)
  ids = _batches()[0]["input_ids"]
  ref = llama.apply(params, ids, CFG)
  err = lambda p, c: float(jnp.mean((llama.apply(p, ids, c) - ref) ** 2))
  assert 0 < err(small, small_cfg) < err(svd, CFG)


def test_checkpoint_round_trip_records_sizes_and_refuses_a_mismatch(tmp_path, compressed):
  _, small, small_cfg, _ = compressed
  llama.save_hf_checkpoint(small, small_cfg, tmp_path)
  hf = json.loads((tmp_path / "config.json").read_text())
  assert hf["layer_intermediate_sizes"] == list(small_cfg.layer_intermediate_sizes)
  # The trainer's loader (`model.checkpoint`) reads it like any checkpoint.
  params2, spec = models.get_model("llama_tiny").load_checkpoint(str(tmp_path))
  assert spec.config == small_cfg
  ids = _batches()[0]["input_ids"]
  np.testing.assert_array_equal(llama.apply(params2, ids, spec.config),
                                llama.apply(small, ids, small_cfg))
  hf["layer_v_head_dims"] = [hf["layer_v_head_dims"][0] + 1] * 2
  (tmp_path / "config.json").write_text(json.dumps(hf))
  with pytest.raises(ValueError, match=r"v_proj.weight has shape .* the config needs"):
    llama.load_hf_checkpoint(tmp_path)


def test_minilm_ratio_zero_is_exact_and_compression_hits_the_target(fast_compile):
  cfg = dataclasses.replace(minilm.MiniLMConfig.tiny(), vocab_size=64, dropout_rate=0.0,
                            attention_dropout_rate=0.0)
  params = jax.tree.map(lambda x: x * 10 if x.ndim == 2 else x,
                        minilm.init(jax.random.key(0), cfg))
  ids = jax.random.randint(jax.random.key(1), (2, 4, 10), 1, 64)
  mask = jnp.ones((4, 10), jnp.int32).at[0, 7:].set(0)
  batches = [{"input_ids": ids[i], "attention_mask": mask} for i in range(2)]
  same, same_cfg, _ = compress.modegpt(params, cfg, batches, compress.CompressConfig(ratio=0.0))
  np.testing.assert_array_equal(minilm.encode(same, same_cfg, ids[0], mask),
                                minilm.encode(params, cfg, ids[0], mask))
  small, small_cfg, report = compress.modegpt(params, cfg, batches,
                                              compress.CompressConfig(ratio=0.3))
  assert abs(report["achieved_ratio"] - 0.3) < 0.01
  want = jax.eval_shape(lambda: minilm.init(jax.random.key(0), small_cfg))
  assert jax.tree.map(lambda x: x.shape, small) == jax.tree.map(lambda x: x.shape, want)
  out = minilm.encode(small, small_cfg, ids[0], mask)
  assert out.shape == (4, 10, 64) and bool(jnp.all(jnp.isfinite(out)))


@pytest.mark.parametrize("kw,match", [
    (dict(ratio=0.9), r"CompressConfig.ratio must be in \[0, cap=0.8\]"),
    (dict(ratio=-0.1), "CompressConfig.ratio must be in"),
    (dict(cap=1.5), r"CompressConfig.cap must be in \(0, 1\)"),
    (dict(allocation="greedy"), "allocation"),
    (dict(vo_ridge=0.0), "CompressConfig.vo_ridge must be > 0")])
def test_bad_compress_config_is_refused(kw, match):
  with pytest.raises(ValueError, match=match):
    compress.CompressConfig(**kw)


def test_bad_models_are_refused(compressed):
  _, small, small_cfg, _ = compressed
  qwen2 = dataclasses.replace(CFG, qkv_bias=True)
  with pytest.raises(ValueError, match="value bias without an output-projection bias"):
    compress.modegpt(llama.init(jax.random.key(0), qwen2), qwen2, _batches())
  with pytest.raises(ValueError, match="already has per-layer sizes"):
    compress.modegpt(small, small_cfg, _batches())
  with pytest.raises(TypeError, match="LlamaConfig or a minilm.MiniLMConfig"):
    compress.modegpt({}, object(), _batches())
  with pytest.raises(ValueError, match="no calibration batch"):
    compress.modegpt(_params(CFG), CFG, [])


@pytest.mark.parametrize("field,value,match", [
    ("layer_intermediate_sizes", (8,), "one entry per layer"),
    ("layer_v_head_dims", (0, 4), "must be positive"),
    ("layer_qk_freqs", (((0,), (1,)), ((0, 1), (2,))), "one length"),
    ("layer_qk_freqs", (((0,), (4,)), ((0,), (1,))), r"in \[0, head_dim // 2 = 4\)")])
def test_bad_per_layer_sizes_are_refused(field, value, match):
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(CFG, **{field: value})


def test_bad_minilm_per_layer_sizes_are_refused():
  with pytest.raises(ValueError, match="layer_qk_head_dims must hold one positive size per layer"):
    dataclasses.replace(minilm.MiniLMConfig.tiny(), layer_qk_head_dims=(4,))
