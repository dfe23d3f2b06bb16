"""WordNet semantic probes: synonym pairs vs random pairs, to measure how much an encoder forgets.

A probe score is the mean cosine similarity of synonym pairs (two lemmas of one synset) minus that
of random pairs (lemmas of two different synsets), plus the ROC AUC of separating the two sets by
cosine. Pairs come from the `wordnet_supersense` dataset (its `lemmas` feature), deterministically.

>>> import numpy as np
>>> fake = lambda texts: np.eye(4)[[len(t) % 4 for t in texts]]
>>> semantic_probe_score(fake, [("ab", "cd")], [("a", "bc")])["gap"]
1.0
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import numpy as np

from lowrank_jax.data import _catalog

Pair = tuple[str, str]


def _lemmas(ex) -> list[str]:
  return [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in ex["lemmas"]]


@functools.lru_cache(maxsize=8)
def _synset_words(split: str, data_dir: str, single_word: bool) -> dict[str, list[str]]:
  """{synset_id: distinct lemmas} of a split (read once per process)."""
  src = _catalog.load("wordnet_supersense", split, data_dir)
  groups: dict[str, list[str]] = {}
  for ex in src.__getitems__(list(range(len(src)))):
    words = []
    for w in _lemmas(ex):
      if single_word and " " in w:
        continue
      w = w.lower() if single_word else w
      if w not in words:
        words.append(w)
    sid = ex["synset_id"]
    groups[sid.decode() if isinstance(sid, bytes) else str(sid)] = words
  return groups


def probe_pairs(split: str = "test", num_pairs: int = 500, seed: int = 0, data_dir=None,
                single_word: bool = True) -> tuple[list[Pair], list[Pair]]:
  """Deterministic (synonym_pairs, random_pairs) from the `wordnet_supersense` split.

  Args:
    split: dataset split the synsets come from (held out from training: "test").
    num_pairs: pairs of each kind (fewer if the split has fewer synonym synsets).
    seed: sampling seed.
    data_dir: tfds data dir.
    single_word: keep only single-word lemmas (no spaces, hyphens allowed), case-folded.

  Returns:
    (synonym pairs, random pairs), lists of (word_a, word_b).
  """
  if num_pairs < 1:
    raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
  groups = _synset_words(split, str(_catalog._resolve_data_dir(data_dir)), single_word)
  ids = sorted(groups)                                  # independent of storage order
  rng = np.random.default_rng(seed)
  syn_ids = [s for s in ids if len(groups[s]) >= 2]
  pick = rng.permutation(len(syn_ids))[:num_pairs]
  synonyms = []
  for j in pick:
    words = groups[syn_ids[j]]
    a, b = rng.choice(len(words), 2, replace=False)
    synonyms.append((words[a], words[b]))
  nonempty = [s for s in ids if groups[s]]
  randoms = []
  while len(randoms) < len(synonyms):
    a, b = rng.choice(len(nonempty), 2, replace=False)
    wa, wb = groups[nonempty[a]], groups[nonempty[b]]
    pa, pb = wa[rng.integers(len(wa))], wb[rng.integers(len(wb))]
    if pa != pb:
      randoms.append((pa, pb))
  return synonyms, randoms


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
  """P(pos > neg) + 0.5 P(tie) (Mann-Whitney U)."""
  scores = np.concatenate([pos, neg])
  order = scores.argsort(kind="mergesort")
  ranks = np.empty(len(scores))
  sorted_scores = scores[order]
  # average ranks of ties
  i = 0
  while i < len(scores):
    j = i
    while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
      j += 1
    ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
    i = j + 1
  u = ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
  return float(u / (len(pos) * len(neg)))


def semantic_probe_score(embed_fn: Callable[[list[str]], np.ndarray],
                         synonym_pairs: Sequence[Pair],
                         random_pairs: Sequence[Pair]) -> dict[str, float]:
  """Scores an encoder on synonym vs random pairs.

  Args:
    embed_fn: list of strings -> (n, d) embeddings (normalised here).
    synonym_pairs: (word_a, word_b) sharing a synset.
    random_pairs: (word_a, word_b) from different synsets.

  Returns:
    {"synonym_cos", "random_cos", "gap" (= synonym_cos - random_cos), "auc"}.
  """
  if not synonym_pairs or not random_pairs:
    raise ValueError("semantic_probe_score needs non-empty synonym_pairs and random_pairs")

  def cos(pairs):
    a = np.asarray(embed_fn([p[0] for p in pairs]), np.float64)
    b = np.asarray(embed_fn([p[1] for p in pairs]), np.float64)
    a /= np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b /= np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    return np.sum(a * b, axis=-1)

  s, r = cos(synonym_pairs), cos(random_pairs)
  return {"synonym_cos": float(s.mean()), "random_cos": float(r.mean()),
          "gap": float(s.mean() - r.mean()), "auc": _auc(s, r)}
