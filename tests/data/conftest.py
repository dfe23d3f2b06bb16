"""Data tests share one tfds data dir per session, so each dataset is prepared at most once.

Tests needing a Debian package skip with the install command when it is missing; set
LOWRANK_JAX_REQUIRE_DATA=1 (CI) to fail instead.
"""
import os

import pytest

from lowrank_jax.data import _sources


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


def _require(check):
  try:
    check()
  except _sources.MissingDataError as e:
    if os.environ.get("LOWRANK_JAX_REQUIRE_DATA") == "1":
      raise
    pytest.skip(str(e))


@pytest.fixture
def wordnet():
  _require(_sources.wordnet_dir)


@pytest.fixture
def fashion():
  _require(_sources.fashion_mnist_dir)
