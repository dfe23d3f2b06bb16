"""The STN adapter: its contract case, the factored layer with per-example hyperparameters against
numpy, the hypergradient through the best response against central finite differences (float64),
the parameter count and its errors."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_jax as lj
from lowrank_jax import stn as stn_lib
from lowrank_jax import stn_train
from lowrank_jax import structured
from lowrank_jax import testing
from lowrank_jax import tree as tree_lib
from lowrank_jax.adapters import stn as stn_adapter_lib

TARGETS = ["conv/kernel", "dense_0/kernel", "dense_1/kernel"]
Z = (0.5, -1.0)


def dense_ref(z, delta_scale):
  """{path: W + s_d A_d B_d + (A_h B_h) * (z @ S)} in float64 numpy."""
  z = np.asarray(z, np.float64)

  def ref(base, state):
    out = {}
    for path, t in tree_lib.unnest(state.trainable).items():
      w = np.asarray(testing.merged_leaf(base, path), np.float64)
      prod = lambda f: np.tensordot(np.asarray(f.a, np.float64), np.asarray(f.b, np.float64), 1)
      out[path] = w + delta_scale * prod(t.delta) + prod(t.hyper) * (
          z @ np.asarray(t.scale_map, np.float64))
    return out
  return ref


CONTRACT_CASES = [
    dict(name="stn", make=lambda: stn_adapter_lib.stn_adapter(
        2, TARGETS, num_hyperparameters=2, hypernet_input=Z, delta_alpha=4.0, kernel_axes="conv"),
         dense_ref=dense_ref(Z, 2.0)),
]


def _perturbed(adapter, params, key=0):
  base, state = adapter.init(jax.random.key(key), params)
  return base, testing.perturb(state, jax.random.key(key + 1))


def _mlp_params(rng):
  return {"dense_0": {"kernel": jnp.asarray(rng.normal(size=(6, 5))), "bias": jnp.zeros(5)},
          "dense_1": {"kernel": jnp.asarray(rng.normal(size=(5, 3))), "bias": jnp.zeros(3)}}


def _mlp_apply(p, x):
  h = jnp.tanh(lj.ops.dense(x, p["dense_0"]["kernel"]) + p["dense_0"]["bias"])
  return lj.ops.dense(h, p["dense_1"]["kernel"]) + p["dense_1"]["bias"]


def test_zero_gate_is_the_base_model_for_any_hyperparameters():
  """At init S = 0 and B_d = 0: the adapted model is the base model for any per-example z, even
  with a random (nonzero) hyper branch."""
  rng = np.random.default_rng(0)
  params = _mlp_params(rng)
  adapter = stn_adapter_lib.stn_adapter(2, r"dense_\d/kernel", num_hyperparameters=3)
  base, state = adapter.init(jax.random.key(0), params)
  assert float(jnp.abs(state.trainable["dense_0"]["kernel"].hyper.a).max()) > 0
  x, z = jnp.asarray(rng.normal(size=(4, 6))), jnp.asarray(rng.normal(size=(4, 3)) * 3.0)
  forward = jax.jit(lambda s, z: _mlp_apply(
      stn_lib.with_hyperparameters(adapter.apply(base, s), z), x))
  np.testing.assert_allclose(forward(state, z), _mlp_apply(params, x), rtol=1e-6, atol=1e-6)


def test_factored_per_example_layer_against_numpy():
  """A dense layer with per-example z (B, h): y_i = x_i (W + s_d A_d B_d) + (z_i S) * (x_i A_h B_h),
  computed factored (never forming A_h B_h), against numpy in float64."""
  with testing.enable_x64():
    rng = np.random.default_rng(0)
    params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(7, 5)))}}
    adapter = stn_adapter_lib.stn_adapter(2, "dense/kernel", num_hyperparameters=3,
                                          delta_rank=3, delta_alpha=6.0, dtype=jnp.float64)
    base, state = _perturbed(adapter, params)
    t = state.trainable["dense"]["kernel"]
    x, z = rng.normal(size=(4, 7)), rng.normal(size=(4, 3))
    w = stn_lib.with_hyperparameters(adapter.apply(base, state), jnp.asarray(z))["dense"]["kernel"]
    assert isinstance(w.hyper, stn_lib.LowRankProduct)
    got = structured.dense(jnp.asarray(x), w)
    n = lambda a: np.asarray(a, np.float64)
    w_elem = n(params["dense"]["kernel"]) + 2.0 * n(t.delta.a) @ n(t.delta.b)
    want = x @ w_elem + (z @ n(t.scale_map)) * (x @ (n(t.hyper.a) @ n(t.hyper.b)))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12)
    # At one vector z the merged kernel gives the same layer; `stn.fix` agrees with `merge`.
    w1 = stn_lib.with_hyperparameters(adapter.apply(base, state), jnp.asarray(z[1]))
    merged = lj.merge(w1)["dense"]["kernel"]
    np.testing.assert_allclose(np.asarray(merged), w_elem + (n(t.hyper.a) @ n(t.hyper.b)) * (
        z[1] @ n(t.scale_map)), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(stn_lib.fix(w1, jnp.asarray(z[1]))["dense"]["kernel"]),
                               np.asarray(merged), rtol=1e-12)
    with pytest.raises(TypeError, match="stn.fix"):   # per-example z: no single dense value
      lj.merge(stn_lib.with_hyperparameters(adapter.apply(base, state), jnp.asarray(z)))


def test_hypergradient_through_the_best_response_matches_finite_differences():
  """d/d(lam, sigma) of the hyper objective (validation loss of the applied adapter at
  lam + softplus(sigma) eps, minus tau * entropy; the runner's bind), against central
  differences in float64 with the perturbation eps held fixed."""
  with testing.enable_x64():
    rng = np.random.default_rng(1)
    params = _mlp_params(rng)
    adapter = stn_adapter_lib.stn_adapter(2, r"dense_\d/kernel", num_hyperparameters=2,
                                          dtype=jnp.float64)
    base, state = _perturbed(adapter, params, key=3)
    x, labels = jnp.asarray(rng.normal(size=(8, 6))), jnp.asarray(rng.integers(0, 3, 8))

    def val_loss(bound, batch):
      logits = _mlp_apply(bound["params"], batch["x"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    bind = stn_train.make_bind(adapter, state.frozen)
    point = jnp.asarray([0.3, -0.4, -0.2, 0.1])   # (lam, sigma)
    make = lambda centered, b: stn_lib.STN(
        (stn_lib.Hyperparameter("a", 0.0, 1.0), stn_lib.Hyperparameter("b")), train_loss=None,
        val_loss=val_loss, train_optimizer=optax.sgd(0.1), entropy_weight=0.01,
        centered=centered, bind=b)
    # What the runner differentiates: the centred hypernetwork reads z - stop_gradient(lam).
    centred = make(True, bind)
    # The same function with the centre held at the current lam: a plain function of (lam, sigma)
    # whose finite differences are the hypergradient the centred form must give at lam.
    fixed_centre = make(False, lambda phi, z: bind(phi, z - point[:2]))
    phi = {"adapter": state.trainable, "head": {}, "base": base}
    batch, key = {"x": x, "label": labels}, jax.random.key(5)
    objective = jax.jit(lambda tuner, hs: stn_lib.hyper_objective(tuner, phi, hs[:2], hs[2:],
                                                                  batch, key), static_argnums=0)
    grad = np.asarray(jax.grad(lambda hs: objective(centred, hs))(point))
    eps = 1e-6
    fd = np.array([(objective(fixed_centre, point.at[i].add(eps))
                    - objective(fixed_centre, point.at[i].add(-eps))) / (2 * eps)
                   for i in range(4)])
    assert np.all(np.abs(grad[:2]) > 1e-4), grad   # lam moves the loss through the gate
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("rank,h,delta_rank", [(2, 1, None), (3, 4, 0), (1, 2, 5)])
def test_parameter_count_formula(rank, h, delta_rank):
  """r (d_in + d_out) + h d_out + r_d (d_in + d_out) per kernel (r_d = r by default)."""
  params = {"dense": {"kernel": jax.ShapeDtypeStruct((12, 7), jnp.float32)}}
  adapter = stn_adapter_lib.stn_adapter(rank, "dense/kernel", num_hyperparameters=h,
                                        delta_rank=delta_rank)
  state = jax.eval_shape(lambda p: adapter.init(jax.random.key(0), p)[1], params)
  r_d = rank if delta_rank is None else delta_rank
  assert lj.count_params(state) == rank * 19 + h * 7 + r_d * 19
  assert (state.trainable["dense"]["kernel"].delta is None) == (r_d == 0)


def test_bad_arguments_and_targets():
  make = stn_adapter_lib.stn_adapter
  with pytest.raises(ValueError, match="stn: rank must be an int >= 1"):
    make(0)
  with pytest.raises(ValueError, match="stn: num_hyperparameters must be an int >= 1"):
    make(2, num_hyperparameters=0)
  with pytest.raises(ValueError, match="stn: delta_rank must be None or an int >= 0"):
    make(2, delta_rank=-1)
  with pytest.raises(ValueError, match="stn: delta_alpha must be None or > 0"):
    make(2, delta_alpha=0.0)
  with pytest.raises(ValueError, match="hypernet_input must hold num_hyperparameters=2 values"):
    make(2, num_hyperparameters=2, hypernet_input=(1.0,))
  params = testing.tiny_params()
  with pytest.raises(ValueError, match="target embed/embedding .* one output axis"):
    make(2, "embed/embedding").init(jax.random.key(0), params)
  with pytest.raises(ValueError, match=r"stn: rank=7 > min\(d_in, d_out\)=6"):
    make(7, "dense_0/kernel").init(jax.random.key(0), params)
  three_d = {"attn": {"kernel": jnp.zeros((8, 2, 4))}}
  with pytest.raises(ValueError, match=r"target attn/kernel \(shape \(8, 2, 4\)\) .* one output"):
    make(1, "attn/kernel", kernel_axes=1).init(jax.random.key(0), three_d)
