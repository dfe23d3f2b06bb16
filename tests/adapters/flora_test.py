"""FLoRA: Tucker reference, factored conv (geometry), counts, errors; contract cases."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax import testing
from lowrank_jax import tree as tree_lib
from lowrank_jax.adapters import flora as flora_lib

ALL = list(testing.TINY_PATHS)



def tucker_ref(scale):
  """W' = W + s·G ×₁ U₁ … ×_N U_N written as one explicit einsum per kernel rank."""
  def ref(base, state):
    out = {}
    for path, t in tree_lib.unnest(state.trainable).items():
      w = testing.merged_leaf(base, path)
      if w.ndim == 2:
        d = jnp.einsum("ij,ai,bj->ab", t.core, *t.factors)
      else:
        d = jnp.einsum("pqio,ap,bq,ci,do->abcd", t.core, *t.factors)
      out[path] = w + scale * d
    return out
  return ref


CONTRACT_CASES = [
    dict(name="flora", make=lambda: flora_lib.flora(2, ALL, kernel_axes="conv", scale=2.0),
         dense_ref=tucker_ref(2.0)),
]


def test_conv_per_mode_ranks_dense_reference():
  ad = flora_lib.flora((2, 1, 3, 2), ["conv/kernel"], kernel_axes="conv")
  testing.check_dense_reference(ad, tucker_ref(1.0))


def _perturbed_tucker(shape, ranks, key, scale=1.5):
  ks = jax.random.split(key, len(shape) + 2)
  core = jax.random.normal(ks[0], ranks)
  factors = tuple(jax.random.normal(k, (n, r)) for k, n, r in zip(ks[1:], shape, ranks))
  base = jax.random.normal(ks[-1], shape)
  return flora_lib.Tucker(base, core, factors, scale, len(shape) - 1)


@pytest.mark.parametrize("kw", [dict(), dict(strides=2, padding="VALID"),
                                dict(strides=(1, 2), padding=((1, 0), (2, 1)), dilation=2)])
def test_factored_conv_matches_dense_conv(kw):
  w = _perturbed_tucker((3, 3, 5, 7), (2, 3, 4, 2), jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (2, 9, 8, 5))
  np.testing.assert_allclose(lj.ops.conv(x, w, **kw), lj.ops.conv(x, w.materialize(), **kw),
                             atol=1e-4, rtol=1e-4)


def test_conv1d_and_grouped_fallback():
  w = _perturbed_tucker((3, 4, 6), (2, 2, 3), jax.random.key(2))
  x = jax.random.normal(jax.random.key(3), (2, 10, 4))
  np.testing.assert_allclose(lj.ops.conv(x, w), lj.ops.conv(x, w.materialize()), atol=1e-4)
  wg = _perturbed_tucker((3, 3, 2, 4), (2, 2, 2, 2), jax.random.key(4))
  xg = jax.random.normal(jax.random.key(5), (1, 6, 6, 4))
  np.testing.assert_allclose(lj.ops.conv(xg, wg, feature_group_count=2),
                             lj.ops.conv(xg, wg.materialize(), feature_group_count=2), atol=1e-4)


def test_dense_branch_never_forms_delta():
  w = _perturbed_tucker((64, 96), (4, 4), jax.random.key(6))
  x = jnp.ones((5, 64))
  def loss(cf, base):
    t = flora_lib.Tucker(base, cf[0], cf[1], 1.0, 1)
    return jnp.sum(lj.ops.dense(x, t) ** 2)
  hlo = jax.jit(jax.grad(loss)).lower((w.core, w.factors), w.base).as_text()
  assert not [ln for ln in hlo.splitlines() if "func.func" not in ln and "-> tensor<64x96" in ln]


def test_param_count_and_init():
  params = testing.tiny_params()
  ad = flora_lib.flora((2, 2, 3, 4), ["conv/kernel"], kernel_axes="conv")
  _, state = ad.init(jax.random.key(0), params)
  dims, ranks = (3, 3, 3, 4), (2, 2, 3, 4)
  assert lj.count_params(state) == sum(n * r for n, r in zip(dims, ranks)) + int(np.prod(ranks))
  _, state = flora_lib.flora(4, ["dense_0/kernel"]).init(jax.random.key(0), params)
  t = state.trainable["dense_0"]["kernel"]
  assert lj.count_params(state) == 4 * 6 + 4 * 8 + 4 * 4               # r_in d_in + r_out d_out + r²
  assert float(jnp.abs(t.core).max()) == 0.0
  big = flora_lib.flora(8, ["w"]).init(jax.random.key(1), {"w": jnp.zeros((512, 512))})[1]
  np.testing.assert_allclose(float(jnp.std(big.trainable["w"].factors[0])), 1 / 4, rtol=0.05)


def test_errors():
  params = testing.tiny_params()
  with pytest.raises(ValueError, match="rank"):
    flora_lib.flora(0)
  with pytest.raises(ValueError, match=r"has 2 entries but conv/kernel has 4 modes"):
    flora_lib.flora((2, 2), ["conv/kernel"], kernel_axes="conv").init(jax.random.key(0), params)
  with pytest.raises(ValueError, match=r"each r_i must be in \[1, n_i\]"):
    flora_lib.flora((4, 2, 2, 2), ["conv/kernel"], kernel_axes="conv").init(
        jax.random.key(0), params)
  with pytest.raises(ValueError, match="kernel axes ambiguous"):
    flora_lib.flora(2, ["conv/kernel"]).init(jax.random.key(0), params)
