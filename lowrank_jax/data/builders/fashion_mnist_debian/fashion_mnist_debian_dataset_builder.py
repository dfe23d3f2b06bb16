"""`fashion_mnist_debian`: Fashion-MNIST (60k train / 10k test, 28x28x1 uint8, 10 classes).

Built offline from Debian `dataset-fashion-mnist` (`/usr/share/datasets/fashion-mnist`, or
`$LOWRANK_JAX_FASHION_MNIST_DIR`). Same features as the standard tfds `fashion_mnist`.
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from lowrank_jax.data import _sources


class Builder(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST from the Debian package."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Debian dataset-fashion-mnist idx files."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=list(_sources.FASHION_MNIST_LABELS)),
        }),
        supervised_keys=("image", "label"),
        homepage="https://github.com/zalandoresearch/fashion-mnist",
        license="MIT",
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in ("train", "test")}

  def _generate_examples(self, split):
    images, labels = _sources.fashion_mnist(split)
    for i in range(len(labels)):
      yield i, {"image": images[i][..., None], "label": int(labels[i])}
