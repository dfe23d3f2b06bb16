"""Offline datasets (tfds builders writing array_record, read by `tfds.data_source`) and grain
pipelines. No TensorFlow.

>>> from lowrank_jax import data
>>> data.list_datasets()
['digits', 'fashion_mnist', 'wordnet_supersense']
"""
from lowrank_jax.data._catalog import (DATA_DIR_ENV, DATASETS, MODALITIES, DatasetEntry, builder,
                                       dataset_entry, default_data_dir, example_transform,
                                       label_names, list_datasets, load, num_classes)
from lowrank_jax.data._lm import (PACKED_KEYS, encode_pair, lm_transform, pack_rows, packed_batches,
                                  text_formatter)
from lowrank_jax.data._pipeline import (ArraySource, image_transform, make_packed_pipeline,
                                        make_pipeline, text_transform)
from lowrank_jax.data._sources import IncompleteDataError, MissingDataError, SUPERSENSES
from lowrank_jax.data.wordnet import probe_pairs, semantic_probe_score

__all__ = [
    "ArraySource", "DATA_DIR_ENV", "DATASETS", "DatasetEntry", "IncompleteDataError", "MODALITIES",
    "MissingDataError", "PACKED_KEYS", "SUPERSENSES", "builder", "dataset_entry",
    "default_data_dir", "encode_pair", "example_transform", "image_transform", "label_names",
    "list_datasets", "lm_transform", "load", "make_packed_pipeline", "make_pipeline",
    "num_classes", "pack_rows", "packed_batches", "probe_pairs", "semantic_probe_score",
    "text_formatter", "text_transform",
]
