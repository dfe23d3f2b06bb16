"""LoLDU: pivots, LDU reconstruction, parameter count, errors; contract cases (see contract_test)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax import testing
from lowrank_jax import tree as tree_lib
from lowrank_jax.adapters import loldu as loldu_lib

ALL = list(testing.TINY_PATHS)
DENSE = ["dense_0/kernel", "dense_1/kernel"]



def loldu_ref(sigma0):
  """W' = W_res + σ·P L_r diag(z) U_r in PyTorch layout, with an explicit permutation matrix."""
  def ref(base, state):
    out = {}
    frozen = tree_lib.unnest(state.frozen)
    for path, t in tree_lib.unnest(state.trainable).items():
      f = frozen[path]
      w = testing.merged_leaf(base, path)
      r = t.z.shape[0]
      d_out = f.l.shape[0]
      perm_matrix = jnp.eye(d_out)[:, f.perm]            # P[perm[i], i] = 1
      u_r = f.ut.reshape(-1, r).T                         # (r, d_in)
      sigma = sigma0 if t.sigma is None else t.sigma
      dw_pt = sigma * perm_matrix @ f.l @ jnp.diag(t.z) @ u_r
      out[path] = w + dw_pt.T.reshape(w.shape)
    return out
  return ref


CONTRACT_CASES = [
    dict(name="loldu", make=lambda: loldu_lib.loldu(2, 1.0, ALL, kernel_axes="conv"),
         dense_ref=loldu_ref(0.5), learn_ratio=0.9, learn_lr=0.3),
]


def test_train_sigma_dense_reference_and_grads():
  make = lambda: loldu_lib.loldu(3, 3.0, DENSE, train_sigma=True, init="normal")
  testing.check_dense_reference(make(), loldu_ref(None))
  testing.check_grads_f64(make)


def test_pivots_index_vector_and_ldu_reconstructs():
  w = jax.random.normal(jax.random.key(0), (7, 5))
  perm, l, d, u = loldu_lib.pivoted_ldu(w)
  assert perm.dtype == jnp.int32 and perm.shape == (7,)
  assert sorted(np.asarray(perm).tolist()) == list(range(7))
  p = np.eye(7)[:, np.asarray(perm)]
  np.testing.assert_allclose(p @ l @ np.diag(d) @ u, w, atol=1e-5)
  np.testing.assert_allclose(np.diag(np.asarray(u)[:, :5]), 1.0, atol=1e-6)   # unit upper
  np.testing.assert_allclose(np.diag(np.asarray(l)[:5]), 1.0)                 # unit lower
  # Same factorization as scipy (partial pivoting): |L| <= 1.
  assert np.abs(np.asarray(l)).max() <= 1.0 + 1e-6


def test_state_holds_leading_pivots_and_count():
  params = testing.tiny_params()
  ad = loldu_lib.loldu(3, 1.0, DENSE)
  base, state = ad.init(jax.random.key(0), params)
  assert lj.count_params(state) == 3 * len(DENSE)                        # r per layer
  assert lj.count_params(loldu_lib.loldu(3, train_sigma=True, targets=DENSE)
                         .init(jax.random.key(0), params)[1]) == 4 * len(DENSE)
  w = params["dense_0"]["kernel"]
  perm, l, d, u = loldu_lib.pivoted_ldu(w.T)
  st = state.trainable["dense_0"]["kernel"]
  fr = state.frozen["dense_0"]["kernel"]
  np.testing.assert_allclose(st.z, d[:3], rtol=1e-6)
  np.testing.assert_array_equal(fr.perm, perm)
  assert fr.perm.dtype == jnp.int32 and fr.perm.ndim == 1
  # No dense permutation matrix anywhere in the state.
  assert all(x.shape != (8, 8) for x in jax.tree_util.tree_leaves(state))
  # The base is the residual: W_res = W − σ P L_r D_r U_r.
  resid = w.T - 1.0 / 3 * np.eye(8)[:, np.asarray(perm)] @ l[:, :3] @ np.diag(d[:3]) @ u[:3]
  np.testing.assert_allclose(base["dense_0"]["kernel"], resid.T, atol=1e-5)


def test_every_init_is_identity_at_init():
  for init in ("normal", "zeros"):
    testing.check_identity_at_init(loldu_lib.loldu(2, 1.0, DENSE, init=init))


def test_errors():
  with pytest.raises(ValueError, match="rank"):
    loldu_lib.loldu(0)
  with pytest.raises(ValueError, match="alpha"):
    loldu_lib.loldu(2, alpha=-1.0)
  with pytest.raises(ValueError, match="init"):
    loldu_lib.loldu(2, init="svd")
  with pytest.raises(ValueError, match=r"rank=7 > min\(d_in, d_out\)=6"):
    loldu_lib.loldu(7, targets=DENSE).init(jax.random.key(0), testing.tiny_params())
