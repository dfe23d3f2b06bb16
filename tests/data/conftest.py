"""One tfds data dir per test session: each offline dataset is prepared at most once."""
import pytest


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")
