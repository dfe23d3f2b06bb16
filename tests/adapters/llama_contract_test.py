"""The adapter contract on the Llama decoder, for every registered method, with the causal-LM loss.

Each method (every name in `lowrank_jax.registry` but the frozen-base "none") is built the way a
run builds it, from its facts (`registry.configured_adapter` at rank 2 on all seven linear
projections of every layer), with calibration statistics from `lowrank_jax.calibrate.collect`
when it needs them, on a tiny random Llama (one layer, grouped-query attention), and checked:

  (a) at init the adapted model's logits equal the base model's (every method starts at the
      identity: residual inits such as PiSSA, LoLDU, SORSA and CorDA rebuild the base weight);
  (b) on a perturbed state the factored logits equal those of the merged (`lj.merge`) params, and
      differ from the base model's (the state is not ignored);
  (c) a few `steps.make_train_step` steps with the `tasks.CausalLM` loss on one fixed batch lower
      its cross-entropy;
  (d) those steps leave the base params and (for methods without `adapter.update`) the frozen
      buffers bitwise unchanged, and move the trainable state.

A method that cannot be built, initialised or trained on the decoder fails here; none is skipped.
Each method compiles one function (the three forwards and the scanned train steps together).

The model is `llama_tiny` (hidden 64, MLP 128, 4 query heads over 2 key/value heads) cut to one
layer, with head dim 32 instead of 16: DiffuseKronA's registry factors (a1, a2) = (64, 8) must
divide every kernel's output and input sizes, and with head dim 16 the key/value projections have
32 outputs. Every Llama shape of the benchmarks (TinyLlama, Llama-2) has all sizes divisible by 64.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_jax as lj
from lowrank_jax import calibrate
from lowrank_jax import models
from lowrank_jax import registry
from lowrank_jax import steps
from lowrank_jax import tasks
from lowrank_jax import testing

LINEAR = r"layers/layer_\d+/(attention|mlp)/\w+_proj/kernel"
RANK, BATCH, SEQ, TRAIN_STEPS, LR = 2, 2, 8, 5, 1e-2
METHODS = [m for m in registry.list_methods() if m != "none"]
TASK = tasks.get_task("causal_lm")
TOL = 1e-5   # float32 logits of O(1)


@functools.cache
def _setting():
  spec = models.get_model("llama_tiny").with_config(num_layers=1, head_dim=32)
  params = spec.init(jax.random.key(0))
  ids = np.random.default_rng(0).integers(0, spec.config.vocab_size, (BATCH, SEQ))
  batch = {"input_ids": jnp.asarray(ids, jnp.int32),
           "loss_mask": jnp.ones((BATCH, SEQ), jnp.float32),
           "segment_ids": jnp.ones((BATCH, SEQ), jnp.int32)}
  base_logits = jax.jit(spec.lm_logits)(params, batch)
  return spec, params, batch, base_logits


@functools.cache
def _run(method: str) -> dict:
  """Everything the four checks read, for `method` (built, initialised and trained once)."""
  spec, params, batch, _ = _setting()
  adapter = registry.configured_adapter(method, RANK, LINEAR, total_steps=TRAIN_STEPS)
  stats = None
  if registry.needs_stats(method):
    stats = calibrate.collect(spec.lm_logits, params, [batch], LINEAR,
                              sample_scale=registry.facts(method).stats_sample_scale)
  base, state = adapter.init(jax.random.key(1), params, stats)
  snapshot = {"base": jax.tree.map(np.array, base),
              "frozen": jax.tree.map(np.array, state.frozen),
              "trainable": jax.tree.map(np.array, state.trainable)}
  perturbed = testing.perturb(state, jax.random.key(2), scale=0.1)
  optimizer = optax.adam(LR)
  train_step = steps.make_train_step(
      adapter, lambda p, b, rng: TASK.loss(spec.lm_logits(p, b), b), optimizer)

  @jax.jit
  def run(base, state, perturbed, train_state):
    logits = lambda p: spec.lm_logits(p, batch)
    adapted = adapter.apply(base, perturbed)

    def body(ts, _):
      ts, metrics = train_step(ts, base, batch)
      return ts, metrics["ce"]
    train_state, ce = jax.lax.scan(body, train_state, None, length=TRAIN_STEPS)
    return {"init": logits(adapter.apply(base, state)), "factored": logits(adapted),
            "merged": logits(lj.merge(adapted)), "ce": ce, "train_state": train_state}

  out = run(base, state, perturbed, steps.init_train_state(state, optimizer))
  return {**jax.tree.map(np.asarray, out), "base": base, "snapshot": snapshot,
          "has_update": adapter.update is not None}


def test_every_registered_method_is_walked():
  assert METHODS and set(METHODS) == set(registry.list_methods()) - {"none"}


@pytest.mark.parametrize("method", METHODS)
def test_identity_at_init(method):
  base_logits = np.asarray(_setting()[3])
  np.testing.assert_allclose(_run(method)["init"], base_logits, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("method", METHODS)
def test_factored_equals_merged(method):
  r = _run(method)
  np.testing.assert_allclose(r["factored"], r["merged"], atol=TOL, rtol=TOL)
  moved = np.max(np.abs(r["factored"] - np.asarray(_setting()[3])))
  assert moved > 1e-2, f"{method}: a perturbed state changes the logits by only {moved:.2e}"


@pytest.mark.parametrize("method", METHODS)
def test_train_steps_lower_the_loss(method):
  ce = _run(method)["ce"]
  assert np.all(np.isfinite(ce)), ce
  # Falls at every step, in all by 1e-4 nats: ~200 float32 ulps at this loss, and below the
  # slowest starter's fall (AdaLoRA, whose singular values start at zero: ~2e-3 here).
  assert np.all(np.diff(ce) < 0) and ce[-1] < ce[0] - 1e-4, f"{method}: cross-entropy {ce}"


@pytest.mark.parametrize("method", METHODS)
def test_only_adapter_state_changes(method):
  r = _run(method)
  snap, ts = r["snapshot"], r["train_state"]
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, r["base"]), snap["base"])
  assert ts["head"] == {}
  if not r["has_update"]:   # rank growth / pruning may rewrite frozen buffers (masks, scores)
    jax.tree.map(np.testing.assert_array_equal, ts["frozen"], snap["frozen"])
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ts["adapter"]),
                                                    jax.tree.leaves(snap["trainable"]))]
  assert any(moved), f"{method}: no trainable leaf changed after {TRAIN_STEPS} steps"
