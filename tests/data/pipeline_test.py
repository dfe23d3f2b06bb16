"""grain pipelines: fixed shapes, seeded shuffles, sharding, checkpointable state, transforms."""
import numpy as np
import pytest

from lowrank_jax import data
from lowrank_jax.models import minilm

SRC = data.ArraySource({"x": np.arange(103, dtype=np.int32), "y": np.arange(103) % 7})


def _ids(it, n=None):
  out = []
  for i, b in enumerate(it):
    if n is not None and i == n:
      break
    out.append(b["x"])
  return np.stack(out)


def test_fixed_shapes_and_drop_remainder():
  batches = _ids(data.make_pipeline(SRC, batch_size=10, seed=0, shard_index=0, shard_count=1))
  assert batches.shape == (10, 10) and batches.dtype == np.int32
  assert len(set(batches.ravel())) == 100


def test_seeded_shuffle_and_epochs():
  kw = dict(batch_size=10, shard_index=0, shard_count=1, num_epochs=2)
  a = _ids(data.make_pipeline(SRC, seed=1, **kw))
  b = _ids(data.make_pipeline(SRC, seed=1, **kw))
  c = _ids(data.make_pipeline(SRC, seed=2, **kw))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  first, second = a.ravel()[:103], a.ravel()[103:206]
  assert not np.array_equal(first, second)      # reshuffled each epoch
  plain = _ids(data.make_pipeline(SRC, seed=1, shuffle=False, batch_size=10, shard_index=0,
                                  shard_count=1))
  np.testing.assert_array_equal(plain.ravel(), np.arange(100))


def test_sharding_is_disjoint_and_equal():
  shards = [_ids(data.make_pipeline(SRC, batch_size=5, seed=0, shard_index=i, shard_count=3))
            for i in range(3)]
  assert {s.shape for s in shards} == {(6, 5)}
  flat = [set(s.ravel()) for s in shards]
  assert not (flat[0] & flat[1]) and not (flat[1] & flat[2]) and not (flat[0] & flat[2])


def test_checkpointable_state():
  it = data.make_pipeline(SRC, batch_size=4, seed=3, num_epochs=None, shard_index=0,
                          shard_count=1)
  for _ in range(30):   # past the first epoch (25 batches)
    next(it)
  state = it.get_state()
  want = _ids(it, 5)
  fresh = data.make_pipeline(SRC, batch_size=4, seed=3, num_epochs=None, shard_index=0,
                             shard_count=1)
  fresh.set_state(state)
  np.testing.assert_array_equal(_ids(fresh, 5), want)


def test_bad_arguments(minilm_wheel):
  with pytest.raises(ValueError, match="batch_size"):
    data.make_pipeline(SRC, batch_size=0)
  with pytest.raises(ValueError, match="shard_index"):
    data.make_pipeline(SRC, batch_size=2, shard_index=3, shard_count=2)
  with pytest.raises(ValueError, match="together"):
    data.make_pipeline(SRC, batch_size=2, shard_index=0)
  with pytest.raises(ValueError, match="equal length"):
    data.ArraySource({"a": np.zeros(3), "b": np.zeros(4)})
  with pytest.raises(ValueError, match="fixed-length"):
    data.text_transform(_unpadded_tokenizer())


def _unpadded_tokenizer():
  tok = minilm.load_tokenizer(8)
  tok.no_padding()
  return tok


def test_wordnet_text_pipeline(data_dir, wordnet, minilm_wheel):
  src = data.load("wordnet_supersense", "validation", data_dir)
  tok = minilm.load_tokenizer(max_length=24)
  it = data.make_pipeline(src, batch_size=16, seed=0, shard_index=0, shard_count=1,
                          transform=data.text_transform(tok))
  for _ in range(3):
    b = next(it)
    assert set(b) == {"input_ids", "attention_mask", "label"}
    assert b["input_ids"].shape == (16, 24) and b["input_ids"].dtype == np.int32
    assert b["attention_mask"].dtype == np.int32 and b["label"].shape == (16,)
    assert b["label"].dtype == np.int32 and b["label"].max() < 41
    assert np.all(b["input_ids"][:, 0] == tok.token_to_id("[CLS]"))


def test_image_pipeline(data_dir):
  src = data.load("digits", "train", data_dir)
  it = data.make_pipeline(src, batch_size=32, seed=0, shard_index=0, shard_count=1,
                          transform=data.image_transform(scale=1 / 16, flatten=True))
  b = next(it)
  assert b["image"].shape == (32, 64) and b["image"].dtype == np.float32
  assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0
