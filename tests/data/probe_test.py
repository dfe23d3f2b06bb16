"""WordNet semantic probes and the digits linear-probe sanity check."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank_jax import data
from lowrank_jax.data import _sources
from lowrank_jax.models import minilm


def test_probe_pairs_are_deterministic_synonyms(data_dir, wordnet):
  syn, rnd = data.probe_pairs(split="test", num_pairs=100, seed=0, data_dir=data_dir)
  syn2, rnd2 = data.probe_pairs(split="test", num_pairs=100, seed=0, data_dir=data_dir)
  assert syn == syn2 and rnd == rnd2 and len(syn) == len(rnd) == 100
  syn3, _ = data.probe_pairs(split="test", num_pairs=100, seed=1, data_dir=data_dir)
  assert syn3 != syn
  synsets = collections.defaultdict(set)
  for s in _sources.iter_wordnet():
    if _sources.wordnet_split(s.synset_id) == "test":
      for w in s.lemmas:
        synsets[w.lower()].add(s.synset_id)
  for a, b in syn:
    assert a != b and " " not in a and synsets[a] & synsets[b], (a, b)
  assert all(a != b for a, b in rnd)


def test_semantic_probe_score_on_known_embeddings():
  table = {"a": [1, 0], "b": [1, 0], "c": [0, 1], "d": [1, 1]}
  embed = lambda words: np.array([table[w] for w in words], float)
  s = data.semantic_probe_score(embed, [("a", "b"), ("a", "d")], [("a", "c"), ("c", "d")])
  np.testing.assert_allclose(s["synonym_cos"], (1 + 0.5 ** 0.5) / 2)
  np.testing.assert_allclose(s["random_cos"], 0.5 ** 0.5 / 2)
  assert s["auc"] == 0.875   # pairs (1>0, 1>.71, .71>0, .71=.71 tie)


def test_pretrained_minilm_separates_synonyms(data_dir, wordnet, minilm_wheel):
  syn, rnd = data.probe_pairs(split="test", num_pairs=64, seed=0, data_dir=data_dir)
  params, cfg = minilm.load_pretrained()
  tok = minilm.load_tokenizer(max_length=8)
  f = jax.jit(minilm.sentence_embedding, static_argnums=1)

  def embed(words):
    b = minilm.tokenize(tok, words)
    return np.asarray(f(params, cfg, b["input_ids"], b["attention_mask"]))

  s = data.semantic_probe_score(embed, syn, rnd)
  assert s["gap"] > 0.15 and s["auc"] > 0.8, s


def test_digits_linear_probe_one_epoch(data_dir):
  def arrays(split):
    src = data.load("digits", split, data_dir)
    it = data.make_pipeline(src, batch_size=len(src), shuffle=False, shard_index=0,
                            shard_count=1, transform=data.image_transform(scale=1 / 16,
                                                                          flatten=True))
    b = next(it)
    return b["image"], b["label"]

  x_test, y_test = arrays("test")
  train = data.make_pipeline(data.load("digits", "train", data_dir), batch_size=16, seed=0,
                             num_epochs=1, shard_index=0, shard_count=1,
                             transform=data.image_transform(scale=1 / 16, flatten=True))
  params = {"w": jnp.zeros((64, 10)), "b": jnp.zeros((10,))}
  tx = optax.adam(0.05)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, x, y):
    def loss(p):
      return optax.softmax_cross_entropy_with_integer_labels(x @ p["w"] + p["b"], y).mean()
    g = jax.grad(loss)(params)
    updates, opt = tx.update(g, opt)
    return optax.apply_updates(params, updates), opt

  steps = 0
  for batch in train:
    params, opt = step(params, opt, batch["image"], batch["label"])
    steps += 1
  assert steps == 1445 // 16
  acc = float(np.mean(np.argmax(x_test @ params["w"] + params["b"], -1) == y_test))
  assert acc > 0.85, acc
