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


def _hand_reg(a, b):
  r = a.shape[-1]
  a2, b2 = np.asarray(a, np.float64).reshape(-1, r), np.asarray(b, np.float64).reshape(r, -1)
  return (np.linalg.norm(a2.T @ a2 - np.eye(r), "fro")
          + np.linalg.norm(b2 @ b2.T - np.eye(r), "fro"))


def test_penalty_value_and_gamma():
  params = testing.tiny_params()
  ad = sorsa_lib.sorsa(3, targets=DENSE)
  _, state = ad.init(jax.random.key(0), params)
  state = testing.perturb(state, jax.random.key(1), scale=0.2)
  regs = [_hand_reg(t.a, t.b) for t in tree_lib.unnest(state.trainable).values()]
  assert sorsa_lib.DEFAULT_GAMMA == 4e-4
  np.testing.assert_allclose(float(ad.penalty(state)), 4e-4 * np.mean(regs), rtol=1e-4)
  ad2 = sorsa_lib.sorsa(3, targets=DENSE, gamma=1e-3, base_lr=2e-5)
  np.testing.assert_allclose(float(ad2.penalty(state)), 1e-3 / 2e-5 * np.mean(regs), rtol=1e-4)
  assert float(sorsa_lib.sorsa(3, targets=DENSE, gamma=0.0).penalty(state)) == 0.0


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
