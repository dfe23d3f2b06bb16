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
