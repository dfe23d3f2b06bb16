"""NOLA: state = coefficients + seed, deterministic regenerated bases, counts, errors; contract cases."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax import testing
from lowrank_jax import tree as tree_lib
from lowrank_jax.adapters import nola as nola_lib

ALL = list(testing.TINY_PATHS)
DENSE = ["dense_0/kernel", "dense_1/kernel"]



def _threefry_bank(seed, stream, n, shape):
  key = jax.random.fold_in(jax.random.key(seed), stream)
  return jax.random.uniform(key, (n,) + shape, jnp.float32, -1.0, 1.0)


def nola_ref(rank, scale, variant="lm", generator="hash"):
  """W' = W + s·A B with A = A₀ + (1/√k)Σα_i A_i, B = (1/√l)Σβ_j B_j ("lm"), or the NOLA2 sums."""
  def bank(seed, stream, n, shape):
    if generator == "threefry":
      return _threefry_bank(seed, stream, n, shape)
    return nola_lib.basis_bank(seed, stream, n, shape)

  def ref(base, state):
    out = {}
    frozen = tree_lib.unnest(state.frozen)
    for path, t in tree_lib.unnest(state.trainable).items():
      w = testing.merged_leaf(base, path)
      seed = frozen[path].seed
      d_in = math.prod(w.shape[:-1])
      d_out = w.shape[-1]
      k, l = t.alpha.shape[0], t.beta.shape[0]
      bases_a = bank(seed, 1, k, (d_in, rank))
      bases_b = bank(seed, 2, l, (rank, d_out))
      if variant == "lm":
        a0 = bank(seed, 0, 1, (d_in, rank))[0] / math.sqrt(d_in)
        a = a0 + sum(t.alpha[i] * bases_a[i] for i in range(k)) / math.sqrt(k)
        b = sum(t.beta[j] * bases_b[j] for j in range(l)) / math.sqrt(l)
      else:
        a = sum(t.alpha[i] * bases_a[i] for i in range(k)) / math.sqrt(d_in)
        b = sum(t.beta[j] * bases_b[j] for j in range(l)) / math.sqrt(rank)
      out[path] = w + scale * (a @ b).reshape(w.shape)
    return out
  return ref


CONTRACT_CASES = [
    dict(name="nola", make=lambda: nola_lib.nola(6, 5, 2, 4.0, ALL, kernel_axes="conv"),
         dense_ref=nola_ref(2, 2.0), learn_ratio=0.7, learn_lr=0.05),
]


def test_vit_variant_dense_reference_not_identity():
  """NOLA2: ΔW ≠ 0 at init (α_i = 1/k, β_j = 1/l), scale 1/r."""
  ad = nola_lib.nola(8, 8, 1, None, DENSE, variant="vit")
  testing.check_dense_reference(ad, nola_ref(1, 1.0, variant="vit"))
  params = testing.tiny_params()
  base, state = ad.init(jax.random.key(0), params)
  np.testing.assert_allclose(state.trainable["dense_0"]["kernel"].alpha, 1 / 8)
  assert not np.allclose(lj.merge(ad.apply(base, state))["dense_0"]["kernel"],
                         params["dense_0"]["kernel"])


def test_threefry_generator_dense_reference():
  ad = nola_lib.nola(4, 4, 2, None, DENSE, generator="threefry", shared_bases=True, seed=7)
  testing.check_dense_reference(ad, nola_ref(2, 1.0, generator="threefry"))


def test_state_is_coefficients_and_seed_only():
  params = testing.tiny_params()
  _, state = nola_lib.nola(32, 16, 4, targets=ALL, kernel_axes="conv").init(
      jax.random.key(0), params)
  assert lj.count_params(state) == (32 + 16) * len(ALL)                 # k + l per target
  for t in jax.tree_util.tree_leaves(state.trainable):
    assert t.shape in ((32,), (16,))
  frozen = jax.tree_util.tree_leaves(state.frozen)
  assert len(frozen) == len(ALL)
  assert all(f.shape == () and f.dtype == jnp.uint32 for f in frozen)
  seeds = {int(f) for f in frozen}
  assert len(seeds) == len(ALL)                                         # per-path seeds differ


def test_shared_bases_and_fixed_seed():
  params = testing.tiny_params()
  _, s1 = nola_lib.nola(4, 4, 2, targets=DENSE, shared_bases=True).init(jax.random.key(0), params)
  assert len({int(f) for f in jax.tree_util.tree_leaves(s1.frozen)}) == 1
  _, s2 = nola_lib.nola(4, 4, 2, targets=DENSE, seed=3).init(jax.random.key(0), params)
  _, s3 = nola_lib.nola(4, 4, 2, targets=DENSE, seed=3).init(jax.random.key(9), params)
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool(a == b), s2.frozen,
                                                       s3.frozen))


def test_regenerated_bases_are_deterministic_uniform():
  seed = jnp.uint32(12345)
  b1 = nola_lib.basis_bank(seed, 1, 64, (32, 8))
  b2 = jax.jit(nola_lib.basis_bank, static_argnums=(1, 2, 3))(seed, 1, 64, (32, 8))
  np.testing.assert_array_equal(b1, b2)
  assert not np.allclose(b1, nola_lib.basis_bank(jnp.uint32(12346), 1, 64, (32, 8)))
  assert not np.allclose(b1, nola_lib.basis_bank(seed, 2, 64, (32, 8)))
  x = np.asarray(b1).ravel()
  assert -1.0 <= x.min() and x.max() < 1.0
  assert abs(x.mean()) < 0.02 and abs(x.var() - 1 / 3) < 0.01
  # Bases are (nearly) uncorrelated.
  flat = np.asarray(b1).reshape(64, -1)
  corr = np.corrcoef(flat)[np.triu_indices(64, 1)]
  assert np.abs(corr).max() < 0.25


def test_chunked_combine_matches_whole_bank(monkeypatch):
  """The hash path contracts the bases chunk by chunk (a scan plus a remainder chunk); forward and
  VJP equal the contraction with the whole materialized bank."""
  monkeypatch.setattr(nola_lib, "_CHUNK_ELEMS", 3 * 40)       # 3 bases of 40 elements per chunk
  seed, shape, n = jnp.uint32(7), (5, 8), 11                   # 3 full chunks + 2 left over
  assert nola_lib._chunks(n, 40) == (3, 3)
  coeffs = jax.random.normal(jax.random.key(1), (n,))
  g = jax.random.normal(jax.random.key(2), shape)
  bank = nola_lib.basis_bank(seed, 1, n, shape)
  out, vjp = jax.vjp(lambda c: nola_lib.combine(c, seed, 1, shape, "hash"), coeffs)
  np.testing.assert_allclose(out, jnp.tensordot(coeffs, bank, axes=1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(vjp(g)[0], bank.reshape(n, -1) @ g.reshape(-1), rtol=1e-5,
                             atol=1e-5)


def test_identity_at_init_and_delta_zero():
  params = testing.tiny_params()
  ad = nola_lib.nola(8, 8, 2, targets=DENSE)
  base, state = ad.init(jax.random.key(0), params)
  w = ad.apply(base, state)["dense_0"]["kernel"]
  a, b = nola_lib.nola_factors(w.alpha, w.beta, w.seed, 6, 8, 2)
  assert float(jnp.abs(b).max()) == 0.0 and float(jnp.abs(a).max()) > 0   # A₀ ≠ 0, B = 0


def test_errors():
  for kw, field in [(dict(k=0), "k"), (dict(l=-1), "l"), (dict(rank=0), "rank"),
                    (dict(variant="gpt"), "variant"), (dict(generator="philox"), "generator"),
                    (dict(seed=-1), "seed"), (dict(alpha=0.0), "alpha")]:
    with pytest.raises(ValueError, match=field):
      nola_lib.nola(**kw)
