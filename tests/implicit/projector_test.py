"""Differentiable CorDA: kept-subspace projector (gap-only CG backward) and corda_delta."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax.implicit import (AdjointConfig, AdjointDiagnostics, corda_delta,
                                  damped_covariance, kept_subspace_projector)
from lowrank_jax.implicit.testing import check_implicit_grad

D_IN, D_OUT, R, DAMP = 10, 12, 3, 0.05
CFG = AdjointConfig(tol=1e-13, on_nonconvergence="raise")


def _data(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(200, D_IN)) * np.linspace(0.5, 2.0, D_IN)
  c = x.T @ x / 200
  w = rng.normal(size=(D_IN, D_OUT))
  target = rng.normal(size=(D_IN, D_OUT))
  return jnp.asarray(w), jnp.asarray(c), jnp.asarray(target), rng


def _with_spectrum(c, sig, rng):
  """A (d_in, d_out) kernel whose W_m C~ (at damping DAMP) has singular values `sig`."""
  ct = np.asarray(damped_covariance(c, DAMP))
  u, _ = np.linalg.qr(rng.normal(size=(D_OUT, D_OUT)))
  v, _ = np.linalg.qr(rng.normal(size=(D_IN, D_IN)))
  wm = u[:, :D_IN] @ np.diag(sig) @ v.T @ np.linalg.inv(ct)
  return jnp.asarray(wm.T)


def eigh_delta(w, c, r, damping):
  """The naive version: eigh autodiff of the kept eigenvectors."""
  ct = damped_covariance(c, damping)
  ctw = ct @ w
  _, vecs = jnp.linalg.eigh(ctw @ ctw.T)
  v = vecs[:, -r:]
  return jnp.linalg.solve(ct, v @ v.T @ ctw)


def _fd(f, x, eps=1e-5):
  return (float(f(x + eps)) - float(f(x - eps))) / (2 * eps)


def test_layout_matches_svd_factors():
  """Delta W0 (d_in, d_out) = (U_r S_r V_r^T C~^{-1})^T, the CorDA/PEFT product B A."""
  w, c, _, _ = _data()
  ct = np.asarray(damped_covariance(c, DAMP))
  u, s, vt = np.linalg.svd(np.asarray(w).T @ ct)
  ba = u[:, :R] @ np.diag(s[:R]) @ vt[:R] @ np.linalg.inv(ct)        # (d_out, d_in)
  np.testing.assert_allclose(corda_delta(w, c, R, "ipa", DAMP, CFG), ba.T, atol=1e-10)
  bak = u[:, D_IN - R:D_IN] @ np.diag(s[D_IN - R:]) @ vt[D_IN - R:] @ np.linalg.inv(ct)
  np.testing.assert_allclose(corda_delta(w, c, R, "kpa", DAMP, CFG), bak.T, atol=1e-10)
  full = corda_delta(w, c, D_IN, "ipa", DAMP, CFG)
  np.testing.assert_allclose(full, w, atol=1e-10)


@pytest.mark.parametrize("mode", ["ipa", "kpa"])
def test_separated_spectrum_matches_fd_and_eigh(mode):
  w, c, target, _ = _data()
  loss = lambda d: jnp.sum((corda_delta(w, c, R, mode, d, CFG) - target) ** 2)
  g = float(jax.grad(loss)(DAMP))
  fd = _fd(loss, DAMP)
  assert abs(g - fd) <= 1e-6 * max(1.0, abs(fd)), (g, fd)
  if mode == "ipa":
    g_eigh = float(jax.grad(lambda d: jnp.sum((eigh_delta(w, c, R, d) - target) ** 2))(DAMP))
    assert abs(g - g_eigh) <= 1e-9 * max(1.0, abs(g))
  # Gradients with respect to the kernel and the covariance, along random directions.
  check_implicit_grad(
      lambda p: jnp.sum((corda_delta(p["w"], p["c"] @ p["c"].T, R, mode, DAMP, CFG)
                         - target) ** 2),
      {"w": w, "c": jnp.linalg.cholesky(c)}, eps=1e-6, rtol=1e-6, atol=1e-8, num_directions=3)


def test_repeated_singular_value_inside_kept_block():
  """sigma = 5, 5, 3 | 1, ...: implicit matches FD; eigh autodiff is silently wrong."""
  w, c, target, rng = _data()
  w = _with_spectrum(c, np.array([5., 5., 3., 1., .8, .6, .5, .4, .3, .2]), rng)
  loss = lambda d: jnp.sum((corda_delta(w, c, R, "ipa", d, CFG) - target) ** 2)
  loss_eigh = lambda d: jnp.sum((eigh_delta(w, c, R, d) - target) ** 2)
  fd = _fd(loss, DAMP)
  g = float(jax.grad(loss)(DAMP))
  g_eigh = float(jax.grad(loss_eigh)(DAMP))
  assert abs(g - fd) <= 1e-6 * max(1.0, abs(fd)), (g, fd)
  assert abs(loss(DAMP) - loss_eigh(DAMP)) < 1e-10           # same forward value ...
  assert not (abs(g_eigh - fd) <= 1e-3 * abs(fd)), (g_eigh, fd)  # ... wrong eigh gradient
  # Same under jit, and the adjoint diagnostics report a converged solve and a healthy gap.
  g_jit, diag = jax.jit(jax.grad(
      lambda d, p: jnp.sum((corda_delta(w, c, R, "ipa", d, CFG, diagnostics=p) - target) ** 2),
      argnums=(0, 1)))(DAMP, AdjointDiagnostics.zeros())
  assert abs(float(g_jit) - g) < 1e-10
  assert float(diag.converged) == 1.0 and float(diag.residual) < 1e-12
  assert float(diag.gap) > 0.1


def test_projector_grad_with_degenerate_blocks_and_vmap():
  rng = np.random.default_rng(3)
  q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
  lam = np.array([4., 4., 4., 1., 1., .5])          # repeated inside both blocks
  g0 = jnp.asarray(q @ np.diag(lam) @ q.T)
  t = jnp.asarray(rng.normal(size=(6, 6)))
  f = lambda g: jnp.sum(kept_subspace_projector(g, 3, "largest", CFG) * t)
  check_implicit_grad(f, g0, eps=1e-6, rtol=1e-6, atol=1e-8, num_directions=3)
  fs = lambda g: jnp.sum(kept_subspace_projector(g, 3, "smallest", CFG) * t)
  # Here P_smallest(3) = I - P_largest(3): the (checked) gradients must be opposite.
  np.testing.assert_allclose(jax.grad(f)(g0), -jax.grad(fs)(g0), atol=1e-10)
  batch = jnp.stack([g0, g0 + 0.1 * jnp.eye(6)])
  gb = jax.jit(jax.vmap(jax.grad(f)))(batch)
  np.testing.assert_allclose(gb[0], jax.grad(f)(g0), atol=1e-10)


def test_closing_gap_is_reported_not_returned_as_garbage():
  w, c, target, rng = _data()
  w = _with_spectrum(c, np.array([5., 4., 3., 3. - 1e-12, .8, .6, .5, .4, .3, .2]), rng)
  loss = lambda d, p=None, cfg=CFG: jnp.sum(
      (corda_delta(w, c, R, "ipa", d, cfg, diagnostics=p) - target) ** 2)
  # Default policy for the projector: raise, naming the gap.
  with pytest.raises(Exception, match="eigengap at the rank cut"):
    jax.block_until_ready(jax.grad(loss)(DAMP))
  with pytest.raises(Exception, match="did not converge"):
    jax.block_until_ready(jax.jit(jax.grad(loss))(DAMP))
  # Flagged, NaN-free result with "ignore" / "warn".
  quiet = AdjointConfig(tol=1e-13, maxiter=50, on_nonconvergence="ignore")
  g, diag = jax.grad(lambda d, p: loss(d, p, quiet), argnums=(0, 1))(
      DAMP, AdjointDiagnostics.zeros())
  assert np.isfinite(float(g))
  assert float(diag.converged) == 0.0 and float(diag.gap) < 1e-10
  with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    jax.grad(lambda d: loss(d, None, quiet.replace(on_nonconvergence="warn")))(DAMP)
  assert any("eigengap" in str(r.message) for r in rec)
  _, info = kept_subspace_projector(jnp.diag(jnp.array([3., 2., 2.])), 1, return_info=True)
  assert bool(info.well_separated)
  _, info = kept_subspace_projector(jnp.diag(jnp.array([3., 2., 2.])), 2, return_info=True)
  assert not bool(info.well_separated) and float(info.gap) == 0.0


def test_gauge_invariance_and_covariance_mix():
  """Delta W0 does not depend on eigenvector signs/rotations; a covariance mix is differentiable."""
  w, c, target, rng = _data()
  c2 = jnp.asarray(np.cov(rng.normal(size=(300, D_IN)), rowvar=False))
  mixed = lambda beta: corda_delta(w, (1 - beta) * c + beta * c2, R, "ipa", DAMP, CFG)
  loss = lambda beta: jnp.sum((mixed(beta) - target) ** 2)
  g = float(jax.grad(loss)(0.3))
  assert abs(g - _fd(loss, 0.3)) <= 1e-6 * max(1.0, abs(g))
  ct = damped_covariance(c, DAMP)
  ctw = ct @ w
  _, vecs = jnp.linalg.eigh(ctw @ ctw.T)
  v = vecs[:, -R:]
  rot, _ = jnp.linalg.qr(jnp.asarray(rng.normal(size=(R, R))))
  v2 = -(v @ rot)
  np.testing.assert_allclose(jnp.linalg.solve(ct, v2 @ v2.T @ ctw),
                             corda_delta(w, c, R, "ipa", DAMP, CFG), atol=1e-10)


def test_bad_inputs():
  w, c, _, _ = _data()
  with pytest.raises(ValueError, match="mode"):
    corda_delta(w, c, R, "largest")
  with pytest.raises(ValueError, match="d_in"):
    corda_delta(w.T, c, R)
  with pytest.raises(ValueError, match="r must be"):
    kept_subspace_projector(c, 0)
  with pytest.raises(ValueError, match="which"):
    kept_subspace_projector(c, 2, "middle")
  with pytest.raises(ValueError, match="cg"):
    kept_subspace_projector(c, 2, config=AdjointConfig(method="gmres"))
  with pytest.raises(ValueError, match="square"):
    kept_subspace_projector(w, 2)


def _svd_reference(w, c, r, mode, damping):
  """Delta W0 from a dense float64 numpy thin SVD of W_m C~ (the paper's recipe, transposed)."""
  w = np.asarray(w, np.float64)
  c = np.asarray(c, np.float64)
  ct = c + damping * np.mean(np.diag(c)) * np.eye(c.shape[0])
  u, s, vt = np.linalg.svd(w.T @ ct, full_matrices=False)
  kept = slice(0, r) if mode == "ipa" else slice(len(s) - r, len(s))
  return (u[:, kept] @ np.diag(s[kept]) @ vt[kept] @ np.linalg.inv(ct)).T


@pytest.mark.parametrize("mode", ["ipa", "kpa"])
@pytest.mark.parametrize("d_in,d_out", [(12, 8), (10, 10), (8, 12)])
def test_wide_square_and_tall_layers_match_dense_svd_and_fd(d_in, d_out, mode):
  """KPA on a wide layer (d_in > d_out) used to keep structural zeros: Delta W0 ~ 0, no gradient."""
  rng = np.random.default_rng(d_in * 100 + d_out)
  x = rng.normal(size=(200, d_in)) * np.linspace(0.5, 2.0, d_in)
  c = jnp.asarray(x.T @ x / 200)
  w = jnp.asarray(rng.normal(size=(d_in, d_out)))
  target = rng.normal(size=(d_in, d_out))
  ref = _svd_reference(w, c, R, mode, DAMP)
  np.testing.assert_allclose(corda_delta(w, c, R, mode, DAMP, CFG), ref,
                             atol=1e-10 * np.linalg.norm(ref))
  loss = lambda d, p=None: jnp.sum(
      (corda_delta(w, c, R, mode, d, CFG, diagnostics=p) - target) ** 2)
  ref_loss = lambda d: np.sum((_svd_reference(w, c, R, mode, d) - target) ** 2)
  fd = (ref_loss(DAMP + 1e-5) - ref_loss(DAMP - 1e-5)) / 2e-5
  g, diag = jax.grad(loss, argnums=(0, 1))(DAMP, AdjointDiagnostics.zeros())
  assert abs(float(g) - fd) <= 1e-6 * max(1.0, abs(fd)), (float(g), fd)
  assert float(diag.converged) == 1.0 and float(diag.forward_converged) == 1.0
  full = min(d_in, d_out)
  np.testing.assert_allclose(corda_delta(w, c, full, mode, DAMP, CFG),
                             _svd_reference(w, c, full, mode, DAMP), atol=1e-10)


def test_rank_above_the_number_of_singular_values_is_rejected():
  w = jnp.ones((6, 4))
  with pytest.raises(ValueError, match=r"min\(d_in, d_out\)"):
    corda_delta(w, jnp.eye(6), 5)
  with pytest.raises(ValueError, match=r"min\(d_in, d_out\)"):
    corda_delta(w.T, jnp.eye(4), 5)
