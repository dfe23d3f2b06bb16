"""Llama `scan_layers`: the scanned decoder gives the unrolled loop's logits and LoRA gradients
(with dropout and remat, on an NF4 base), keeps the per-layer params layout, and refuses
configs whose layers differ."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax import quant
from lowrank_jax import tasks
from lowrank_jax.models import llama

CFG = dataclasses.replace(llama.LlamaConfig.preset("tiny"), num_layers=3, dropout_rate=0.1)
TARGETS = r"layers/layer_\d+/(attention|mlp)/\w+_proj/kernel"
IDS = jax.random.randint(jax.random.key(1), (2, 8), 0, CFG.vocab_size)
# Two packed examples in the second row, so the mask and positions go through the scan too.
BATCH = {"input_ids": IDS, "loss_mask": jnp.ones(IDS.shape, jnp.float32),
         "segment_ids": jnp.asarray([[1] * 8, [1] * 5 + [2] * 3], jnp.int32),
         "positions": jnp.asarray([list(range(8)), list(range(5)) + list(range(3))], jnp.int32)}


def _setup(nf4: bool = False):
  params = llama.init(jax.random.key(0), CFG)
  if nf4:
    params = quant.quantize(params, "nf4", TARGETS, block_size=16)
  adapter = lj.lora(rank=4, targets=TARGETS)
  base, state = adapter.init(jax.random.key(2), params)
  # Nonzero B, different per layer, so that every factor has a gradient.
  leaves, tdef = jax.tree.flatten(state.trainable)
  keys = jax.random.split(jax.random.key(4), len(leaves))
  trainable = jax.tree.unflatten(tdef, [v + 0.05 * jax.random.normal(k, v.shape)
                                        for v, k in zip(leaves, keys)])
  return adapter, base, lj.with_trainable(state, trainable)


def _logits_and_grads(adapter, base, state, cfg, rng):
  def loss(trainable):
    p = adapter.apply(base, lj.with_trainable(state, trainable))
    logits = llama.causal_lm_logits(p, cfg, BATCH, deterministic=rng is None, rng=rng)
    return tasks.get_task("causal_lm").loss(logits, BATCH)[0], logits
  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state.trainable)
  return logits, grads


def test_scanned_equals_unrolled(fast_compile):
  """With dropout (each layer's keys must follow it into the scan), remat and an NF4 base: the
  scan carries all three (one compile of each program keeps the test fast)."""
  rng = jax.random.key(3)
  adapter, base, state = _setup(nf4=True)
  cfg = dataclasses.replace(CFG, remat="nothing_saveable")
  want_logits, want_grads = _logits_and_grads(adapter, base, state, cfg, rng)
  scanned = dataclasses.replace(cfg, scan_layers=True)
  p = adapter.apply(base, state)
  jaxprs = [str(jax.make_jaxpr(lambda p, c=c: llama.causal_lm_logits(p, c, BATCH))(p))
            for c in (cfg, scanned)]
  # The scanned program holds one layer's products (plus the lm head), the loop all three's.
  products = [j.count("dot_general") for j in jaxprs]
  assert jaxprs[1].count("scan[") == 1 and products[0] - 1 == 3 * (products[1] - 1), products
  logits, grads = _logits_and_grads(adapter, base, state, scanned, rng)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), rtol=1e-5, atol=1e-5)
  assert jax.tree.structure(grads) == jax.tree.structure(want_grads)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    r = jax.tree_util.tree_leaves_with_path(want_grads)
    want = dict((jax.tree_util.keystr(k), v) for k, v in r)[jax.tree_util.keystr(path)]
    assert float(jnp.abs(want).max()) > 0, path
    np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=1e-5, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))


def test_stack_layers_keeps_structured_weights():
  adapter, base, state = _setup(nf4=True)
  layers = adapter.apply(base, state)["layers"]
  stacked = llama.stack_layers(layers, CFG.num_layers)
  w = stacked["attention"]["q_proj"]["kernel"]
  assert isinstance(w.base, quant.NF4)
  assert w.base.packed.shape == (3,) + layers["layer_0"]["attention"]["q_proj"]["kernel"] \
      .base.packed.shape
  np.testing.assert_array_equal(np.asarray(w.a[1]),
                                np.asarray(layers["layer_1"]["attention"]["q_proj"]["kernel"].a))


@pytest.mark.parametrize("fields,match", [
    ({"layer_intermediate_sizes": (64, 64, 32)}, r"layer_intermediate_sizes makes them differ"),
    ({"remat": "nothing_saveable", "remat_layers": (1,)}, r"remat_layers makes them differ"),
    ({"ffn": "monet"}, r"takes ffn='swiglu'; ffn='monet'"),
    ({"scan_layers": 1}, r"scan_layers=1; valid: True or False"),
])
def test_layers_that_differ_are_refused(fields, match):
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(CFG, **{"scan_layers": True, **fields})
