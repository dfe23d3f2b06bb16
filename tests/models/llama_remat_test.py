"""Llama precision and memory switches: per-layer remat gives the loss and gradients of the plain
step; a bf16 compute dtype stays within bf16 tolerance of float32 while the adapter and its
gradients stay float32 (an AdamW step on an NF4 base: tests/bench_llm_test.py)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax import tasks
from lowrank_jax.models import llama

CFG = dataclasses.replace(llama.LlamaConfig.preset("tiny"), dropout_rate=0.1)
TARGETS = r"layers/layer_\d+/(attention|mlp)/\w+_proj/kernel"
IDS = jax.random.randint(jax.random.key(1), (2, 8), 0, CFG.vocab_size)
BATCH = {"input_ids": IDS, "loss_mask": jnp.ones(IDS.shape, jnp.float32),
         "segment_ids": jnp.ones(IDS.shape, jnp.int32)}


def _setup(param_dtype=jnp.float32):
  params = llama.init(jax.random.key(0), CFG, dtype=param_dtype)
  adapter = lj.lora(rank=4, targets=TARGETS)
  base, state = adapter.init(jax.random.key(2), params)
  # Nonzero B, so that every factor has a gradient.
  trainable = jax.tree.map(lambda v: v + 0.01, state.trainable)
  return adapter, base, lj.with_trainable(state, trainable)


def _loss_fn(adapter, base, state, cfg):
  def loss(trainable, rng):
    p = adapter.apply(base, lj.with_trainable(state, trainable))
    logits = llama.causal_lm_logits(p, cfg, BATCH, deterministic=rng is None, rng=rng)
    return tasks.get_task("causal_lm").loss(logits, BATCH)[0]
  return jax.jit(jax.value_and_grad(loss))


def test_remat_gives_equal_loss_and_grads(fast_compile):
  adapter, base, state = _setup()
  ref_loss, ref_grads = _loss_fn(adapter, base, state, CFG)(state.trainable, jax.random.key(3))
  for remat, layers in [("nothing_saveable", None), ("dots_with_no_batch_dims_saveable", (1,))]:
    cfg = dataclasses.replace(CFG, remat=remat, remat_layers=layers)
    fn = _loss_fn(adapter, base, state, cfg)
    jaxpr = str(jax.make_jaxpr(fn)(state.trainable, jax.random.key(3)))
    assert jaxpr.count("checkpoint[") + jaxpr.count("remat") >= 1, remat
    loss, grads = fn(state.trainable, jax.random.key(3))
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-6, atol=1e-7)


def test_bf16_compute_within_bf16_tolerance_of_float32(fast_compile):
  adapter, base, state = _setup()
  ref_loss, ref_grads = _loss_fn(adapter, base, state, CFG)(state.trainable, None)
  cfg = dataclasses.replace(CFG, compute_dtype="bfloat16")
  loss, grads = _loss_fn(adapter, base, state, cfg)(state.trainable, None)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=2e-2)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=0,
                               atol=0.05 * float(jnp.abs(r).max()))
  logits = llama.apply(lj.merge(adapter.apply(base, state)), IDS, cfg)
  assert logits.dtype == jnp.bfloat16


def test_bad_precision_fields_are_refused():
  with pytest.raises(ValueError, match="LlamaConfig.remat='full' is not valid"):
    llama.LlamaConfig(remat="full")
  with pytest.raises(ValueError, match="LlamaConfig.compute_dtype='bf16' is not valid"):
    llama.LlamaConfig(compute_dtype="bf16")
  with pytest.raises(ValueError, match=r"remat_layers=\(2,\): valid entries are layer indices "
                                       r"0..1"):
    llama.LlamaConfig(remat_layers=(2,))
