"""LoRA / rsLoRA / PiSSA specifics and the core's bad-input errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax import testing
from lowrank_jax import tree as tree_lib

P = testing.tiny_params()


def _factors(state, path):
  return tree_lib.unnest(state.trainable)[path]


def test_lora_init_follows_peft():
  _, state = lj.lora(4, 8.0, ["dense_0/kernel", "embed/embedding"]).init(jax.random.key(0), P)
  f = _factors(state, "dense_0/kernel")
  bound = 1.0 / np.sqrt(6)
  assert f.a.shape == (6, 4) and f.b.shape == (4, 8)
  assert np.all(np.abs(f.a) <= bound) and np.abs(f.a).max() > 0.5 * bound
  assert np.all(f.b == 0)
  e = _factors(state, "embed/embedding")  # PEFT embedding init: A = 0, B ~ N(0, 1)
  assert np.all(e.a == 0) and np.std(e.b) > 0.5


def test_count_params_is_r_times_din_plus_dout():
  _, state = lj.lora(3, targets=["dense_0/kernel", "dense_1/kernel"]).init(jax.random.key(0), P)
  assert lj.count_params(state) == 3 * (6 + 8) + 3 * (8 + 6)


def test_scales():
  for use_rs, expected in [(False, 16.0 / 4), (True, 16.0 / 2)]:
    base, state = lj.lora(4, 16.0, "dense_0/kernel", use_rslora=use_rs).init(jax.random.key(0), P)
    w = lj.lora(4, 16.0, "dense_0/kernel", use_rslora=use_rs).apply(base, state)["dense_0"]["kernel"]
    assert w.scale == pytest.approx(expected)


def test_init_is_order_independent_and_keyed_by_path():
  _, s1 = lj.lora(2, targets=["dense_0/kernel", "dense_1/kernel"]).init(jax.random.key(0), P)
  _, s2 = lj.lora(2, targets=["dense_0/kernel"]).init(jax.random.key(0), P)
  np.testing.assert_array_equal(_factors(s1, "dense_0/kernel").a, _factors(s2, "dense_0/kernel").a)
  assert not np.array_equal(_factors(s1, "dense_0/kernel").a, _factors(s1, "dense_1/kernel").a[:6])


def test_pissa_residual_replaces_base_and_matches_svd():
  base, state = lj.pissa(2, 2.0, "dense_0/kernel").init(jax.random.key(0), P)
  w = P["dense_0"]["kernel"]
  u, s, vt = np.linalg.svd(np.asarray(w), full_matrices=False)
  np.testing.assert_allclose(base["dense_0"]["kernel"], u[:, 2:] * s[2:] @ vt[2:], atol=1e-5)
  assert base["dense_1"]["kernel"] is P["dense_1"]["kernel"]  # untouched leaves are not copied
  f = _factors(state, "dense_0/kernel")
  np.testing.assert_allclose(f.a @ f.b, u[:, :2] * s[:2] @ vt[:2] / 1.0, atol=1e-5)


def test_pissa_randomized_close_to_exact():
  u, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(1), (64, 48)))
  v, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(2), (48, 48)))
  spectrum = jnp.concatenate([jnp.array([10.0, 8.0, 6.0, 4.0]), jnp.linspace(0.5, 0.01, 44)])
  w = (u * spectrum) @ v.T  # a spectral gap at the rank cut, as for pretrained weights
  params = {"l": {"kernel": w}}
  b_exact, _ = lj.pissa(4, 4.0, "l/kernel").init(jax.random.key(0), params)
  b_rand, _ = lj.pissa(4, 4.0, "l/kernel", niter=8).init(jax.random.key(0), params)
  rel = jnp.linalg.norm(b_exact["l"]["kernel"] - b_rand["l"]["kernel"]) / jnp.linalg.norm(w)
  assert rel < 1e-2


def test_dropout_only_on_adapter_branch():
  base, state = lj.lora(2, 2.0, "dense_0/kernel", dropout=0.5).init(jax.random.key(0), P)
  state = testing.perturb(state, jax.random.key(1))
  x = jnp.ones((3, 6))
  w_det = lj.lora(2, 2.0, "dense_0/kernel", dropout=0.5).apply(base, state)["dense_0"]["kernel"]
  w_rng = lj.lora(2, 2.0, "dense_0/kernel", dropout=0.5).apply(
      base, state, rng=jax.random.key(3))["dense_0"]["kernel"]
  y_det, y_rng = lj.ops.dense(x, w_det), lj.ops.dense(x, w_rng)
  assert not np.allclose(y_det, y_rng)
  # The base path is never dropped: with the adapter zeroed, outputs agree exactly.
  zero = lj.AdapterState(jax.tree_util.tree_map(jnp.zeros_like, state.trainable), state.frozen)
  w0 = lj.lora(2, 2.0, "dense_0/kernel", dropout=0.5).apply(base, zero, rng=jax.random.key(3))
  np.testing.assert_allclose(lj.ops.dense(x, w0["dense_0"]["kernel"]), x @ P["dense_0"]["kernel"],
                             rtol=1e-6)


def test_custom_vjp_matches_autodiff_grads():
  x = jax.random.normal(jax.random.key(0), (2, 5, 6))
  base, state = lj.lora(2, 2.0, "dense_0/kernel").init(jax.random.key(0), P)
  state = testing.perturb(state, jax.random.key(1))

  def loss(t, impl):
    w = lj.lora(2, 2.0, "dense_0/kernel", impl=impl).apply(base, lj.AdapterState(t, {}))
    return jnp.sum(jnp.sin(lj.ops.dense(x, w["dense_0"]["kernel"])))

  g1 = jax.grad(loss)(state.trainable, "custom_vjp")
  g2 = jax.grad(loss)(state.trainable, "autodiff")
  testing.assert_close(g1, g2)


def _dense_sized_intermediates(fn, *args, shape):
  jaxpr = jax.make_jaxpr(fn)(*args)
  found = []

  def walk(jx):
    for eqn in jx.eqns:
      found.extend(v for v in eqn.outvars if tuple(getattr(v.aval, "shape", ())) == shape)
      for sub in jax.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jaxpr.jaxpr)
  return len(found)


def test_factored_step_never_forms_dense_update():
  """The LoRA gradient computes no d_in x d_out array (the merged path does)."""
  w = jax.random.normal(jax.random.key(0), (96, 80))
  ad = lj.lora(4, targets="l/kernel")
  base, state = ad.init(jax.random.key(0), {"l": {"kernel": w}})
  x = jnp.ones((16, 96))

  def factored(t, base):
    return jnp.sum(lj.ops.dense(x, ad.apply(base, lj.AdapterState(t, {}))["l"]["kernel"]) ** 2)

  def merged(t, base):
    return jnp.sum((x @ lj.merge(ad.apply(base, lj.AdapterState(t, {})))["l"]["kernel"]) ** 2)

  assert _dense_sized_intermediates(jax.grad(factored), state.trainable, base, shape=(96, 80)) == 0
  assert _dense_sized_intermediates(jax.grad(merged), state.trainable, base, shape=(96, 80)) > 0


def test_conv_lora_factored_equals_merged():
  base, state = lj.lora(2, 2.0, "conv/kernel", kernel_axes="conv").init(jax.random.key(0), P)
  state = testing.perturb(state, jax.random.key(1))
  w = lj.lora(2, 2.0, "conv/kernel", kernel_axes="conv").apply(base, state)["conv"]["kernel"]
  x = jax.random.normal(jax.random.key(2), (2, 7, 7, 3))
  for kw in [dict(), dict(strides=2, padding="VALID"), dict(dilation=2)]:
    testing.assert_close(lj.ops.conv(x, w, **kw), lj.ops.conv(x, lj.merge(w), **kw))


@pytest.mark.parametrize("nd", [1, 3])
def test_conv_1d_3d(nd):
  k = (3,) * nd + (2, 5)
  params = {"c": {"kernel": jax.random.normal(jax.random.key(0), k)}}
  ad = lj.lora(2, 2.0, "c/kernel", kernel_axes="conv")
  base, state = ad.init(jax.random.key(0), params)
  state = testing.perturb(state, jax.random.key(1))
  w = ad.apply(base, state)["c"]["kernel"]
  x = jax.random.normal(jax.random.key(2), (2,) + (6,) * nd + (2,))
  testing.assert_close(lj.ops.conv(x, w), lj.ops.conv(x, lj.merge(w)))


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=0), "rank must be an int >= 1"),
    (dict(rank=2.5), "rank must be an int >= 1"),
    (dict(rank=2, alpha=0.0), "alpha must be > 0"),
    (dict(rank=2, alpha=-1.0), "alpha must be > 0"),
    (dict(rank=2, dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(rank=2, dropout=-0.1), r"dropout must be in \[0, 1\)"),
    (dict(rank=2, init="xavier"), "unknown init 'xavier'; valid"),
    (dict(rank=2, impl="fast"), "impl='fast'; valid"),
])
def test_factory_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    lj.lora(targets="dense_0/kernel", **kwargs)


def test_rank_larger_than_min_dim():
  with pytest.raises(ValueError, match=r"rank=7 > min\(d_in, d_out\)=6 for dense_0/kernel"):
    lj.lora(7, targets="dense_0/kernel").init(jax.random.key(0), P)


def test_mismatched_state_and_params():
  ad = lj.lora(2, targets="dense_0/kernel")
  _, state = ad.init(jax.random.key(0), P)
  other = {"dense_9": {"kernel": jnp.ones((6, 8))}}
  with pytest.raises(ValueError, match="mismatched state/params trees"):
    ad.apply(other, state)
  wrong_shape = {**P, "dense_0": {"kernel": jnp.ones((5, 8)), "bias": P["dense_0"]["bias"]}}
  with pytest.raises(ValueError, match=r"state for dense_0/kernel \(params leaf shape \(5, 8\).*"
                                       r"trainable.a expected shape \(5, 2\).*got shape \(6, 2\)"):
    ad.apply(wrong_shape, state)
