"""Decomposition-based inits on awkward weights: finite adapters, exact merge, or a clear error.

Every method here promises `merge(apply(init(W))) == W` (the principal part moved into the adapter
is subtracted from the residual, or the adapter starts at ΔW = 0). Checked against the original
numpy weights, on zero, rank-deficient, ill-conditioned, repeated-singular-value, tiny-pivot and
bf16 weights, at small and full rank. Tolerance: max |W' - W| <= TOL[dtype] * (1 + max |W|),
TOL = 1e-5 for float32 (a few ulps of the SVD/LU round trip), 1e-2 for bfloat16 (the residual is
stored in bf16: 2 ulps at 8 mantissa bits).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax import structured
from lowrank_jax.adapters.corda import corda
from lowrank_jax.adapters.flora import flora
from lowrank_jax.adapters.loldu import loldu
from lowrank_jax.adapters.lora import pissa
from lowrank_jax.adapters.sorsa import sorsa

D_IN, D_OUT = 8, 6
PATH = "layer/kernel"
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}

MAKERS = {
    "pissa": lambda r: pissa(r, targets=PATH),
    "sorsa": lambda r: sorsa(r, targets=PATH),
    "loldu": lambda r: loldu(r, targets=PATH),
    "corda_ipa": lambda r: corda(r, targets=PATH, mode="ipa"),
    "corda_kpa": lambda r: corda(r, targets=PATH, mode="kpa"),
    "flora": lambda r: flora(r, targets=PATH),
}
DECOMPOSING = ["pissa", "sorsa", "loldu", "corda_ipa", "corda_kpa"]   # read W's values at init


def orthonormal(n, seed):
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
  return q


def with_singular_values(sv):
  """A (D_IN, D_OUT) weight U diag(sv) V^T with random orthonormal U, V."""
  u, v = orthonormal(D_IN, 1)[:, :D_OUT], orthonormal(D_OUT, 2)
  return (u * np.asarray(sv, float)) @ v.T


def tiny_pivot():
  w = np.random.default_rng(3).normal(size=(D_IN, D_OUT))
  w[0, 0] = 1e-30          # the first LU pivot, unless the decomposition pivots
  w[:, 0] *= 1e-20         # a whole column (a row of W^T) of tiny entries
  return w


WEIGHTS = {
    "zero": np.zeros((D_IN, D_OUT)),
    "rank_one": np.outer(np.arange(1.0, D_IN + 1), np.linspace(-1, 1, D_OUT)),
    "rank_deficient": with_singular_values([3, 2, 0, 0, 0, 0]),
    "ill_conditioned": with_singular_values(np.logspace(0, -7, D_OUT)),
    "repeated_singular_values": with_singular_values([2, 2, 2, 1, 1, 1]),
    "tiny_pivot": tiny_pivot(),
    "large_scale": 1e4 * np.random.default_rng(4).normal(size=(D_IN, D_OUT)),
}


def covariance(d_in):
  x = np.random.default_rng(5).normal(size=(64, d_in))
  return {PATH: jnp.asarray(x.T @ x / 64, jnp.float32)}


def init_and_merge(method, rank, w, dtype):
  params = {"layer": {"kernel": jnp.asarray(w, dtype)}}
  ad = MAKERS[method](rank)
  base, state = ad.init(jax.random.key(0), params, covariance(w.shape[0]))
  merged = structured.merge(ad.apply(base, state))["layer"]["kernel"]
  return state, np.asarray(merged, np.float64)


def assert_finite_and_exact(state, merged, w, dtype):
  for leaf in jax.tree.leaves(state):
    assert np.all(np.isfinite(np.asarray(leaf, np.float64))), "non-finite adapter state"
  w_in = np.asarray(jnp.asarray(w, dtype), np.float64)      # what the method was handed
  err = np.max(np.abs(merged - w_in))
  bound = TOL[dtype] * (1 + np.max(np.abs(w_in)))
  assert err <= bound, f"max |W' - W| = {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("rank", [2, D_OUT], ids=["rank2", "full_rank"])
@pytest.mark.parametrize("weight", sorted(WEIGHTS))
@pytest.mark.parametrize("method", sorted(MAKERS))
def test_merge_of_init_is_the_weight_float32(method, weight, rank):
  state, merged = init_and_merge(method, rank, WEIGHTS[weight], jnp.float32)
  assert_finite_and_exact(state, merged, WEIGHTS[weight], jnp.float32)


@pytest.mark.parametrize("weight", ["rank_deficient", "ill_conditioned", "large_scale"])
@pytest.mark.parametrize("method", sorted(MAKERS))
def test_merge_of_init_is_the_weight_bfloat16(method, weight):
  state, merged = init_and_merge(method, 2, WEIGHTS[weight], jnp.bfloat16)
  assert_finite_and_exact(state, merged, WEIGHTS[weight], jnp.bfloat16)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("method", DECOMPOSING)
def test_non_finite_weight_refused_naming_the_path(method, bad):
  w = np.random.default_rng(6).normal(size=(D_IN, D_OUT))
  w[2, 3] = bad
  with pytest.raises(ValueError, match=r"the weight at layer/kernel \(shape \(8, 6\)\) has 1 "
                                       r"NaN/Inf entries; a decomposition init needs a finite "
                                       r"weight"):
    init_and_merge(method, 2, w, jnp.float32)
