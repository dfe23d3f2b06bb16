"""grain pipelines over random-access sources: seeded shuffle, process sharding, fixed-shape
batches, checkpointable iterators, and per-example transforms (private)."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np


class ArraySource:
  """Random-access source over equal-length numpy arrays: item i is {k: v[i]}.

  >>> src = ArraySource({"x": np.arange(6).reshape(3, 2), "label": np.arange(3)})
  >>> len(src), int(src[1]["label"])
  (3, 1)
  """

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    lens = {k: len(v) for k, v in arrays.items()}
    if not lens or len(set(lens.values())) != 1:
      raise ValueError(f"ArraySource needs >= 1 arrays of equal length, got lengths {lens}")
    self._arrays = {k: np.asarray(v) for k, v in arrays.items()}
    self._len = next(iter(lens.values()))

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return {k: v[i] for k, v in self._arrays.items()}


def make_pipeline(source: Sequence[Any], *, batch_size: int, seed: int = 0,
                  shuffle: bool = True, num_epochs: int | None = 1,
                  shard_index: int | None = None, shard_count: int | None = None,
                  transform: Callable[[Any], Any] | None = None):
  """A grain iterator of fixed-shape batches over a random-access `source`.

  Each process reads shard `shard_index` of `shard_count` (default: `jax.process_index()` of
  `jax.process_count()`); shards are cut to equal length so every process sees the same number of
  batches. The shuffle is seeded and reshuffles each epoch. The last partial batch is dropped
  (fixed shapes, no re-compilation). The iterator's `get_state()` / `set_state(state)` checkpoint
  and restore the position.

  Args:
    source: anything with `__len__` and `__getitem__` (e.g. `load(...)`, `ArraySource`).
    batch_size: examples per batch (per process).
    seed: shuffle seed.
    shuffle: shuffle each epoch.
    num_epochs: passes over the data; `None` repeats forever.
    shard_index: this process's shard.
    shard_count: number of shards.
    transform: per-example function (e.g. `text_transform(...)`) returning a dict of arrays.

  Returns:
    A `grain.DatasetIterator` yielding dicts of stacked numpy arrays.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  ds = example_dataset(source, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                       shard_index=shard_index, shard_count=shard_count, transform=transform,
                       min_examples=batch_size)
  ds = ds.batch(batch_size, drop_remainder=True)
  return iter(ds.to_iter_dataset())


def make_packed_pipeline(source: Sequence[Any], *, transform: Callable[[Any], dict],
                         seq_len: int, batch_size: int, seed: int = 0, shuffle: bool = True,
                         num_epochs: int | None = 1, shard_index: int | None = None,
                         shard_count: int | None = None):
  """A grain iterator of packed batches: tokenized examples (`transform` gives each its
  `input_ids` and `loss_mask`) concatenated into rows of `seq_len` tokens with `segment_ids` and
  `positions` (see `lowrank_jax.data._lm`), `batch_size` rows a batch. Shuffling, sharding and
  checkpointing as `make_pipeline`."""
  from lowrank_jax.data import _lm  # pylint: disable=g-import-not-at-top
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  ds = example_dataset(source, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                       shard_index=shard_index, shard_count=shard_count, transform=transform,
                       min_examples=1)
  ds = _lm.pack(ds.to_iter_dataset(), seq_len, batch_size, seed=seed, shuffle_bins=shuffle)
  return iter(ds.batch(batch_size, drop_remainder=True))


def example_dataset(source: Sequence[Any], *, seed: int, shuffle: bool, num_epochs: int | None,
                    shard_index: int | None, shard_count: int | None,
                    transform: Callable[[Any], Any] | None, min_examples: int):
  """This process's shard of `source`, shuffled, repeated and transformed (a grain MapDataset).

  Raises:
    ValueError: bad `num_epochs` or shard, or a shard of fewer than `min_examples` examples.
  """
  import grain  # pylint: disable=g-import-not-at-top
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
  if shard_count is None or shard_index is None:
    if (shard_count is None) != (shard_index is None):
      raise ValueError("shard_index and shard_count must be given together")
    import jax  # pylint: disable=g-import-not-at-top
    shard_index, shard_count = jax.process_index(), jax.process_count()
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
  n = len(source) // shard_count
  if n < min_examples:
    raise ValueError(f"shard of {n} examples is smaller than batch_size={min_examples}")
  ds = grain.MapDataset.source(source)
  ds = ds[shard_index * n:(shard_index + 1) * n]      # contiguous, equal-size shards
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  if transform is not None:
    ds = ds.map(transform)
  return ds


def _to_str(x) -> str:
  if isinstance(x, bytes):
    return x.decode("utf-8")
  if isinstance(x, np.ndarray) and x.dtype.kind in "SO":
    return _to_str(x.item())
  return str(x)


def text_transform(tokenizer, *, text_key: str = "gloss", label_key: str | None = "label"):
  """Per-example tokenization to the tokenizer's fixed length.

  Use a tokenizer with fixed padding/truncation, e.g. `minilm.load_tokenizer(max_length)`.

  Returns:
    fn(example) -> {"input_ids", "attention_mask" (int32, (max_length,)), "label" (int32, ())}.
  """
  padding = getattr(tokenizer, "padding", None)
  if padding is None or padding.get("length") is None:
    raise ValueError("text_transform needs a tokenizer with fixed-length padding; use "
                     "minilm.load_tokenizer(max_length)")

  def fn(example):
    enc = tokenizer.encode(_to_str(example[text_key]))
    out = {"input_ids": np.asarray(enc.ids, np.int32),
           "attention_mask": np.asarray(enc.attention_mask, np.int32)}
    if label_key is not None:
      out["label"] = np.asarray(example[label_key], np.int32)
    return out
  return fn


def image_transform(*, image_key: str = "image", label_key: str | None = "label",
                    scale: float = 1.0 / 255.0, flatten: bool = False):
  """Per-example image to float32 (times `scale`, optionally flattened) and int32 label."""
  def fn(example):
    img = np.asarray(example[image_key], np.float32) * np.float32(scale)
    out = {"image": img.reshape(-1) if flatten else img}
    if label_key is not None:
      out["label"] = np.asarray(example[label_key], np.int32)
    return out
  return fn
