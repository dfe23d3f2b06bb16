"""Intrinsic dimension: Fastfood vs explicit H G Π H B, dense/sparse projections, targets,
partition, errors; contract cases."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax import testing
from lowrank_jax import tree as tree_lib
from lowrank_jax.adapters import intrinsic as intr


def _explicit_p(state, sizes):
  """The D×d projection as an explicit dense matrix, rows in sorted-path order."""
  frozen = state.frozen
  d = state.trainable["theta"].shape[0]
  paths = sorted(sizes)
  if frozen.fastfood is not None:
    return intr.fastfood_matrix(frozen.fastfood, sum(sizes.values()), d)
  per_leaf = tree_lib.unnest(frozen.leaves)
  blocks = []
  for p in paths:
    blk = per_leaf[p]
    if isinstance(blk, intr.DenseLeaf):
      blocks.append(np.asarray(blk.p, np.float64))
    else:
      m = np.zeros((sizes[p], d))
      np.add.at(m, (np.asarray(blk.rows), np.asarray(blk.cols)), np.asarray(blk.vals))
      blocks.append(m)
  return np.concatenate(blocks, 0)


def subspace_ref(base, state):
  """θ = θ₀ + P θ_d, sliced back into the covered leaves (sorted paths)."""
  flat = dict(tree_lib.flatten_with_names(base)[0])
  covered = sorted(tree_lib.unnest(state.frozen.leaves))
  sizes = {p: int(np.prod(flat[p].shape)) for p in covered}
  v = _explicit_p(state, sizes) @ np.asarray(state.trainable["theta"], np.float64)
  out, off = {}, 0
  for p in covered:
    out[p] = flat[p] + jnp.asarray(v[off:off + sizes[p]], jnp.float32).reshape(flat[p].shape)
    off += sizes[p]
  return out


CONTRACT_CASES = [
    dict(name=f"intrinsic_{proj}", make=(lambda proj=proj: intr.intrinsic_dimension(96, proj)),
         dense_ref=subspace_ref, learn_lr=0.05, learn_ratio=0.6)
    for proj in ("dense", "fastfood")
]


def test_sparse_projection_dense_reference_and_roundtrip():
  ad = intr.intrinsic_dimension(96, "sparse")
  testing.check_identity_at_init(ad)
  testing.check_dense_reference(ad, subspace_ref)
  testing.check_merge_roundtrip(ad)


def _partition():
  return lj.partition(
      {"sub": intr.intrinsic_dimension(32, "fastfood"), "lora": lj.lora(2, 2.0)},
      lambda p, x: "lora" if p == "dense_1/kernel" else "sub" if p.startswith("dense") else None)


def _partition_ref(base, s):
  lora = s.trainable["lora"]["dense_1"]["kernel"]
  return {**subspace_ref(base, lj.AdapterState(s.trainable["sub"], s.frozen["sub"])),
          "dense_1/kernel": lj.merge(base)["dense_1"]["kernel"]
          + jnp.tensordot(lora.a, lora.b, axes=1)}


def test_partition_hides_leaves():
  """Leaves hidden by `partition` (Excluded) are neither covered nor counted in D."""
  ad = _partition()
  base, state = ad.init(jax.random.key(0), testing.tiny_params())
  covered = sorted(tree_lib.unnest(state.frozen["sub"].leaves))
  assert covered == ["dense_0/bias", "dense_0/kernel", "dense_1/bias"]
  assert state.frozen["sub"].fastfood.b.shape == (64,)                  # D = 56 -> L = 64
  testing.check_identity_at_init(ad)
  testing.check_dense_reference(ad, _partition_ref)
  testing.check_merge_roundtrip(ad)


def test_fwht_is_hadamard():
  x = jax.random.normal(jax.random.key(0), (3, 16))
  i = np.arange(16)
  h = np.array([[(-1.0) ** bin(a & b).count("1") for b in i] for a in i])
  np.testing.assert_allclose(intr.fwht(x), np.asarray(x) @ h.T, atol=1e-5)
  with pytest.raises(ValueError, match="power of two"):
    intr.fwht(jnp.ones(12))


def test_fastfood_equals_explicit_matrix():
  params = {"a": jax.random.normal(jax.random.key(0), (5, 7)), "b": jnp.zeros(4)}   # D = 39
  ad = intr.intrinsic_dimension(6, "fastfood")
  base, state = ad.init(jax.random.key(1), params)
  assert base is params
  ff = state.frozen.fastfood
  assert ff.b.shape == ff.perm.shape == ff.g.shape == (64,)              # L = 2^ceil(log2 39)
  theta = jax.random.normal(jax.random.key(2), (6,))
  v = intr.fastfood_project(theta, ff, 39)
  # Explicit H G Π H B built entry by entry from its definition.
  L = 64
  h = np.array([[(-1.0) ** bin(a & c).count("1") for c in range(L)] for a in range(L)])
  pi = np.zeros((L, L))
  pi[np.arange(L), np.asarray(ff.perm)] = 1.0
  g = np.asarray(ff.g, np.float64)
  vmat = h @ np.diag(g) @ pi @ h @ np.diag(np.asarray(ff.b, np.float64))
  vmat = vmat[:39, :6] / (math.sqrt(L * np.sum(g * g)) * math.sqrt(39 / L))
  np.testing.assert_allclose(v, vmat @ np.asarray(theta), atol=1e-5)
  np.testing.assert_allclose(np.mean(np.linalg.norm(vmat, axis=0) ** 2), 1.0, atol=0.3)
  out = ad.apply(base, lj.AdapterState({"theta": theta}, state.frozen))
  np.testing.assert_allclose(out["a"].ravel(), params["a"].ravel() + v[:35], atol=1e-6)
  np.testing.assert_allclose(out["b"], v[35:], atol=1e-6)


def test_fastfood_state_independent_of_d():
  params = testing.tiny_params()
  sizes = []
  for d in (8, 256):
    _, state = intr.intrinsic_dimension(d, "fastfood").init(jax.random.key(0), params)
    sizes.append(tree_lib.tree_size(state.frozen))
    assert lj.count_params(state) == d
  assert sizes[0] == sizes[1] == 3 * 512


def test_dense_and_sparse_columns_unit_norm_globally():
  params = testing.tiny_params()
  d_total = sum(x.size for x in jax.tree_util.tree_leaves(params))
  for proj in ("dense", "sparse"):
    _, state = intr.intrinsic_dimension(20, proj).init(jax.random.key(0), params)
    flat = dict(tree_lib.flatten_with_names(params)[0])
    p = _explicit_p(state, {k: int(np.prod(v.shape)) for k, v in flat.items()})
    assert p.shape == (d_total, 20)
    np.testing.assert_allclose(np.linalg.norm(p, axis=0), 1.0, rtol=1e-5)
  # Sparse: per-leaf density 1/sqrt(D_leaf), stored as COO only.
  _, state = intr.intrinsic_dimension(20, "sparse").init(jax.random.key(0), params)
  blk = state.frozen.leaves["dense_0"]["kernel"]
  assert blk.rows.dtype == jnp.int32 and blk.rows.shape == blk.vals.shape
  assert blk.rows.shape[0] == round(48 * 20 / math.sqrt(48))


def test_targets_and_untouched_leaves():
  params = testing.tiny_params()
  ad = intr.intrinsic_dimension(8, "dense", targets=r"dense_\d/kernel")
  base, state = ad.init(jax.random.key(0), params)
  state = testing.perturb(state, jax.random.key(1))
  out = ad.apply(base, state)
  assert out["embed"]["embedding"] is params["embed"]["embedding"]
  assert out["dense_0"]["bias"] is params["dense_0"]["bias"]
  assert not np.allclose(out["dense_0"]["kernel"], params["dense_0"]["kernel"])
  assert sorted(tree_lib.unnest(state.frozen.leaves)) == ["dense_0/kernel", "dense_1/kernel"]


def test_errors():
  with pytest.raises(ValueError, match="d must be an int >= 1"):
    intr.intrinsic_dimension(0)
  with pytest.raises(ValueError, match="projection"):
    intr.intrinsic_dimension(4, "gaussian")
  with pytest.raises(ValueError, match=r"density=2.0 must be in \(0, 1\]"):
    intr.intrinsic_dimension(4, "sparse", density=2.0)
  with pytest.raises(ValueError, match=r"d=600 exceeds the Fastfood block size L=512"):
    intr.intrinsic_dimension(600, "fastfood").init(jax.random.key(0), testing.tiny_params())
  with pytest.raises(ValueError, match="matches no parameter path"):
    intr.intrinsic_dimension(4, targets="nothing").init(jax.random.key(0), testing.tiny_params())
