"""Offline tfds datasets: round trips against the raw files, deterministic splits, shapes/dtypes,
clear errors, and pass-through of standard tfds names."""
import collections
import traceback

import numpy as np
import pytest
import tensorflow_datasets as tfds

from lowrank_jax import data
from lowrank_jax.data import _sources


def test_digits_round_trip(data_dir):
  train, test = data.load("digits", "train", data_dir), data.load("digits", "test", data_dir)
  assert len(train) + len(test) == 1797 and 0.75 < len(train) / 1797 < 0.85
  ex = train[0]
  assert ex["image"].shape == (8, 8, 1) and ex["image"].dtype == np.uint8
  images, labels = _sources.sklearn_digits()
  want = sorted((im.tobytes(), int(y)) for im, y in zip(images, labels))
  got = sorted((s[i]["image"][..., 0].tobytes(), int(s[i]["label"]))
               for s in (train, test) for i in range(len(s)))
  assert got == want
  assert data.num_classes("digits", data_dir) == 10


def test_digits_split_is_deterministic(tmp_path):
  a = data.load("digits", "test", tmp_path / "a")
  b = data.load("digits", "test", tmp_path / "b")
  assert len(a) == len(b)
  for i in range(0, len(a), 17):
    np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
    assert a[i]["label"] == b[i]["label"]


def test_wordnet_supersense(data_dir, wordnet):
  splits = {s: data.load("wordnet_supersense", s, data_dir)
            for s in ("train", "validation", "test")}
  raw = {s.synset_id: s for s in _sources.iter_wordnet()}
  assert sum(len(v) for v in splits.values()) == len(raw) == 95_882
  expected = collections.Counter(_sources.wordnet_split(k) for k in raw)
  assert {k: len(v) for k, v in splits.items()} == dict(expected)
  assert 0.79 < len(splits["train"]) / len(raw) < 0.81
  assert data.num_classes("wordnet_supersense", data_dir) == 41 == len(data.SUPERSENSES)
  for split, src in splits.items():
    for i in range(0, len(src), max(1, len(src) // 50)):
      ex = src[i]
      sid = ex["synset_id"].decode()
      assert _sources.wordnet_split(sid) == split
      r = raw[sid]
      assert ex["gloss"].decode() == r.gloss and int(ex["label"]) == r.label
      assert [w.decode() for w in ex["lemmas"]] == list(r.lemmas)
  kapok = raw["n12190410"]
  assert data.SUPERSENSES[kapok.label] == "noun.plant" and "kapok" in kapok.lemmas
  assert kapok.hypernyms == ("n13109733",)


def test_fashion_mnist(data_dir, fashion):
  train, test = data.load("fashion_mnist", "train", data_dir), data.load("fashion_mnist", "test",
                                                                          data_dir)
  assert (len(train), len(test)) == (60_000, 10_000)
  ex = train[123]
  assert ex["image"].shape == (28, 28, 1) and ex["image"].dtype == np.uint8
  images, labels = _sources.fashion_mnist("test")
  got = [test[i] for i in range(len(test))]
  assert collections.Counter(int(e["label"]) for e in got) == collections.Counter(labels.tolist())
  assert sum(int(e["image"].sum()) for e in got) == int(images.astype(np.int64).sum())


@pytest.mark.parametrize("name,env,hint", [
    ("wordnet_supersense", _sources.WORDNET_ENV, "apt-get install -y wordnet-base"),
    ("fashion_mnist", _sources.FASHION_MNIST_ENV, "apt-get install -y dataset-fashion-mnist")])
def test_missing_debian_package_is_one_clear_error(monkeypatch, tmp_path, name, env, hint):
  monkeypatch.setenv(env, str(tmp_path / "not_installed"))
  with pytest.raises(data.MissingDataError, match=hint) as info:
    data.load(name, "train", tmp_path / "tfds")
  assert info.value.__cause__ is None and info.value.__context__ is None
  assert len(traceback.extract_tb(info.tb)) <= 5   # a shallow traceback, not tfds internals


def test_unusable_data_dir_is_one_clear_error(tmp_path):
  (tmp_path / "a_file").write_text("")
  with pytest.raises(data.MissingDataError, match="LOWRANK_JAX_DATA_DIR"):
    data.load("digits", "train", tmp_path / "a_file" / "tfds")


def test_unknown_names_and_splits(data_dir):
  with pytest.raises(ValueError, match="valid names.*wordnet_supersense"):
    data.load("no_such_dataset_xyz", "train", data_dir)
  with pytest.raises(ValueError, match="valid splits"):
    data.load("digits", "validation", data_dir)
  with pytest.raises(ValueError, match="valid names"):
    data.builder("mnist", data_dir)


def test_standard_tfds_names_pass_through(tmp_path):
  with tfds.testing.mock_data(num_examples=5):
    src = data.load("mnist", "train", tmp_path)
    assert len(src) == 5 and src[0]["image"].shape == (28, 28, 1)
    src = data.load("tfds:fashion_mnist", "test", tmp_path)
    assert len(src) == 5


def test_default_data_dir(monkeypatch, tmp_path):
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
  assert data.default_data_dir() == tmp_path
  monkeypatch.delenv(data.DATA_DIR_ENV)
  assert str(data.default_data_dir()).endswith(".cache/lowrank_jax/tfds")
