"""Reliability cases of the offline data: a damaged WordNet source is refused, never cached.

The references are independent of the reader: the Debian package's own md5 list
(`/var/lib/dpkg/info/wordnet-base.md5sums`) and plain line counts of the installed files.
"""
import hashlib
import json
import os
import pathlib

import pytest

from lowrank_jax import data
from lowrank_jax.data import _sources

WORDNET = pathlib.Path("/usr/share/wordnet")
MD5SUMS = pathlib.Path("/var/lib/dpkg/info/wordnet-base.md5sums")


@pytest.fixture
def wordnet():
  if not (WORDNET / "data.verb").is_file():
    pytest.skip("WordNet is not installed (apt-get install -y wordnet-base)")


def _synset_lines(path):
  with open(path, encoding="utf-8") as f:
    return sum(1 for line in f if not line.startswith("  "))


def _copy_with_verb(tmp_path, verb_bytes: bytes) -> pathlib.Path:
  """A WordNet dir holding the installed data.noun and the given data.verb content."""
  src = tmp_path / "wordnet"
  src.mkdir()
  os.symlink(WORDNET / "data.noun", src / "data.noun")
  (src / "data.verb").write_bytes(verb_bytes)
  return src


def test_installed_files_match_the_package_and_read_whole(wordnet):
  if not MD5SUMS.is_file():
    pytest.skip("no dpkg md5 list for wordnet-base")
  sums = dict(reversed(line.split()) for line in MD5SUMS.read_text().splitlines())
  for name in ("data.noun", "data.verb"):
    digest = hashlib.md5((WORDNET / name).read_bytes()).hexdigest()
    assert digest == sums[f"usr/share/wordnet/{name}"], name
    pos = {"data.noun": "n", "data.verb": "v"}[name]
    assert len(_sources.read_wordnet_file(WORDNET / name, pos)) == _synset_lines(WORDNET / name)


def test_truncated_at_a_line_boundary_is_refused(wordnet, tmp_path):
  lines = (WORDNET / "data.verb").read_bytes().splitlines(keepends=True)
  src = _copy_with_verb(tmp_path, b"".join(lines[:-100]))
  with pytest.raises(data.IncompleteDataError,
                     match=rf"{src}/data.verb holds 13,667 synsets, WordNet 3.0 has 13,767"):
    _sources.read_wordnet_file(src / "data.verb", "v")


def test_truncated_mid_line_is_refused(wordnet, tmp_path):
  src = _copy_with_verb(tmp_path, (WORDNET / "data.verb").read_bytes()[:-20])
  with pytest.raises(data.IncompleteDataError,
                     match=rf"{src}/data.verb is truncated: line \d+ ends without a newline"):
    _sources.read_wordnet_file(src / "data.verb", "v")


def test_damaged_line_is_refused(wordnet, tmp_path):
  raw = (WORDNET / "data.verb").read_bytes()
  cut = raw.index(b"\n", len(raw) // 2) + 1
  src = _copy_with_verb(tmp_path, raw[:cut] + b"00000000 garbage\n" + raw[cut:])
  with pytest.raises(data.IncompleteDataError,
                     match=rf"{src}/data.verb line \d+ is not a WordNet data line"):
    _sources.read_wordnet_file(src / "data.verb", "v")


def test_truncated_source_builds_and_caches_nothing(wordnet, tmp_path, monkeypatch):
  lines = (WORDNET / "data.verb").read_bytes().splitlines(keepends=True)
  src = _copy_with_verb(tmp_path, b"".join(lines[:-1]))
  monkeypatch.setenv(_sources.WORDNET_ENV, str(src))
  tfds_dir = tmp_path / "tfds"
  with pytest.raises(data.IncompleteDataError, match=rf"{src}/data.verb holds 13,766 synsets"):
    data.builder("wordnet_supersense", tfds_dir)
  assert not list(tfds_dir.rglob("dataset_info.json")), "a partial build was cached"
  assert not data.builder("wordnet_supersense", tfds_dir, prepare=False).is_prepared()


def test_prepared_copy_of_a_partial_build_is_refused(tmp_path):
  path = data.builder("digits", tmp_path).data_dir   # 1,797 images, 1,445 of them in train
  info_file = pathlib.Path(path) / "dataset_info.json"
  info = json.loads(info_file.read_text())
  train = next(s for s in info["splits"] if s["name"] == "train")
  assert train["shardLengths"] == ["1445"]
  train["shardLengths"] = ["1400"]   # as a build from a source missing 45 images would record
  info_file.write_text(json.dumps(info))
  with pytest.raises(data.IncompleteDataError,
                     match=rf"the prepared digits in {path} holds 1,752 examples, a whole build "
                     rf"has 1,797 \(it was built from a partial source\); delete {path} to rebuild"):
    data.builder("digits", tmp_path)
