"""Float64 for the implicit-differentiation tests only.

`jax.enable_x64(True)` is a context manager (jax 0.10): the flag is restored after each test, so
other test files keep the default precision.
"""
import jax
import pytest


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield
