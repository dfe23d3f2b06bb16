"""Dataset catalogue: our offline tfds builders plus pass-through to standard tfds names (private).

Each entry says what its examples hold (modality, input feature, pixel scale, splits), so a trainer
turns any dataset into model inputs without knowing it by name (`example_transform`).
"""
from __future__ import annotations

import importlib
import os
import pathlib
from typing import Any, Callable, NamedTuple

from lowrank_jax.data import _sources
from lowrank_jax.data._sources import MissingDataError

DATA_DIR_ENV = "LOWRANK_JAX_DATA_DIR"
_TFDS_PREFIX = "tfds:"


MODALITIES = ("image", "text")


class DatasetEntry(NamedTuple):
  """What a trainer needs to know of a dataset to turn its examples into model inputs.

  Attributes:
    builder_name: tfds builder (module lowrank_jax.data.builders.<builder_name>, or a standard
      tfds name).
    check: raises MissingDataError with install instructions (None: nothing to check).
    splits: the split names; () when tfds only knows them once the data is prepared.
    description: one line.
    modality: "image" or "text": the input feature the model reads.
    input_key: the feature holding the image or the text (e.g. a gloss).
    image_scale: factor that maps stored pixel values to [0, 1] (images only).
    label_key: the integer class feature.
    num_examples: examples over all splits of a whole build (0: not known); a prepared copy
      holding another number is refused.
  """
  builder_name: str
  check: Callable[[], Any] | None
  splits: tuple[str, ...]
  description: str
  modality: str
  input_key: str
  image_scale: float = 1.0 / 255.0
  label_key: str = "label"
  num_examples: int = 0


DATASETS: dict[str, DatasetEntry] = {
    "wordnet_supersense": DatasetEntry(
        "wordnet_supersense", _sources.wordnet_dir, ("train", "validation", "test"),
        "WordNet 3.0 gloss -> 41 supersenses (Debian wordnet-base)", "text", "gloss",
        num_examples=sum(_sources.WORDNET_SYNSETS.values())),
    "fashion_mnist": DatasetEntry(
        "fashion_mnist_debian", _sources.fashion_mnist_dir, ("train", "test"),
        "Fashion-MNIST 60k/10k 28x28x1 (Debian dataset-fashion-mnist)", "image", "image",
        1.0 / 255.0, num_examples=70_000),
    "digits": DatasetEntry(
        "sklearn_digits", _sources.sklearn_digits, ("train", "test"),
        "8x8 digits bundled with scikit-learn (1797 images)", "image", "image", 1.0 / 16.0,
        num_examples=1797),
}


def list_datasets() -> list[str]:
  """Names of the offline datasets of this package."""
  return sorted(DATASETS)


def default_data_dir() -> pathlib.Path:
  """`$LOWRANK_JAX_DATA_DIR`, else `~/.cache/lowrank_jax/tfds`."""
  return pathlib.Path(os.environ.get(DATA_DIR_ENV, "~/.cache/lowrank_jax/tfds")).expanduser()


def _resolve_data_dir(data_dir) -> pathlib.Path:
  return default_data_dir() if data_dir is None else pathlib.Path(data_dir).expanduser()


def _check_writable(path: pathlib.Path) -> None:
  """One clear error when the data dir cannot be created or written."""
  try:
    path.mkdir(parents=True, exist_ok=True)
    ok = os.access(path, os.W_OK)
  except OSError as e:
    ok, why = False, e.strerror
  else:
    why = "not writable"
  if not ok:
    raise MissingDataError(
        f"tfds data_dir {os.fspath(path)!r} cannot be used ({why}). Pass data_dir=... or set "
        f"{DATA_DIR_ENV} to a writable directory.")


def builder(name: str, data_dir: str | os.PathLike | None = None, *, prepare: bool = True):
  """The tfds builder of one of our datasets, prepared (array_record) into `data_dir` on first use.

  Raises:
    ValueError: `name` is not one of `list_datasets()`.
    MissingDataError: the raw data (Debian package, scikit-learn) is not installed, or the
      data dir cannot be written.
    IncompleteDataError: the raw data is damaged (nothing is cached), or the prepared copy holds
      fewer or more examples than a whole build.
  """
  if name not in DATASETS:
    raise ValueError(f"Unknown dataset {name!r}; valid names: {list_datasets()}")
  entry = DATASETS[name]
  mod = importlib.import_module(f"lowrank_jax.data.builders.{entry.builder_name}")
  b = mod.Builder(data_dir=os.fspath(_resolve_data_dir(data_dir)), file_format="array_record")
  if prepare and not b.is_prepared():
    _check_writable(_resolve_data_dir(data_dir))
    entry.check()   # one clear error (what to install) instead of a deep traceback
    b.download_and_prepare(file_format="array_record")
  if prepare:
    _check_complete(name, b, entry.num_examples)
  return b


def _check_complete(name: str, b, num_examples: int) -> None:
  """Refuses a prepared copy that holds another number of examples than a whole build."""
  found = b.info.splits.total_num_examples
  if num_examples and found != num_examples:
    raise _sources.IncompleteDataError(
        f"the prepared {name} in {b.data_dir} holds {found:,} examples, a whole build has "
        f"{num_examples:,} (it was built from a partial source); delete {b.data_dir} to rebuild")


def _unknown(name: str) -> ValueError:
  return ValueError(f"Unknown dataset {name!r}; valid names: {list_datasets()} or a standard "
                    f"tfds catalogue name (e.g. 'mnist', 'glue/sst2')")


def _is_standard(name: str) -> bool:
  return name.startswith(_TFDS_PREFIX) or name not in DATASETS


def _standard_name(name: str) -> str:
  return name[len(_TFDS_PREFIX):] if name.startswith(_TFDS_PREFIX) else name


def _standard_builder(name: str, data_dir: pathlib.Path):
  """The tfds builder of a standard catalogue name (nothing is downloaded)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.builder(_standard_name(name), data_dir=os.fspath(data_dir))
  except tfds.core.registered.DatasetNotFoundError:
    raise _unknown(name) from None


def _standard_entry(name: str, data_dir: pathlib.Path) -> DatasetEntry:
  """The entry of a standard tfds dataset, read from its declared features."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  b = _standard_builder(name, data_dir)
  features = b.info.features
  kinds = {"image": tfds.features.Image, "text": tfds.features.Text}
  found = [(m, k) for m in MODALITIES for k, f in features.items() if isinstance(f, kinds[m])]
  if not found or "label" not in features:
    raise ValueError(f"dataset {name!r} needs an image or text feature and a 'label'; its "
                     f"features: {sorted(features)}")
  modality, key = found[0]
  return DatasetEntry(b.name, None, tuple(b.info.splits), b.info.description.split("\n")[0],
                      modality, key)


def dataset_entry(name: str, data_dir: str | os.PathLike | None = None) -> DatasetEntry:
  """The catalogue entry of `name`: one of `list_datasets()`, or a standard tfds name (or
  ``"tfds:<name>"``) described from its tfds features (the first image, else text, feature).

  Raises:
    ValueError: a name neither of this package nor of the tfds catalogue, or a tfds dataset
      without an image or text input and a `label`.
  """
  if _is_standard(name):
    return _standard_entry(name, _resolve_data_dir(data_dir))
  return DATASETS[name]


def load(name: str, split: str, data_dir: str | os.PathLike | None = None):
  """Random-access source of a dataset split (`tfds.data_source`), prepared on first use.

  Our offline names are `list_datasets()`. Any other name (or ``"tfds:<name>"``, which forces the
  standard catalogue, e.g. ``"tfds:fashion_mnist"``) goes to `tfds.data_source`, which downloads
  where a network is available (Colab).

  Args:
    name: dataset name.
    split: split name, any tfds split expression (e.g. ``"train[:10%]"``) works.
    data_dir: tfds data dir; default `default_data_dir()`.

  Returns:
    A sequence with `len()` and `__getitem__` giving dicts of numpy values (text as bytes).

  Raises:
    ValueError: unknown dataset or split.
    MissingDataError: raw data not installed (the message says what to install).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  dd = _resolve_data_dir(data_dir)
  if _is_standard(name):
    try:
      return tfds.data_source(_standard_name(name), split=split, data_dir=os.fspath(dd))
    except tfds.core.registered.DatasetNotFoundError:
      raise _unknown(name) from None
  entry = DATASETS[name]
  base_split = split.split("[")[0]
  if base_split not in entry.splits:
    raise ValueError(f"Unknown split {split!r} of {name!r}; valid splits: {list(entry.splits)}")
  builder(name, dd)
  return tfds.data_source(entry.builder_name, split=split, data_dir=os.fspath(dd), download=False)


def num_classes(name: str, data_dir: str | os.PathLike | None = None) -> int:
  """Number of classes of the `label` feature (ours, or of a standard tfds dataset)."""
  if _is_standard(name):
    b = _standard_builder(name, _resolve_data_dir(data_dir))
  else:
    b = builder(name, data_dir)
  return b.info.features["label"].num_classes


def label_names(name: str, data_dir: str | os.PathLike | None = None) -> list[str]:
  """The class names of the `label` feature (ours, or of a standard tfds dataset)."""
  if _is_standard(name):
    b = _standard_builder(name, _resolve_data_dir(data_dir))
  else:
    b = builder(name, data_dir)
  return list(b.info.features["label"].names)


def example_transform(name: str, tokenizer=None, data_dir: str | os.PathLike | None = None):
  """The per-example transform of dataset `name`'s examples to model inputs: tokenized text
  (with a fixed-length `tokenizer`) or float images scaled to [0, 1], plus the int32 label.

  Raises:
    ValueError: unknown dataset, a text dataset without a tokenizer, or an image dataset with one.
  """
  from lowrank_jax.data import _pipeline  # pylint: disable=g-import-not-at-top
  entry = dataset_entry(name, data_dir)
  if entry.modality == "text":
    if tokenizer is None:
      raise ValueError(f"dataset {name!r} is text; use a text model (one with a tokenizer)")
    return _pipeline.text_transform(tokenizer, text_key=entry.input_key,
                                    label_key=entry.label_key)
  if tokenizer is not None:
    raise ValueError(f"dataset {name!r} is images; the model is a text model")
  return _pipeline.image_transform(image_key=entry.input_key, label_key=entry.label_key,
                                   scale=entry.image_scale)
