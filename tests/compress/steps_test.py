"""MoDeGPT's module steps against float64 numpy/scipy re-derivations on small random matrices."""
import numpy as np
import pytest
import scipy.linalg

from lowrank_jax.compress import steps


def _acts(n, d, seed=0):
  """Correlated random rows (n, d) and their correlation XᵀX / n."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.5 + rng.normal(size=d)
  return x, x.T @ x / n


def test_ridge_leverage_scores_match_the_eigen_form():
  _, c = _acts(50, 7)
  lam = 0.3 * np.mean(np.diag(c))
  vals, vecs = np.linalg.eigh(c)
  want = (vecs ** 2) @ (vals / (vals + lam))        # diag(U diag(λ_j/(λ_j+λ)) Uᵀ)
  np.testing.assert_allclose(steps.ridge_leverage_scores(c, 0.3), want, rtol=1e-10)


@pytest.mark.parametrize("d_inner,d_out", [(12, 5), (6, 9)])   # wide and tall down projections
def test_nystrom_down_is_least_squares_on_the_activations(d_inner, d_out):
  h, c = _acts(40, d_inner, seed=1)
  w = np.random.default_rng(2).normal(size=(d_inner, d_out))
  idx = steps.nystrom_select(c, 4, 1e-2)
  assert len(idx) == 4 and np.all(np.diff(idx) > 0)
  # min_W ‖H_S W − H W_D‖ solved on the rows themselves.
  want = np.linalg.lstsq(h[:, idx], h @ w, rcond=None)[0]
  np.testing.assert_allclose(steps.nystrom_down(c, idx, w), want, rtol=1e-7, atol=1e-9)
  # Every column kept: exact.
  full = steps.nystrom_select(c, d_inner, 1e-2)
  np.testing.assert_allclose(steps.nystrom_down(c, full, w), w, rtol=1e-8, atol=1e-9)


def test_nystrom_select_keeps_the_largest_leverage():
  _, c = _acts(60, 8, seed=3)
  c[:, 2] *= 1e-3
  c[2, :] *= 1e-3          # column 2 carries almost no energy: dropped first
  assert 2 not in steps.nystrom_select(c, 7, 1e-2)


def test_cr_scores_are_column_norms_of_the_square_roots():
  _, cq = _acts(30, 6, seed=4)
  _, ck = _acts(30, 6, seed=5)
  rq, rk = np.real(scipy.linalg.sqrtm(cq)), np.real(scipy.linalg.sqrtm(ck))
  want = np.linalg.norm(rq, axis=0) * np.linalg.norm(rk, axis=0)
  np.testing.assert_allclose(steps.cr_scores(cq, ck), want, rtol=1e-6)


def test_cr_pair_scores_ignore_rotations_within_a_pair():
  _, cq = _acts(30, 8, seed=6)
  _, ck = _acts(30, 8, seed=7)
  rq, rk = np.real(scipy.linalg.sqrtm(cq)), np.real(scipy.linalg.sqrtm(ck))
  pairs = [(j, j + 4) for j in range(4)]
  want = [np.linalg.norm(rq[:, p]) * np.linalg.norm(rk[:, p]) for p in pairs]
  np.testing.assert_allclose(steps.cr_pair_scores(cq, ck), want, rtol=1e-6)
  # A rotate-half RoPE rotation (angle per pair) of the queries leaves the scores unchanged.
  ang = np.random.default_rng(8).uniform(0, 6, size=4)
  rot = np.zeros((8, 8))
  for j, a in enumerate(ang):
    rot[np.ix_([j, j + 4], [j, j + 4])] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
  np.testing.assert_allclose(steps.cr_pair_scores(rot.T @ cq @ rot, ck),
                             steps.cr_pair_scores(cq, ck), rtol=1e-10)


@pytest.mark.parametrize("group", [1, 2])
def test_svd_value_output_is_the_weighted_optimum(group):
  d, dh, keep = 10, 6, 3
  x, c = _acts(80, d, seed=9)
  rng = np.random.default_rng(10)
  wv, wo = rng.normal(size=(d, dh)), rng.normal(size=(group, dh, d))
  target = x @ wv @ np.concatenate(list(wo), 1)                     # (n, G·d)
  new_v, new_o = steps.svd_value_output(c, wv, wo, keep, ridge=1e-12)
  assert new_v.shape == (d, keep) and new_o.shape == (group, keep, d)
  got = x @ new_v @ np.concatenate(list(new_o), 1)
  # Eckart–Young on the activations themselves: the best rank-k error is the tail of the
  # singular values of X W_V W_O.
  sig = np.linalg.svd(target, compute_uv=False)
  np.testing.assert_allclose(np.sum((target - got) ** 2), np.sum(sig[keep:] ** 2), rtol=1e-6)
  # Full rank: exact (with a non-trivial ridge too).
  fv, fo = steps.svd_value_output(c, wv, wo, dh, ridge=1e-2)
  np.testing.assert_allclose(fv @ np.concatenate(list(fo), 1), wv @ np.concatenate(list(wo), 1),
                             rtol=1e-8, atol=1e-10)


def test_allocate_sparsity_softmax_cap_and_mean():
  s = np.array([0.5, 0.1, 0.05, 0.02])
  got = steps.allocate_sparsity(s, 0.3, 0.15, 0.8)
  w = np.exp(-s / 0.15) / np.exp(-s / 0.15).sum()
  np.testing.assert_allclose(got, 4 * 0.3 * w, rtol=1e-12)          # no cap reached
  capped = steps.allocate_sparsity(s, 0.5, 0.05, 0.6)
  assert capped.max() <= 0.6 + 1e-12 and abs(capped.mean() - 0.5) < 1e-12
  np.testing.assert_allclose(steps.allocate_sparsity(np.full(3, 0.2), 0.4, 0.1, 0.8), 0.4)


@pytest.mark.parametrize("kw,match", [
    (dict(ratio=0.9), "ratio must be in"), (dict(ratio=-0.1), "ratio must be in"),
    (dict(cap=1.0), "cap must be in"), (dict(temperature=0.0), "temperature must be")])
def test_allocate_sparsity_refuses_bad_arguments(kw, match):
  args = dict(ratio=0.3, temperature=0.1, cap=0.8) | kw
  with pytest.raises(ValueError, match=match):
    steps.allocate_sparsity(np.ones(3), **args)


def test_keep_out_of_range_is_refused():
  _, c = _acts(20, 4)
  with pytest.raises(ValueError, match=r"keep must be in \[1, 4\]"):
    steps.nystrom_select(c, 0, 1e-2)
  with pytest.raises(ValueError, match=r"keep must be in \[1, 3\]"):
    steps.svd_value_output(c, np.ones((4, 3)), np.ones((1, 3, 4)), 4, 1e-4)
