"""Readers of the offline raw data (Debian packages, scikit-learn), shared by builders (private).

A missing package raises `MissingDataError` with one clear line saying what to install.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import pathlib
import struct
from typing import Iterator, NamedTuple

import numpy as np


class MissingDataError(FileNotFoundError):
  """Raw data for a dataset is not installed; the message says how to install it."""


WORDNET_ENV = "LOWRANK_JAX_WORDNET_DIR"
FASHION_MNIST_ENV = "LOWRANK_JAX_FASHION_MNIST_DIR"
_WORDNET_DEFAULT = "/usr/share/wordnet"
_FASHION_MNIST_DEFAULT = "/usr/share/datasets/fashion-mnist"


def stable_bucket(key: str, buckets: int = 10) -> int:
  """Process-independent bucket of a string (sha1), for deterministic splits."""
  return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:4], "big") % buckets


# ---------------------------------------------------------------------------------------------
# WordNet 3.0 (Debian `wordnet-base`).
# ---------------------------------------------------------------------------------------------

# Lexicographer files 3..43 (nouns, then verbs): the 41 supersense classes.
SUPERSENSES = (
    "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute", "noun.body",
    "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food",
    "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity",
    "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather")
_FIRST_LEXFILE = 3

# Synsets per data file of WordNet 3.0 (its published statistics: 82,115 noun and 13,767 verb
# synsets). A file that yields another count is truncated, damaged or another WordNet version.
WORDNET_SYNSETS = {"data.noun": 82_115, "data.verb": 13_767}


class IncompleteDataError(ValueError):
  """Raw data is installed but does not hold what its package promises (e.g. a truncated file)."""


def wordnet_dir() -> pathlib.Path:
  """The WordNet database directory; raises MissingDataError if it is not installed."""
  path = pathlib.Path(os.environ.get(WORDNET_ENV, _WORDNET_DEFAULT))
  missing = [f for f in ("data.noun", "data.verb") if not (path / f).is_file()]
  if missing:
    raise MissingDataError(
        f"WordNet data files {missing} not found in {path}. Install them with "
        f"`apt-get install -y wordnet-base` (without root: `apt-get download wordnet-base && "
        f"dpkg -x wordnet-base_*.deb DIR`, then set {WORDNET_ENV}=DIR/usr/share/wordnet).")
  return path


class Synset(NamedTuple):
  synset_id: str          # pos letter + 8-digit offset, e.g. "n00001740"
  label: int              # 0..40, index into SUPERSENSES
  lemmas: tuple[str, ...]  # words with spaces, e.g. ("physical entity",)
  hypernyms: tuple[str, ...]
  gloss: str


def parse_wordnet_line(line: str, pos: str) -> Synset:
  """Parses one line of `data.noun` / `data.verb` (WordNet wndb(5) format)."""
  head, _, gloss = line.partition(" | ")
  f = head.split()
  offset, lexfile = f[0], int(f[1])
  w_cnt = int(f[3], 16)
  lemmas = tuple(f[4 + 2 * i].replace("_", " ") for i in range(w_cnt))
  i = 4 + 2 * w_cnt
  p_cnt = int(f[i])
  hypernyms = []
  for j in range(p_cnt):
    sym, target, tpos = f[i + 1 + 4 * j: i + 4 + 4 * j]
    if sym in ("@", "@i"):
      hypernyms.append(f"{tpos}{target}")
  label = lexfile - _FIRST_LEXFILE
  if not 0 <= label < len(SUPERSENSES) or not SUPERSENSES[label].startswith(
      {"n": "noun", "v": "verb"}[pos]):
    raise ValueError(f"unexpected lexicographer file {lexfile} for pos {pos!r}: {line[:60]!r}")
  return Synset(f"{pos}{offset}", label, lemmas, tuple(hypernyms), gloss.strip())


def read_wordnet_file(file: pathlib.Path, pos: str) -> list[Synset]:
  """The synsets of one data file, checked whole: every line ends with a newline and parses, and
  the file holds the WordNet 3.0 count of synsets (`WORDNET_SYNSETS`).

  Raises:
    IncompleteDataError: the file is cut (a last line without newline, a line that does not parse,
      fewer or more synsets than WordNet 3.0 has); the message names the file.
  """
  expected = WORDNET_SYNSETS[file.name]
  fix = "reinstall it with `apt-get install --reinstall wordnet-base`"
  synsets = []
  with open(file, encoding="utf-8") as fh:
    for number, line in enumerate(fh, 1):
      if line.startswith("  "):   # licence header lines start with two spaces
        continue
      if not line.endswith("\n"):
        raise IncompleteDataError(f"{file} is truncated: line {number} ends without a newline; "
                                  f"{fix}")
      try:
        synsets.append(parse_wordnet_line(line, pos))
      except (ValueError, IndexError) as e:
        raise IncompleteDataError(f"{file} line {number} is not a WordNet data line ({e}); "
                                  f"{fix}") from None
  if len(synsets) != expected:
    raise IncompleteDataError(f"{file} holds {len(synsets):,} synsets, WordNet 3.0 has "
                              f"{expected:,}: the file is truncated or another version; {fix}")
  return synsets


def iter_wordnet(path: pathlib.Path | None = None) -> Iterator[Synset]:
  """All noun and verb synsets, in file order, each file checked whole (`read_wordnet_file`)
  before any of its synsets is yielded."""
  path = wordnet_dir() if path is None else pathlib.Path(path)
  for pos, fname in (("n", "data.noun"), ("v", "data.verb")):
    yield from read_wordnet_file(path / fname, pos)


def wordnet_split(synset_id: str) -> str:
  """Deterministic ~80/10/10 split by a stable hash of the synset id."""
  b = stable_bucket(synset_id, 10)
  return "train" if b < 8 else ("validation" if b == 8 else "test")


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST (Debian `dataset-fashion-mnist`), idx format.
# ---------------------------------------------------------------------------------------------

FASHION_MNIST_LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                        "Sneaker", "Bag", "Ankle boot")


def fashion_mnist_dir() -> pathlib.Path:
  path = pathlib.Path(os.environ.get(FASHION_MNIST_ENV, _FASHION_MNIST_DEFAULT))
  files = [f"{p}-{k}-ubyte.gz" for p in ("train", "t10k")
           for k in ("images-idx3", "labels-idx1")]
  missing = [f for f in files if not (path / f).is_file()]
  if missing:
    raise MissingDataError(
        f"Fashion-MNIST files {missing} not found in {path}. Install them with "
        f"`apt-get install -y dataset-fashion-mnist` (without root: `apt-get download "
        f"dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb DIR`, then set "
        f"{FASHION_MNIST_ENV}=DIR/usr/share/datasets/fashion-mnist). With network access, "
        f"load('tfds:fashion_mnist', ...) reads the standard tfds copy instead.")
  return path


def read_idx(path: pathlib.Path) -> np.ndarray:
  """Reads a (gzipped) idx file: magic 2051 images (N, H, W) or 2049 labels (N,), uint8."""
  with gzip.open(path, "rb") as fh:
    data = fh.read()
  magic, n = struct.unpack(">II", data[:8])
  if magic == 2051:
    rows, cols = struct.unpack(">II", data[8:16])
    return np.frombuffer(data, np.uint8, offset=16).reshape(n, rows, cols)
  if magic == 2049:
    return np.frombuffer(data, np.uint8, offset=8).reshape(n)
  raise ValueError(f"{path}: not an idx file (magic {magic})")


def fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 (N, 28, 28), labels uint8 (N,)) for split 'train' (60k) or 'test' (10k)."""
  prefix = {"train": "train", "test": "t10k"}[split]
  path = fashion_mnist_dir()
  return (read_idx(path / f"{prefix}-images-idx3-ubyte.gz"),
          read_idx(path / f"{prefix}-labels-idx1-ubyte.gz"))


# ---------------------------------------------------------------------------------------------
# scikit-learn digits (bundled with scikit-learn).
# ---------------------------------------------------------------------------------------------

def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 (1797, 8, 8) with values 0..16, labels (1797,))."""
  try:
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise MissingDataError("The digits dataset is bundled with scikit-learn; install it with "
                           "`pip install scikit-learn`.") from None
  d = load_digits()
  return d.images.astype(np.uint8), d.target.astype(np.int64)


def digits_split(index: int) -> str:
  """Deterministic ~80/20 train/test split by a stable hash of the example index."""
  return "test" if stable_bucket(f"digits{index}", 5) == 0 else "train"
