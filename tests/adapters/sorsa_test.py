"""SORSA: principal split, orthonormal regularizer and γ, counts, errors; contract cases."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax import testing
from lowrank_jax import tree as tree_lib
from lowrank_jax.adapters import sorsa as sorsa_lib

ALL = list(testing.TINY_PATHS)
DENSE = ["dense_0/kernel", "dense_1/kernel"]



def sorsa_ref(scale):
  """W' = W_r + s·V_p diag(S_p) U_pᵀ in the (d_in, d_out) layout (= (s·U_p Σ_p V_pᵀ)ᵀ)."""
  def ref(base, state):
    out = {}
    for path, t in tree_lib.unnest(state.trainable).items():
      w = testing.merged_leaf(base, path)
      r = t.s.shape[0]
      v_p = t.a.reshape(-1, r)                  # (d_in, r)
      u_p = t.b.reshape(r, -1).T                # (d_out, r)
      dw_pt = scale * u_p @ jnp.diag(t.s) @ v_p.T
      out[path] = w + dw_pt.T.reshape(w.shape)
    return out
  return ref


CONTRACT_CASES = [
    dict(name="sorsa", make=lambda: sorsa_lib.sorsa(2, 4.0, ALL, kernel_axes="conv"),
         dense_ref=sorsa_ref(2.0)),
]


def _official_ortho_loss(state):
  """The official `calc_ortho`, in float64 numpy and the official layout: sorsa_A (r, d_in) = aᵀ,
  sorsa_B (d_out, r) = bᵀ; Σ ‖AAᵀ − I‖_F + Σ ‖BᵀB − I‖_F over all matrices / their number."""
  loss, den = 0.0, 0
  for t in tree_lib.unnest(state.trainable).values():
    r = t.s.shape[0]
    sorsa_a = np.asarray(t.a, np.float64).reshape(-1, r).T
    sorsa_b = np.asarray(t.b, np.float64).reshape(r, -1).T
    loss += np.linalg.norm(sorsa_a @ sorsa_a.T - np.eye(r), "fro")
    loss += np.linalg.norm(sorsa_b.T @ sorsa_b - np.eye(r), "fro")
    den += 2
  return loss / den


def test_penalty_is_official_ortho_loss_times_gamma_over_lr():
  params = testing.tiny_params()
  _, state = sorsa_lib.sorsa(3, targets=ALL, kernel_axes="conv").init(jax.random.key(0), params)
  state = testing.perturb(state, jax.random.key(1), scale=0.2)
  ortho = _official_ortho_loss(state)
  assert sorsa_lib.DEFAULT_GAMMA == 4e-4
  # The official trainer back-propagates (gamma / learning_rate) * calc_ortho(model).
  ad = sorsa_lib.sorsa(3, targets=ALL, kernel_axes="conv", base_lr=3e-5)
  np.testing.assert_allclose(float(ad.penalty(state)), 4e-4 / 3e-5 * ortho, rtol=1e-5)
  ad2 = sorsa_lib.sorsa(3, targets=ALL, kernel_axes="conv", gamma=1e-3, base_lr=2e-5)
  np.testing.assert_allclose(float(ad2.penalty(state)), 1e-3 / 2e-5 * ortho, rtol=1e-5)
  ad3 = sorsa_lib.sorsa(3, targets=ALL, kernel_axes="conv")          # no base_lr: weight γ
  np.testing.assert_allclose(float(ad3.penalty(state)), 4e-4 * ortho, rtol=1e-5)
  assert float(sorsa_lib.sorsa(3, targets=DENSE, gamma=0.0).penalty(state)) == 0.0


def test_penalty_float64_matches_official_formula():
  with testing.enable_x64():
    params = testing.tiny_params(dtype=jnp.float64)
    ad = sorsa_lib.sorsa(3, targets=DENSE, base_lr=1e-2, dtype=jnp.float64)
    _, state = ad.init(jax.random.key(0), params)
    state = testing.perturb(state, jax.random.key(1), scale=0.2)
    np.testing.assert_allclose(float(ad.penalty(state)), 4e-4 / 1e-2 * _official_ortho_loss(state),
                               rtol=1e-12)


def test_init_is_principal_svd_and_orthonormal():
  params = testing.tiny_params()
  ad = sorsa_lib.sorsa(2, targets=DENSE)
  base, state = ad.init(jax.random.key(0), params)
  w = params["dense_0"]["kernel"]
  t = state.trainable["dense_0"]["kernel"]
  s_true = np.linalg.svd(np.asarray(w), compute_uv=False)
  np.testing.assert_allclose(t.s, s_true[:2], rtol=1e-5)
  np.testing.assert_allclose(base["dense_0"]["kernel"] + (t.a * t.s) @ t.b, w, atol=1e-5)
  # Residual = the remaining singular directions.
  np.testing.assert_allclose(np.linalg.svd(np.asarray(base["dense_0"]["kernel"]),
                                           compute_uv=False)[:4], s_true[2:], atol=1e-5)
  assert float(ad.penalty(state)) < 1e-8
  # The non-squared norm has a finite (zero) gradient at exact orthonormality.
  g = jax.grad(lambda a: sorsa_lib.orthonormal_regularizer(a, jnp.eye(2)))(jnp.eye(3, 2))
  assert np.all(np.isfinite(g)) and float(jnp.abs(g).max()) == 0.0
  # PiSSA (the comparator) holds the same principal part at init.
  _, ps = lj.pissa(2, 2.0, DENSE).init(jax.random.key(0), params)
  f = ps.trainable["dense_0"]["kernel"]
  np.testing.assert_allclose(f.a @ f.b, (t.a * t.s) @ t.b, atol=1e-5)


def test_param_count_formula():
  params = testing.tiny_params()
  _, state = sorsa_lib.sorsa(3, targets=ALL, kernel_axes="conv").init(jax.random.key(0), params)
  dims = [(13, 6), (27, 4), (6, 8), (8, 6)]
  assert lj.count_params(state) == sum(3 * (i + o + 1) for i, o in dims)


def test_errors():
  with pytest.raises(ValueError, match="rank"):
    sorsa_lib.sorsa(0)
  with pytest.raises(ValueError, match="gamma"):
    sorsa_lib.sorsa(2, gamma=-1.0)
  with pytest.raises(ValueError, match="base_lr"):
    sorsa_lib.sorsa(2, base_lr=0.0)
  with pytest.raises(ValueError, match="alpha"):
    sorsa_lib.sorsa(2, alpha=0.0)
  with pytest.raises(ValueError, match=r"valid ranks are 1..6"):
    sorsa_lib.sorsa(7, targets=DENSE).init(jax.random.key(0), testing.tiny_params())
