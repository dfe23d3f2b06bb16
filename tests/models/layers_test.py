"""Shared model layers (`lowrank_jax.models._layers`): attention against the softmax formula."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax.models import _layers as L

B, T, H, D = 2, 5, 3, 4


def _qkv_mask():
  q, k, v = (jax.random.normal(jax.random.key(i), (B, T, H, D)) for i in range(3))
  valid = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  return q, k, v, valid[:, None, None, :]


def _reference(q, k, v, mask, keep=None, rate=0.0):
  """softmax(q·kᵀ/√D) over unmasked keys (numpy, float64), optional inverted-dropout mask."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(D)
  logits = np.where(np.asarray(mask), logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  if keep is not None:
    p = np.where(np.asarray(keep), p / (1.0 - rate), 0.0)
  return np.einsum("bhts,bshd->bthd", p, v)


def test_attention_without_dropout_is_the_softmax_formula():
  q, k, v, mask = _qkv_mask()
  ref = _reference(q, k, v, mask)
  np.testing.assert_allclose(L.attention(q, k, v, mask), ref, atol=1e-5)
  # rate 0 or deterministic: the same (fast) path, no key needed.
  np.testing.assert_allclose(L.attention(q, k, v, mask, dropout_rate=0.0, deterministic=False),
                             ref, atol=1e-5)
  np.testing.assert_allclose(L.attention(q, k, v, mask, dropout_rate=0.5), ref, atol=1e-5)


def test_attention_dropout_drops_probabilities():
  q, k, v, mask = _qkv_mask()
  rate, rng = 0.3, jax.random.key(7)
  out = L.attention(q, k, v, mask, dropout_rate=rate, rng=rng, deterministic=False)
  keep = jax.random.bernoulli(rng, 1.0 - rate, (B, H, T, T))
  np.testing.assert_allclose(out, _reference(q, k, v, mask, keep, rate), atol=1e-5)
  # Inverted dropout is unbiased: the mean over many keys approaches the deterministic output.
  keys = jax.random.split(jax.random.key(8), 1000)
  mean = jax.vmap(lambda r: L.attention(q, k, v, mask, dropout_rate=rate, rng=r,
                                        deterministic=False))(keys).mean(0)
  np.testing.assert_allclose(mean, _reference(q, k, v, mask), atol=0.06)
  with pytest.raises(ValueError, match="rng"):
    L.attention(q, k, v, mask, dropout_rate=rate, deterministic=False)


def test_attention_dropout_with_one_rate_per_example():
  """Per-example rates (B,) (Self-Tuning Networks) drop each example's probabilities at its own
  rate; rate 0 leaves that example's attention exact."""
  q, k, v, mask = _qkv_mask()
  rates, rng = np.array([0.0, 0.4], np.float32), jax.random.key(9)
  out = L.attention(q, k, v, mask, dropout_rate=jnp.asarray(rates), rng=rng, deterministic=False)
  r4 = rates[:, None, None, None]
  keep = np.asarray(jax.random.bernoulli(rng, 1.0 - r4, (B, H, T, T)))
  np.testing.assert_allclose(out, _reference(q, k, v, mask, keep, r4), atol=1e-5)
  np.testing.assert_allclose(out[0], _reference(q, k, v, mask)[0], atol=1e-5)


def test_materialized_cotangent_is_the_identity_both_ways():
  x = jax.random.normal(jax.random.key(0), (2, 3, 4))
  g = jax.random.normal(jax.random.key(1), (2, 3, 4))
  for dtype in (jnp.float32, jnp.bfloat16):
    y, vjp = jax.vjp(L.materialized_cotangent, x.astype(dtype))
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(x.astype(dtype), np.float32))
    (dx,) = vjp(g.astype(dtype))
    assert dx.dtype == dtype
    np.testing.assert_array_equal(np.asarray(dx, np.float32), np.asarray(g.astype(dtype), np.float32))
  # Inside a gradient: d/dx sum(w * f(x)) = w, with f the identity.
  w = jnp.arange(24.0).reshape(2, 3, 4)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(w * L.materialized_cotangent(jnp.sin(x)))))(x)
  np.testing.assert_allclose(grad, np.asarray(w) * np.cos(np.asarray(x)), rtol=1e-6)


def test_materialized_cotangent_forward_mode_is_the_identity():
  x = jax.random.normal(jax.random.key(0), (2, 3, 4))
  t = jax.random.normal(jax.random.key(1), (2, 3, 4))
  for dtype in (jnp.float32, jnp.bfloat16):
    y, ty = jax.jvp(L.materialized_cotangent, (x.astype(dtype),), (t.astype(dtype),))
    assert ty.dtype == dtype
    np.testing.assert_array_equal(np.asarray(ty, np.float32), np.asarray(t.astype(dtype), np.float32))
  # Forward over the composite: d/dx sin(x) along t = cos(x) t.
  jac = jax.jit(jax.jacfwd(lambda v: L.materialized_cotangent(jnp.sin(v))))(x[0, 0])
  np.testing.assert_allclose(jac, np.diag(np.cos(np.asarray(x[0, 0]))), rtol=1e-6)


def test_materialized_cotangent_non_finite_fills_its_column_with_nan():
  g = np.ones((2, 3, 4), np.float32)
  g[1, 2, 1] = np.nan
  g[0, 0, 3] = np.inf
  g[0, 1, 0] = 1e30  # large but finite: the float32 column sum does not overflow
  _, vjp = jax.vjp(L.materialized_cotangent, jnp.zeros((2, 3, 4)))
  (dx,) = vjp(jnp.asarray(g))
  assert np.isnan(np.asarray(dx)[..., [1, 3]]).all()
  np.testing.assert_array_equal(np.asarray(dx)[..., [0, 2]], g[..., [0, 2]])
  # bf16 cotangents: the column sum runs in float32, so 4096 tokens of 60000 do not overflow it.
  big = jnp.full((4096, 2), 6e4, jnp.bfloat16)
  _, vjp = jax.vjp(L.materialized_cotangent, jnp.zeros_like(big))
  np.testing.assert_array_equal(np.asarray(vjp(big)[0], np.float32), np.asarray(big, np.float32))


def test_cast_floats_keeps_ints_and_structure():
  from lowrank_jax import structured
  tree = {"k": structured.LowRank(jnp.ones((3, 2)), jnp.ones((3, 1)), jnp.ones((1, 2)), 0.5),
          "ids": jnp.arange(3), "b": jnp.zeros((2,))}
  out = L.cast_floats(tree, "bfloat16")
  assert out["k"].base.dtype == out["k"].a.dtype == out["b"].dtype == jnp.bfloat16
  assert out["ids"].dtype == jnp.int32 and out["k"].scale == 0.5
