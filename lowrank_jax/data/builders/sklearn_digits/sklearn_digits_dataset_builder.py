"""`sklearn_digits`: scikit-learn's bundled 8x8 digits (1797 images, values 0..16, 10 classes).

Deterministic split: a stable hash of the example index puts ~80% in train and ~20% in test.
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from lowrank_jax.data import _sources


class Builder(tfds.core.GeneratorBasedBuilder):
  """Optical recognition of handwritten digits (UCI), as bundled with scikit-learn."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "sklearn.datasets.load_digits; sha1 80/20 split."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        homepage="https://archive.ics.uci.edu/dataset/80",
        license="CC BY 4.0",
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    images, labels = _sources.sklearn_digits()
    idx = {"train": [], "test": []}
    for i in range(len(labels)):
      idx[_sources.digits_split(i)].append(i)
    return {s: self._generate_examples(images, labels, ids) for s, ids in idx.items()}

  def _generate_examples(self, images, labels, ids):
    for i in ids:
      yield i, {"image": images[i][..., None], "label": int(labels[i])}
