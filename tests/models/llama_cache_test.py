"""Llama KV cache and segment ids: a cached prefill + decode gives the logits of the uncached full
forward (dense, factored LoRA and merged params; padded rows), and a packed row gives each example
the logits it has when run alone."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax import testing
from lowrank_jax.models import llama

pytestmark = pytest.mark.usefixtures("fast_compile")

CFG = llama.LlamaConfig.preset("tiny")
_apply = jax.jit(llama.apply, static_argnums=2)  # eager dispatch is slow on 2 cores
_apply_cached = jax.jit(llama.apply, static_argnums=2)


def sharp_params(key=jax.random.key(0), cfg=CFG) -> dict:
  """Random params with kernels of std 1/sqrt(d_in) (init's 0.02 gives near-uniform attention and
  logits, which would hide position or mask errors)."""
  params = llama.init(key, cfg)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x / (0.02 * np.sqrt(x.shape[0])) if path[-1].key == "kernel" else x, params)


def lora_params(params: dict) -> dict:
  """`params` adapted by a LoRA with non-zero factors on q, v, gate and the LM head: structured
  (factored) weights."""
  adapter = lj.lora(rank=4, alpha=8, targets=r"lm_head/kernel|.*/(q_proj|v_proj|gate_proj)/kernel")
  base, state = adapter.init(jax.random.key(1), params)
  return adapter.apply(base, testing.perturb(state, jax.random.key(2), scale=0.1))


def _cached_logits(params, ids, chunks, positions=None, segment_ids=None, max_len=16):
  """Feeds `ids` (B, T) through the cache in chunks of the given lengths; concatenated logits.

  Positions default to 0..T-1 and segment ids to ones, always passed, so that every call shares
  one compiled program per chunk length."""
  b, t = ids.shape
  positions = jnp.broadcast_to(jnp.arange(t), (b, t)) if positions is None else positions
  segment_ids = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
  cache = llama.init_cache(CFG, b, max_len)
  outs, start = [], 0
  for n in chunks:
    sl = slice(start, start + n)
    logits, cache = _apply_cached(params, ids[:, sl], CFG, positions=positions[:, sl],
                                  segment_ids=segment_ids[:, sl], cache=cache)
    outs.append(logits)
    start += n
  assert int(cache["index"]) == t
  return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize("kind", ["dense", "lora", "merged"])
def test_cached_prefill_and_decode_match_full_forward(kind):
  params = sharp_params()
  if kind != "dense":
    params = lora_params(params)
    assert isinstance(params["layers"]["layer_0"]["attention"]["q_proj"]["kernel"], lj.LowRank)
  if kind == "merged":
    params = lj.merge(params)
  ids = jax.random.randint(jax.random.key(3), (2, 10), 0, CFG.vocab_size)
  full = _apply(params, ids, CFG)
  # Prefill 5 tokens, then a chunk of 2, then one token at a time.
  cached = _cached_logits(params, ids, [5, 2, 1, 1, 1])
  np.testing.assert_allclose(cached, full, rtol=1e-5, atol=1e-5)
  assert float(jnp.std(full)) > 0.5     # logits far from uniform: the comparison has teeth
  if kind == "dense":   # ... and can fail: decoding at a wrong RoPE position changes the logits
    wrong = _cached_logits(params, ids, [5, 2, 1, 1, 1],
                           positions=jnp.broadcast_to(jnp.arange(10), (2, 10)).at[:, 8].set(7))
    np.testing.assert_allclose(wrong[:, :8], full[:, :8], rtol=1e-5, atol=1e-5)
    assert np.abs(wrong[:, 8] - full[:, 8]).max() > 1e-2


def test_cached_padded_rows_match_unpadded():
  """Row 0 left-padded, row 1 right-padded (padding = segment 0); each row's real tokens get the
  logits of that row run alone without padding, through prefill and decode."""
  params = sharp_params()
  ids = jax.random.randint(jax.random.key(4), (2, 10), 1, CFG.vocab_size)
  a, b = ids[0], ids[1]
  ref = _apply(params, ids, CFG)   # each row alone: no padding, nothing shared across rows
  # Prompts a[:3] (left-padded by 2) and b[:2] (right-padded by 3), then a[3:] and b[2:], one
  # token per step; the row's positions count its real tokens.
  prompt = jnp.stack([jnp.concatenate([jnp.zeros(2, jnp.int32), a[:3]]),
                      jnp.concatenate([b[:2], jnp.zeros(3, jnp.int32)])])
  seg = jnp.array([[0, 0, 1, 1, 1], [1, 1, 0, 0, 0]])
  steps = 5
  fed = jnp.concatenate([prompt, jnp.stack([a[3:3 + steps], b[2:2 + steps]])], axis=1)
  seg = jnp.concatenate([seg, jnp.ones((2, steps), jnp.int32)], axis=1)
  pos = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)
  out = _cached_logits(params, fed, [5, 2, 1, 1, 1], positions=pos, segment_ids=seg)
  real_a, real_b = out[0][np.asarray(seg[0]) == 1], out[1][np.asarray(seg[1]) == 1]
  np.testing.assert_allclose(real_a, ref[0, :3 + steps], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(real_b, ref[1, :2 + steps], rtol=1e-5, atol=1e-5)


def test_packed_row_equals_examples_run_alone():
  """Three examples and two padding tokens in one row: segment ids 1, 2, 3, 0 and positions
  restarting per example give each example its own logits (float64, to 1e-6)."""
  lengths = (3, 5, 4)
  with testing.enable_x64():
    params = jax.tree.map(lambda x: x.astype(jnp.float64), sharp_params())
    alone_batch = jax.random.randint(jax.random.key(10), (3, 5), 1, CFG.vocab_size)
    ones = jnp.ones((3, 5), jnp.int32)
    # Example i is alone_batch[i, :n]; trailing tokens of its row cannot reach it (causal).
    alone = _apply(params, alone_batch, CFG, positions=jnp.cumsum(ones, 1) - 1, segment_ids=ones)
    examples = [alone_batch[i, :n] for i, n in enumerate(lengths)]
    row = jnp.concatenate(examples + [jnp.zeros(2, jnp.int32)])[None]
    seg = jnp.concatenate([jnp.full(n, i + 1) for i, n in enumerate(lengths)]
                          + [jnp.zeros(2, jnp.int32)])[None]
    pos = jnp.concatenate([jnp.arange(n) for n in lengths] + [jnp.arange(2)])[None]
    packed = _apply(params, row, CFG, positions=pos, segment_ids=seg)
    assert packed.dtype == jnp.float64 and np.isfinite(packed).all()
    start = 0
    for i, n in enumerate(lengths):
      np.testing.assert_allclose(packed[0, start:start + n], alone[i, :n], rtol=1e-6, atol=1e-6)
      start += n
    # One segment for the whole row: the second example attends the first; other logits.
    unsegmented = _apply(params, row, CFG, positions=pos, segment_ids=jnp.ones_like(seg))
    assert np.abs(unsegmented[0, 3:8] - packed[0, 3:8]).max() > 1e-2


def test_init_cache_layout_and_errors():
  cache = llama.init_cache(CFG, 3, 7, jnp.bfloat16)
  k = cache["layers"]["layer_1"]["k"]
  assert k.shape == (3, 7, CFG.num_kv_heads, CFG.dim_per_head) and k.dtype == jnp.bfloat16
  assert cache["segment_ids"].shape == (3, 7) and int(cache["index"]) == 0
  assert sorted(cache["layers"]) == ["layer_0", "layer_1"]
  params = jax.eval_shape(lambda k: llama.init(k, CFG), jax.random.key(0))
  logits, new = jax.eval_shape(lambda p, c: llama.apply(p, jnp.ones((3, 2), jnp.int32), CFG,
                                                        cache=c), params, cache)
  assert logits.shape == (3, 2, CFG.vocab_size) and logits.dtype == jnp.float32
  assert new["layers"]["layer_0"]["v"].dtype == jnp.bfloat16
  assert jax.tree.structure(new) == jax.tree.structure(cache)
  for bad in (0, -1, 2.0, True):
    with pytest.raises(ValueError, match="max_len must be a positive integer"):
      llama.init_cache(CFG, 1, bad)
  with pytest.raises(ValueError, match="batch must be a positive integer"):
    llama.init_cache(CFG, 0, 4)
  with pytest.raises(ValueError, match="9 tokens do not fit a cache of 7 slots"):
    jax.eval_shape(lambda p: llama.apply(p, jnp.ones((3, 9), jnp.int32), CFG, cache=cache), params)
