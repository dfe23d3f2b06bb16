"""Property tests (hypothesis) of the decomposition-based inits over shapes, ranks, dtypes and
spectra: wide and tall layers, ranks from 1 to full, float32 and bfloat16, weights with zero,
repeated and widely spread singular values. The adapter state is finite and
`merge(apply(init(W)))` equals W within the tolerance `numerical_test` states.

Every example is a new shape, hence new compilations: the example counts are kept small.
"""
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from tests.reliability.numerical_test import MAKERS
from tests.reliability.numerical_test import assert_finite_and_exact
from tests.reliability.numerical_test import init_and_merge


def _orthonormal(rng, n, k):
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  return q[:, :k]


@st.composite
def weights(draw):
  """(W, rank): W = U diag(s) V^T of a drawn shape and spectrum, rank in [1, min(shape)]."""
  d_in, d_out = draw(st.integers(1, 10)), draw(st.integers(1, 10))
  k = min(d_in, d_out)
  spectrum = draw(st.sampled_from(["random", "zeros_tail", "repeated", "spread", "zero"]))
  rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
  s = {"random": rng.uniform(0.1, 3.0, k),
       "zeros_tail": np.concatenate([rng.uniform(1, 2, (k + 1) // 2), np.zeros(k // 2)]),
       "repeated": np.full(k, 1.5),
       "spread": np.logspace(0, -6, k),
       "zero": np.zeros(k)}[spectrum]
  scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
  w = scale * (_orthonormal(rng, d_in, k) * s) @ _orthonormal(rng, d_out, k).T
  return w, draw(st.integers(1, k))


@settings(max_examples=20, deadline=None, derandomize=True)
@given(case=weights(), method=st.sampled_from(sorted(MAKERS)))
def test_merge_of_init_is_the_weight_float32(case, method):
  w, rank = case
  state, merged = init_and_merge(method, rank, w, jnp.float32)
  assert_finite_and_exact(state, merged, w, jnp.float32)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(case=weights(), method=st.sampled_from(sorted(MAKERS)))
def test_merge_of_init_is_the_weight_bfloat16(case, method):
  w, rank = case
  state, merged = init_and_merge(method, rank, w, jnp.bfloat16)
  assert_finite_and_exact(state, merged, w, jnp.bfloat16)
