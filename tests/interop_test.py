"""Adapters on stock Flax models (linen and nnx) through `merge`: correct, no model edits."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import lowrank_jax as lj
from lowrank_jax import testing


class LinenMLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16, name="fc1")(x))
    return nn.Dense(3, name="fc2")(x)


def test_linen_model_through_merge():
  model = LinenMLP()
  x = jax.random.normal(jax.random.key(0), (8, 5))
  params = model.init(jax.random.key(1), x)["params"]
  ad = lj.lora(2, 4.0, targets=r"fc\d/kernel")
  base, state = ad.init(jax.random.key(2), params)
  np.testing.assert_allclose(model.apply({"params": lj.merge(ad.apply(base, state))}, x),
                             model.apply({"params": params}, x), rtol=1e-6)
  state = testing.perturb(state, jax.random.key(3))
  merged = lj.merge(ad.apply(base, state))
  t = lj.tree.unnest(state.trainable)
  ref = params["fc1"]["kernel"] + 2.0 * t["fc1/kernel"].a @ t["fc1/kernel"].b
  np.testing.assert_allclose(merged["fc1"]["kernel"], ref, rtol=1e-5, atol=1e-6)

  # Train the adapter only, through the stock model.
  y = jnp.arange(8) % 3
  opt = optax.adam(1e-2)
  opt_state = opt.init(state.trainable)

  @jax.jit
  def step(trainable, opt_state):
    def loss(tr):
      p = lj.merge(ad.apply(base, lj.AdapterState(tr, state.frozen)))
      logits = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    l, g = jax.value_and_grad(loss)(trainable)
    u, opt_state = opt.update(g, opt_state)
    return optax.apply_updates(trainable, u), opt_state, l

  tr = state.trainable
  losses = []
  for _ in range(60):
    tr, opt_state, l = step(tr, opt_state)
    losses.append(float(l))
  assert losses[-1] < 0.5 * losses[0]


class NnxMLP(nnx.Module):

  def __init__(self, rngs):
    self.fc1 = nnx.Linear(5, 16, rngs=rngs)
    self.fc2 = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.fc2(nnx.relu(self.fc1(x)))


def test_nnx_model_through_split_merge():
  model = NnxMLP(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (8, 5))
  graphdef, params_state = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params_state)
  ad = lj.lora(2, 4.0, targets=r"fc\d/kernel")
  base, state = ad.init(jax.random.key(2), params)
  state = testing.perturb(state, jax.random.key(3))

  def forward(pure_params):
    st = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(st, pure_params)
    return nnx.merge(graphdef, st)(x)

  out = forward(lj.merge(ad.apply(base, state)))
  t = lj.tree.unnest(state.trainable)
  w1 = params["fc1"]["kernel"] + 2.0 * t["fc1/kernel"].a @ t["fc1/kernel"].b
  w2 = params["fc2"]["kernel"] + 2.0 * t["fc2/kernel"].a @ t["fc2/kernel"].b
  h = jax.nn.relu(x @ w1 + params["fc1"]["bias"])
  np.testing.assert_allclose(out, h @ w2 + params["fc2"]["bias"], rtol=1e-5, atol=1e-5)
  # Gradients reach the adapter through nnx.merge.
  g = jax.grad(lambda tr: jnp.sum(forward(lj.merge(ad.apply(base, lj.AdapterState(tr, {}))))))(
      state.trainable)
  assert all(float(jnp.abs(v).sum()) > 0 for v in jax.tree_util.tree_leaves(g))
