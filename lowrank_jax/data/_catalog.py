"""Dataset catalogue: our offline tfds builders plus pass-through to standard tfds names (private)."""
from __future__ import annotations

import importlib
import os
import pathlib
from typing import Any, Callable, NamedTuple

from lowrank_jax.data import _sources
from lowrank_jax.data._sources import MissingDataError

DATA_DIR_ENV = "LOWRANK_JAX_DATA_DIR"
_TFDS_PREFIX = "tfds:"


class DatasetEntry(NamedTuple):
  builder_name: str          # tfds builder (module lowrank_jax.data.builders.<builder_name>)
  check: Callable[[], Any]   # raises MissingDataError with install instructions
  splits: tuple[str, ...]
  description: str


DATASETS: dict[str, DatasetEntry] = {
    "wordnet_supersense": DatasetEntry(
        "wordnet_supersense", _sources.wordnet_dir, ("train", "validation", "test"),
        "WordNet 3.0 gloss -> 41 supersenses (Debian wordnet-base)"),
    "fashion_mnist": DatasetEntry(
        "fashion_mnist_debian", _sources.fashion_mnist_dir, ("train", "test"),
        "Fashion-MNIST 60k/10k 28x28x1 (Debian dataset-fashion-mnist)"),
    "digits": DatasetEntry(
        "sklearn_digits", _sources.sklearn_digits, ("train", "test"),
        "8x8 digits bundled with scikit-learn (1797 images)"),
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
  return b


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
  if name.startswith(_TFDS_PREFIX) or name not in DATASETS:
    std = name[len(_TFDS_PREFIX):] if name.startswith(_TFDS_PREFIX) else name
    try:
      return tfds.data_source(std, split=split, data_dir=os.fspath(dd))
    except tfds.core.registered.DatasetNotFoundError:
      raise ValueError(f"Unknown dataset {name!r}; valid names: {list_datasets()} or a standard "
                       f"tfds catalogue name (e.g. 'mnist', 'glue/sst2')") from None
  entry = DATASETS[name]
  base_split = split.split("[")[0]
  if base_split not in entry.splits:
    raise ValueError(f"Unknown split {split!r} of {name!r}; valid splits: {list(entry.splits)}")
  builder(name, dd)
  return tfds.data_source(entry.builder_name, split=split, data_dir=os.fspath(dd), download=False)


def num_classes(name: str, data_dir: str | os.PathLike | None = None) -> int:
  """Number of classes of the `label` feature of one of our datasets."""
  return builder(name, data_dir).info.features["label"].num_classes
