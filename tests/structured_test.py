"""Structured weights against numpy: `merge` per base dtype, the diagonal-scaled low-rank products
(scalar and vector d), and dropout."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax import structured
from lowrank_jax import testing
from lowrank_jax.adapters import sorsa as sorsa_lib
from lowrank_jax.adapters.krona import krona
from lowrank_jax.adapters.sorsa import sorsa

D_IN, D_OUT, R, SCALE = 6, 5, 2, 0.75


def _numpy_factors(dtype):
  rng = np.random.default_rng(0)
  w = rng.standard_normal((D_IN, D_OUT))
  a = rng.standard_normal((D_IN, R))
  b = rng.standard_normal((R, D_OUT))
  cast = lambda x: np.asarray(x, dtype)
  return cast(w), cast(a), cast(b)


def test_float64_base_merges_exactly():
  """A float64 base is summed in float64: at init (b = 0) the merge is W bit for bit, and with
  nonzero factors it is W + s·a@b to float64 precision."""
  with testing.enable_x64():
    w, a, b = _numpy_factors(np.float64)
    at_init = lj.merge(lj.LowRank(jnp.asarray(w), jnp.asarray(a), jnp.zeros_like(b), SCALE))
    assert at_init.dtype == jnp.float64
    np.testing.assert_array_equal(np.asarray(at_init), w)
    merged = lj.merge(lj.LowRank(jnp.asarray(w), jnp.asarray(a), jnp.asarray(b), SCALE))
    np.testing.assert_allclose(np.asarray(merged), w + SCALE * a @ b, rtol=0, atol=1e-13)


def test_float64_base_with_float32_factors_keeps_base_digits():
  """float32 factors promote to float64 with a float64 base: the base is never rounded."""
  with testing.enable_x64():
    w, a, b = _numpy_factors(np.float64)
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    merged = lj.merge(lj.LowRank(jnp.asarray(w), jnp.asarray(a32), jnp.asarray(b32), SCALE))
    expected = w + SCALE * (a32.astype(np.float64) @ b32.astype(np.float64))
    np.testing.assert_allclose(np.asarray(merged), expected, rtol=0, atol=1e-6)
    zero = lj.merge(lj.LowRank(jnp.asarray(w), jnp.asarray(a32), jnp.zeros_like(b32), SCALE))
    np.testing.assert_array_equal(np.asarray(zero), w)


def test_float32_base():
  w, a, b = _numpy_factors(np.float32)
  merged = lj.merge(lj.LowRank(jnp.asarray(w), jnp.asarray(a), jnp.asarray(b), SCALE))
  assert merged.dtype == jnp.float32
  expected = w.astype(np.float64) + SCALE * (a.astype(np.float64) @ b.astype(np.float64))
  np.testing.assert_allclose(np.asarray(merged), expected, rtol=1e-6, atol=1e-6)


def test_bfloat16_base_is_summed_in_float32_and_rounded_once():
  w, a, b = _numpy_factors(np.float32)
  w16 = w.astype(ml_dtypes.bfloat16)
  a16, b16 = a.astype(ml_dtypes.bfloat16), b.astype(ml_dtypes.bfloat16)
  merged = lj.merge(lj.LowRank(jnp.asarray(w16), jnp.asarray(a16), jnp.asarray(b16), SCALE))
  assert merged.dtype == jnp.bfloat16
  f64 = lambda x: np.asarray(x, np.float64)
  exact = f64(w16) + SCALE * f64(a16) @ f64(b16)
  expected = exact.astype(np.float32).astype(ml_dtypes.bfloat16)
  # One rounding to bf16 of the float32 sum: equal to the rounded exact sum up to one bf16 ulp.
  ulp = np.abs(f64(expected)) * 2.0 ** -7
  assert np.all(np.abs(f64(merged) - f64(expected)) <= ulp), (f64(merged), f64(expected))


@pytest.mark.parametrize("make", [lambda: sorsa(2, targets="w/kernel"),
                                  lambda: krona(2, targets="w/kernel")])
def test_float64_merge_at_init_is_the_base_for_other_additive_weights(make):
  """Other `Additive` weights (diagonal-scaled, Kronecker) merge a float64 base in float64 too."""
  with testing.enable_x64():
    w = np.random.default_rng(1).standard_normal((8, 6))
    params = {"w": {"kernel": jnp.asarray(w)}}
    base, state = make().init(jax.random.key(0), params)
    merged = np.asarray(lj.merge(make().apply(base, state))["w"]["kernel"])
    assert merged.dtype == np.float64
    np.testing.assert_allclose(merged, w, rtol=0, atol=1e-12)


def test_dropout_against_numpy_and_its_errors():
  x = jnp.asarray(np.random.default_rng(2).standard_normal((4, 7)), jnp.float32)
  key = jax.random.key(3)
  keep = np.asarray(jax.random.bernoulli(key, 0.75, x.shape))
  expected = np.where(keep, np.asarray(x, np.float64) / 0.75, 0.0)
  np.testing.assert_allclose(np.asarray(structured.dropout(x, 0.25, key, False)), expected,
                             rtol=1e-6)
  np.testing.assert_array_equal(structured.dropout(x, 0.25, key, True), x)
  np.testing.assert_array_equal(structured.dropout(x, 0.0, None, False), x)
  with pytest.raises(ValueError, match="needs an `rng` key"):
    structured.dropout(x, 0.25, None, False)


def test_dropout_with_one_rate_per_example():
  """Rates (B,) act along the batch axis: each row is dropped at its own rate (numpy keep-mask
  drawn independently per row's rate), rate 0 rows pass unchanged; a (B,) rate of another
  length is refused."""
  x = jnp.ones((3, 4000), jnp.float32)
  rates = np.array([0.0, 0.5, 0.9])
  out = np.asarray(structured.dropout(x, jnp.asarray(rates), jax.random.key(4), False))
  np.testing.assert_array_equal(out[0], 1.0)
  for i in (1, 2):
    np.testing.assert_allclose(out[i][out[i] != 0.0], 1.0 / (1.0 - rates[i]), rtol=1e-5)
    assert abs(np.mean(out[i] == 0.0) - rates[i]) < 0.03
  assert abs(out[1:].mean() - 1.0) < 0.05   # inverted dropout keeps the mean
  # A scalar array rate is the float rate (same keep-mask for the same key).
  np.testing.assert_array_equal(structured.dropout(x, jnp.asarray(0.3), jax.random.key(5), False),
                                structured.dropout(x, 0.3, jax.random.key(5), False))
  with pytest.raises(ValueError, match=r"one rate per example \(3,\), got shape \(2,\)"):
    structured.dropout(x, jnp.asarray([0.1, 0.2]), jax.random.key(4), False)


def test_lowrank_branch_dropout_is_on_the_branch_input_only():
  """y = x@W + s·(drop(x)@a)@b with the same mask; no key: deterministic (no dropout)."""
  w, a, b = _numpy_factors(np.float32)
  x = np.random.default_rng(4).standard_normal((3, D_IN)).astype(np.float32)
  key = jax.random.key(5)
  keep = np.asarray(jax.random.bernoulli(key, 0.5, x.shape))
  f64 = lambda v: np.asarray(v, np.float64)
  dropped = np.where(keep, f64(x) / 0.5, 0.0)
  weight = lj.LowRank(jnp.asarray(w), jnp.asarray(a), jnp.asarray(b), SCALE, dropout_key=key,
                      dropout_rate=0.5)
  np.testing.assert_allclose(np.asarray(structured.dense(jnp.asarray(x), weight)),
                             f64(x) @ f64(w) + SCALE * dropped @ f64(a) @ f64(b), rtol=1e-5,
                             atol=1e-5)
  no_key = weight.replace(dropout_key=None)
  np.testing.assert_allclose(np.asarray(structured.dense(jnp.asarray(x), no_key)),
                             f64(x) @ (f64(w) + SCALE * f64(a) @ f64(b)), rtol=1e-5, atol=1e-5)


def test_diag_lowrank_vector_scale_matches_dense_formula():
  """A vector d (SORSA's singular values) in the factored matmul, conv and embed products."""
  rng = np.random.default_rng(6)
  d = rng.standard_normal(R).astype(np.float32)
  f64 = lambda v: np.asarray(v, np.float64)
  w, a, b = _numpy_factors(np.float32)
  weight = sorsa_lib.SORSAWeight(jnp.asarray(w), jnp.asarray(a), jnp.asarray(d), jnp.asarray(b),
                                 SCALE)
  dense_w = f64(w) + SCALE * (f64(a) * f64(d)) @ f64(b)
  x = rng.standard_normal((3, D_IN)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(structured.dense(jnp.asarray(x), weight)), f64(x) @ dense_w,
                             rtol=1e-5, atol=1e-5)
  ids = jnp.asarray([0, 5, 2])
  np.testing.assert_allclose(np.asarray(structured.embed(ids, weight)), dense_w[np.asarray(ids)],
                             rtol=1e-5, atol=1e-5)
  kw = rng.standard_normal((3, 3, 2, 4)).astype(np.float32)
  ka = rng.standard_normal((3, 3, 2, R)).astype(np.float32)
  kb = rng.standard_normal((R, 4)).astype(np.float32)
  conv_weight = sorsa_lib.SORSAWeight(jnp.asarray(kw), jnp.asarray(ka), jnp.asarray(d),
                                      jnp.asarray(kb), SCALE)
  img = jnp.asarray(rng.standard_normal((1, 5, 5, 2)), jnp.float32)
  dense_k = jnp.asarray(f64(kw) + SCALE * np.tensordot(f64(ka) * f64(d), f64(kb), axes=1),
                        jnp.float32)
  np.testing.assert_allclose(np.asarray(structured.conv(img, conv_weight)),
                             np.asarray(structured.conv(img, dense_k)), rtol=1e-4, atol=1e-4)
