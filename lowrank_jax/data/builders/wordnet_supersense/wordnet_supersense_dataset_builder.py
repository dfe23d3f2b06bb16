"""`wordnet_supersense`: WordNet 3.0 gloss -> lexicographer class (41 noun/verb supersenses).

Built offline from Debian `wordnet-base` (`/usr/share/wordnet`, or `$LOWRANK_JAX_WORDNET_DIR`).
Each example is one noun or verb synset (95,882 in all) with its gloss, supersense label, lemmas
and hypernym synset ids (the relations used by the semantic probes). The split is deterministic:
a stable hash (sha1) of the synset id puts ~80% in train, ~10% in validation and ~10% in test.

Each source file is checked whole (newline-terminated, parsable lines, the WordNet 3.0 synset
count) before anything is written, so a truncated or damaged file raises `IncompleteDataError`
naming it and no partial dataset is cached.
"""
from __future__ import annotations

import tensorflow_datasets as tfds

from lowrank_jax.data import _sources


class Builder(tfds.core.GeneratorBasedBuilder):
  """WordNet supersense classification (gloss -> lexicographer file)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Nouns and verbs of WordNet 3.0; sha1 80/10/10 split."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "gloss": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=list(_sources.SUPERSENSES)),
            "synset_id": tfds.features.Text(),
            "lemmas": tfds.features.Sequence(tfds.features.Text()),
            "hypernyms": tfds.features.Sequence(tfds.features.Text()),
        }),
        supervised_keys=("gloss", "label"),
        homepage="https://wordnet.princeton.edu/",
        license="WordNet 3.0 license",
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    by_split = {"train": [], "validation": [], "test": []}
    for s in _sources.iter_wordnet():
      by_split[_sources.wordnet_split(s.synset_id)].append(s)
    return {name: self._generate_examples(synsets) for name, synsets in by_split.items()}

  def _generate_examples(self, synsets):
    for s in synsets:
      yield s.synset_id, {"gloss": s.gloss, "label": s.label, "synset_id": s.synset_id,
                          "lemmas": list(s.lemmas), "hypernyms": list(s.hypernyms)}
