"""CorDA tests: the gauge-invariant identity in PyTorch orientation, KPA/IPA component choice,
damping on degenerate covariance, and errors."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax import calibrate
from lowrank_jax import testing
from lowrank_jax import tree as tree_lib
from lowrank_jax.adapters.corda import corda, corda_decompose, damped_inverse, damping_used

DENSE = ["dense_0/kernel", "dense_1/kernel"]

_CONTRACT_STATS: dict = {}


def contract_stats(params):
  """Stats of the tiny model for the contract table, memoized on the params' bytes (the table
  asks for them in every check; collecting compiles the model once per dtype)."""
  leaves = jax.tree_util.tree_leaves(params)
  key = tuple((np.asarray(x).dtype.str, np.asarray(x).tobytes()) for x in leaves)
  if key not in _CONTRACT_STATS:
    _CONTRACT_STATS[key] = calibrate.collect(testing.tiny_apply, params, [testing.tiny_batch()],
                                             DENSE)
  return _CONTRACT_STATS[key]


def _stats(params=None, n=3):
  params = testing.tiny_params() if params is None else params
  batches = [testing.tiny_batch(jax.random.key(40 + i)) for i in range(n)]
  return calibrate.collect(testing.tiny_apply, params, batches, DENSE)


def _projector(m, r, top):
  """Projector on the top/bottom r right singular vectors of m, via eigh of mᵀm (fp64)."""
  evals, evecs = np.linalg.eigh(m.T @ m)        # ascending
  k = min(m.shape)
  order = np.argsort(evals)[::-1][:k]           # the k meaningful directions, descending
  sel = order[:r] if top else order[k - r:k]
  v = evecs[:, sel]
  return v @ v.T


@pytest.mark.parametrize("mode, gauge", [("ipa", "official"), ("kpa", "official"),
                                         ("kpa", "balanced")])
def test_gauge_invariant_identity_pytorch_orientation(mode, gauge):
  params = testing.tiny_params()
  stats = _stats(params)
  r, alpha = 2, 3.0
  ad = corda(r, alpha, DENSE, mode=mode, gauge=gauge)
  base, state = ad.init(jax.random.key(0), params, stats)
  deltas = damping_used(state)
  for path in DENSE:
    f = tree_lib.unnest(state.trainable)[path]
    s = alpha / r
    # PyTorch orientation: W (d_out, d_in), B = bᵀ (d_out, r), A = aᵀ (r, d_in).
    w_t = np.asarray(dict(tree_lib.flatten_with_names(params)[0])[path], np.float64).T
    b_t = np.asarray(f.b, np.float64).T
    a_t = np.asarray(f.a, np.float64).T
    c = np.asarray(tree_lib.unnest(stats)[path].cov, np.float64)
    ct = c + deltas[path] * np.mean(np.diag(c)) * np.eye(c.shape[0])
    p_r = _projector(w_t @ ct, r, top=(mode == "ipa"))
    expected = w_t @ ct @ p_r @ np.linalg.inv(ct)
    np.testing.assert_allclose(s * b_t @ a_t, expected, rtol=2e-4, atol=2e-5)
    if gauge == "balanced":
      np.testing.assert_allclose(np.linalg.norm(a_t, axis=1), np.linalg.norm(b_t, axis=0),
                                 rtol=1e-4)
    else:   # official: B = U_r √S_r has orthogonal columns of norm √S_i (PEFT lora_B).
      g = b_t.T @ b_t
      np.testing.assert_allclose(g - np.diag(np.diag(g)), 0.0, atol=1e-5)
    # Frozen residual + adapter == W.
    res = np.asarray(dict(tree_lib.flatten_with_names(base)[0])[path], np.float64).T
    np.testing.assert_allclose(res + s * b_t @ a_t, w_t, atol=1e-5)
  merged = lj.merge(ad.apply(base, state))
  testing.assert_close(merged, params, scale=5)


def test_kpa_keeps_top_components_frozen_ipa_takes_them():
  params = testing.tiny_params()
  stats = _stats(params)
  r = 2
  for mode in ("kpa", "ipa"):
    ad = corda(r, targets=DENSE, mode=mode)
    base, state = ad.init(jax.random.key(0), params, stats)
    deltas = damping_used(state)
    for path in DENSE:
      w = np.asarray(dict(tree_lib.flatten_with_names(params)[0])[path], np.float64)
      res = np.asarray(dict(tree_lib.flatten_with_names(base)[0])[path], np.float64)
      f = tree_lib.unnest(state.trainable)[path]
      c = np.asarray(tree_lib.unnest(stats)[path].cov, np.float64)
      ct = c + deltas[path] * np.mean(np.diag(c)) * np.eye(c.shape[0])
      k = min(w.shape)
      sv_all = np.linalg.svd(ct @ w, compute_uv=False)          # = singular values of W·C̃
      sv_res = np.linalg.svd(ct @ res, compute_uv=False)
      sv_ad = np.linalg.svd(ct @ (np.asarray(f.a, np.float64) @ np.asarray(f.b, np.float64)),
                            compute_uv=False)[:r]
      if mode == "kpa":
        # Residual keeps the k - r largest; the adapter holds the r smallest.
        np.testing.assert_allclose(sv_res[:k - r], sv_all[:k - r], rtol=1e-4)
        np.testing.assert_allclose(np.sort(sv_ad), np.sort(sv_all[k - r:]), rtol=1e-3, atol=1e-5)
        # and the residual's top subspace is W·C̃'s top subspace.
        p_all = _projector(w.T @ ct, k - r, top=True)
        p_res = _projector(res.T @ ct, k - r, top=True)
        np.testing.assert_allclose(p_res, p_all, atol=1e-4)
      else:
        np.testing.assert_allclose(sv_ad, sv_all[:r], rtol=1e-4)
        np.testing.assert_allclose(sv_res[:k - r], sv_all[r:], rtol=1e-4, atol=1e-5)


def test_degenerate_covariance_is_damped_finite():
  params = testing.tiny_params()
  # Two tokens only: rank-2 covariance in d_in=6 and 8.
  batch = dict(testing.tiny_batch())
  batch["ids"] = batch["ids"][:1, :2]
  batch["images"] = batch["images"][:1]
  stats = calibrate.collect(testing.tiny_apply, params, [batch], DENSE)
  assert np.linalg.matrix_rank(np.asarray(stats["dense_1"]["kernel"].cov)) <= 2
  for mode in ("ipa", "kpa"):
    ad = corda(3, targets=DENSE, mode=mode)
    base, state = ad.init(jax.random.key(0), params, stats)
    jax.tree_util.tree_map(lambda x: np.testing.assert_(np.all(np.isfinite(x))), state)
    assert all(d >= 0.0099 for d in damping_used(state).values())
    testing.assert_close(lj.merge(ad.apply(base, state)), params, scale=20)
  # Rank-1 covariance of a large-scale input: damping has to grow past 0.01.
  x = np.zeros((8,), np.float32)
  x[0] = 1e3
  c = np.outer(x, x) + 1e-12 * np.eye(8, dtype=np.float32)
  _, cinv, delta, err = damped_inverse(jnp.asarray(c))
  assert err < 0.05 and np.all(np.isfinite(np.asarray(cinv))) and delta >= 0.01
  dec = corda_decompose(params["dense_1"]["kernel"], c, 2, "kpa")
  assert np.all(np.isfinite(np.asarray(dec.a))) and np.all(np.isfinite(np.asarray(dec.b)))


def test_stats_as_flat_dict_of_matrices():
  params = testing.tiny_params()
  stats = _stats(params)
  flat = {p: s.cov for p, s in tree_lib.unnest(stats).items()}
  ad = corda(2, targets=DENSE, mode="ipa")
  _, s1 = ad.init(jax.random.key(0), params, stats)
  _, s2 = ad.init(jax.random.key(0), params, flat)
  testing.assert_close(s1.trainable, s2.trainable)


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="middle"), "mode"),
    (dict(rank=0), "rank"),
    (dict(damping=0.0), "damping"),
    (dict(gauge="left"), "gauge"),
])
def test_factory_errors(kwargs, match):
  args = dict(rank=2, targets=DENSE)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    corda(**args)


def test_init_errors():
  params = testing.tiny_params()
  with pytest.raises(ValueError, match="calibration stats missing"):
    corda(2, targets=DENSE).init(jax.random.key(0), params)
  bad = {"dense_0/kernel": jnp.eye(5), "dense_1/kernel": jnp.eye(8)}
  with pytest.raises(ValueError, match=r"dense_0/kernel.*\(6, 6\)"):
    corda(2, targets=DENSE).init(jax.random.key(0), params, bad)
  zero = {"dense_0/kernel": jnp.zeros((6, 6)), "dense_1/kernel": jnp.eye(8)}
  with pytest.raises(ValueError, match="no calibration signal"):
    corda(2, targets=DENSE).init(jax.random.key(0), params, zero)
  with pytest.raises(ValueError, match="rank=7"):
    corda(7, targets=DENSE).init(jax.random.key(0), params, _stats(params))
