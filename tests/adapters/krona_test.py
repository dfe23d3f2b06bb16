"""KronA / DiffuseKronA: jnp.kron convention, vec trick, counts, errors; contract cases."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax import testing
from lowrank_jax import tree as tree_lib
from lowrank_jax.adapters import krona as krona_lib

ALL = list(testing.TINY_PATHS)
DENSE = ["dense_0/kernel", "dense_1/kernel"]



def kron_ref(scale):
  """W' = W + s·kron(a, b) on the (d_in, d_out) matricization."""
  def ref(base, state):
    out = {}
    for path, t in tree_lib.unnest(state.trainable).items():
      w = testing.merged_leaf(base, path)
      out[path] = w + scale * jnp.kron(t.a, t.b).reshape(w.shape)
    return out
  return ref


CONTRACT_CASES = [
    dict(name="krona_auto", make=lambda: krona_lib.krona(targets=ALL, kernel_axes="conv",
                                                         scale=0.5),
         dense_ref=kron_ref(0.5)),
]


@pytest.mark.parametrize("init", krona_lib.INITS)
def test_explicit_factors_dense_reference(init):
  testing.check_dense_reference(krona_lib.diffusekrona(2, 2, DENSE, init=init), kron_ref(1.0))


def test_vec_trick_matches_jnp_kron():
  k = jax.random.split(jax.random.key(0), 4)
  a = jax.random.normal(k[0], (3, 4))
  b = jax.random.normal(k[1], (5, 2))
  base = jax.random.normal(k[2], (15, 8))
  x = jax.random.normal(k[3], (2, 7, 15))
  w = krona_lib.Kron(base, a, b, 0.7)
  dense = base + 0.7 * jnp.kron(a, b)
  np.testing.assert_allclose(lj.merge({"w": w})["w"], dense, atol=1e-5)
  np.testing.assert_allclose(lj.ops.dense(x, w), x @ dense, atol=1e-4)
  ids = jnp.array([[0, 4, 14], [7, 9, 2]])
  np.testing.assert_allclose(lj.ops.embed(ids, w), dense[ids], atol=1e-5)
  # Card layout: ΔW_pt = A ⊗ B with A = aᵀ (a1 × a2), B = bᵀ.
  np.testing.assert_allclose(jnp.kron(a.T, b.T), jnp.kron(a, b).T, atol=1e-6)


def test_training_step_never_forms_delta():
  """The jitted gradient of the factored product has no (d_in, d_out)-sized intermediate."""
  a = jnp.ones((4, 8))
  b = jnp.zeros((16, 12))
  base = jnp.zeros((64, 96))
  x = jnp.ones((5, 64))
  def loss(ab, base):
    return jnp.sum(lj.ops.dense(x, krona_lib.Kron(base, ab[0], ab[1], 1.0)) ** 2)
  hlo = jax.jit(jax.grad(loss)).lower((a, b), base).as_text()
  produced = [ln for ln in hlo.splitlines() if "func.func" not in ln and
              ("-> tensor<64x96" in ln or "-> tensor<96x64" in ln)]
  assert not produced, produced


def test_param_count_formula():
  params = testing.tiny_params()
  _, state = krona_lib.krona(2, 3, ["dense_0/kernel"]).init(jax.random.key(0), params)
  a1, a2, d_in, d_out = 2, 3, 6, 8
  assert lj.count_params(state) == a1 * a2 + (d_out // a1) * (d_in // a2)
  big = {"w": jnp.zeros((640, 640))}
  _, state = krona_lib.diffusekrona(targets="w").init(jax.random.key(0), big)
  assert lj.count_params(state) == 64 * 8 + 10 * 80 == 1312
  t = state.trainable["w"]
  assert t.a.shape == (8, 64) and t.b.shape == (80, 10)
  assert float(jnp.abs(t.b).max()) == 0.0                         # ΔW = 0 at init
  np.testing.assert_allclose(float(jnp.std(t.a)), 1 / 64, rtol=0.1)   # std 1/a1


def test_balanced_factorization():
  assert krona_lib.balanced_factor(384) == 16
  assert krona_lib.balanced_factor(1536) == 32
  assert krona_lib.balanced_factor(13) == 1
  assert krona_lib.balanced_factor(64) == 8


def test_errors():
  params = testing.tiny_params()
  with pytest.raises(ValueError, match=r"a1=5 does not divide d_out=8 .*valid a1: \[1, 2, 4, 8\]"):
    krona_lib.krona(5, None, ["dense_0/kernel"]).init(jax.random.key(0), params)
  with pytest.raises(ValueError, match=r"a2=4 does not divide d_in=6"):
    krona_lib.krona(None, 4, ["dense_0/kernel"]).init(jax.random.key(0), params)
  with pytest.raises(ValueError, match="a1 must be None or an int"):
    krona_lib.krona(0)
  with pytest.raises(ValueError, match="init"):
    krona_lib.krona(init="zeros")


@pytest.mark.parametrize("impl", krona_lib.KRON_IMPLS)
@pytest.mark.parametrize("shapes", [((3, 4), (5, 2)), ((2, 6), (4, 1)), ((4, 4), (3, 3))])
def test_kron_kernels_match_dense_and_finite_differences(impl, shapes):
  """Every factored kernel equals x @ jnp.kron(a, b), and its hand-written VJP passes float64
  finite differences."""
  from jax.test_util import check_grads
  (a_in, a_out), (b_in, b_out) = shapes
  with testing.enable_x64():
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (6, a_in * b_in), jnp.float64)
    a = jax.random.normal(k[1], (a_in, a_out), jnp.float64)
    b = jax.random.normal(k[2], (b_in, b_out), jnp.float64)
    f = jax.jit(lambda x, a, b: krona_lib.kron_matmul(x, a, b, impl))
    np.testing.assert_allclose(f(x, a, b), x @ jnp.kron(a, b), rtol=1e-12, atol=1e-12)
    check_grads(f, (x, a, b), order=1, modes=["rev"])


def test_auto_kernel_choice():
  # Balanced MiniLM factors swap; DiffuseKronA's b_out = 6 on d_out = 384 expands a instead.
  assert krona_lib.kron_impl((16, 16), (24, 24)) == "swap_in"
  assert krona_lib.kron_impl((16, 32), (24, 48)) == "swap_in"
  assert krona_lib.kron_impl((32, 16), (48, 24)) == "swap_out"
  assert krona_lib.kron_impl((8, 64), (48, 6)) == "expand"
  assert krona_lib.kron_impl((8, 64), (48, 24)) == "swap_out"
  with pytest.raises(ValueError, match="impl"):
    krona_lib.krona(impl="dense")
