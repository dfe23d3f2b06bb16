"""Self-Tuning Networks: the best-response layer against numpy, gradients through it against finite
differences, and a tiny sklearn-digits run tuning input noise."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import lowrank_jax as lj
from lowrank_jax import stn
from lowrank_jax import structured
from lowrank_jax import testing
from lowrank_jax.models import _layers
from lowrank_jax.models import mlp


@pytest.fixture
def x64():
  with testing.enable_x64():
    yield


def _hyper_kernel(rng, kernel_shape, h, z, rank=None):
  """A HyperKernel with random entries and its dense numpy parts (hyper as a dense array)."""
  out = kernel_shape[-1]
  elem, hyper_bias, scale_map = (rng.normal(size=kernel_shape), rng.normal(size=out),
                                 rng.normal(size=(h, out)))
  if rank is None:
    hyper = rng.normal(size=kernel_shape)
    hyper_weight = jnp.asarray(hyper)
  else:
    a, b = rng.normal(size=kernel_shape[:-1] + (rank,)), rng.normal(size=(rank, out))
    hyper = np.tensordot(a, b, axes=1)
    hyper_weight = stn.LowRankProduct(jnp.asarray(a), jnp.asarray(b))
  w = stn.HyperKernel(jnp.asarray(elem), hyper_weight, jnp.asarray(hyper_bias),
                      jnp.asarray(scale_map), hyperparameters=jnp.asarray(z))
  return w, (elem, hyper, hyper_bias, scale_map)


@pytest.mark.parametrize("rank", [None, 2])
@pytest.mark.parametrize("per_example", [False, True])
def test_dense_layer_equals_the_formula_in_numpy(per_example, rank, x64):
  rng = np.random.default_rng(0)
  z = rng.normal(size=(3, 2) if per_example else (2,))
  w, (elem, hyper, hyper_bias, scale_map) = _hyper_kernel(rng, (5, 4), 2, z, rank)
  x, bias = rng.normal(size=(3, 5)), rng.normal(size=4)
  s = np.broadcast_to(z @ scale_map, (3, 4))
  want = x @ elem + bias + s * (x @ hyper + hyper_bias)
  got = _layers.dense({"kernel": w, "bias": jnp.asarray(bias)}, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)


def _conv_same(x, k):
  """Stride-1 'SAME' 2-D correlation, channels last, by explicit loops."""
  kh, kw = k.shape[:2]
  pad = np.pad(x, ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)))
  out = np.zeros(x.shape[:3] + (k.shape[-1],))
  for i in range(x.shape[1]):
    for j in range(x.shape[2]):
      out[:, i, j] = np.einsum("bhwc,hwco->bo", pad[:, i:i + kh, j:j + kw], k)
  return out


@pytest.mark.parametrize("rank", [None, 2])
def test_conv_layer_equals_the_formula_in_numpy(rank, x64):
  rng = np.random.default_rng(1)
  z = rng.normal(size=(2, 3))
  w, (elem, hyper, hyper_bias, scale_map) = _hyper_kernel(rng, (3, 3, 2, 4), 3, z, rank)
  x = rng.normal(size=(2, 5, 5, 2))
  s = (z @ scale_map)[:, None, None, :]
  want = _conv_same(x, elem) + s * (_conv_same(x, hyper) + hyper_bias)
  got = structured.conv(jnp.asarray(x), w)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-11, atol=1e-12)


def _digits_mlp_params(seed=0):
  cfg = mlp.MLPConfig(features=(64, 16, 10))
  params = stn.wrap(mlp.init(jax.random.key(seed), cfg, jnp.float64), jax.random.key(1), 2)
  rng = np.random.default_rng(seed)
  randomize = lambda w: w.replace(scale_map=jnp.asarray(rng.normal(size=w.scale_map.shape)),
                                  hyper_bias=jnp.asarray(rng.normal(size=w.hyper_bias.shape)))
  params = jax.tree.map(lambda w: randomize(w) if isinstance(w, stn.HyperKernel) else w, params,
                        is_leaf=lambda w: isinstance(w, stn.HyperKernel))
  return params, cfg


def test_wrapped_model_at_fixed_hyperparameters_is_the_plain_model(x64):
  params, cfg = _digits_mlp_params()
  z = jnp.asarray([0.3, -0.7])
  x = jnp.asarray(np.random.default_rng(2).normal(size=(7, 64)))
  labels = jnp.arange(7) % 10
  fixed = stn.fix(params, z)
  # The plain model's kernels, rebuilt in numpy from the factors.
  for i in range(2):
    w = params[f"dense_{i}"]["kernel"]
    s = np.asarray(z) @ np.asarray(w.scale_map)
    # float64 round-off is relative to the terms summed, not to a sum that cancels near zero.
    kernel = np.asarray(w.elem) + np.asarray(w.hyper) * s
    np.testing.assert_allclose(np.asarray(fixed[f"dense_{i}"]["kernel"]), kernel, rtol=1e-13,
                               atol=1e-13 * np.abs(kernel).max())
    bias = np.asarray(params[f"dense_{i}"]["bias"]) + s * np.asarray(w.hyper_bias)
    np.testing.assert_allclose(np.asarray(fixed[f"dense_{i}"]["bias"]), bias, rtol=1e-13,
                               atol=1e-13 * np.abs(bias).max())
  with_z = stn.with_hyperparameters(params, z)
  np.testing.assert_allclose(np.asarray(mlp.apply(with_z, x, cfg)),
                             np.asarray(mlp.apply(fixed, x, cfg)), rtol=1e-12)
  # Same training signal: d loss / d elem of the STN equals d loss / d kernel of the plain model.
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(mlp.apply(p, x, cfg),
                                                                   labels).mean()
  g_stn, g_plain = jax.grad(loss)(with_z), jax.grad(loss)(fixed)
  for i in range(2):
    np.testing.assert_allclose(np.asarray(g_stn[f"dense_{i}"]["kernel"].elem),
                               np.asarray(g_plain[f"dense_{i}"]["kernel"]), rtol=1e-10)
  with pytest.raises(TypeError, match="stn.fix"):
    lj.merge(with_z)


def test_lora_adapter_as_elem_with_low_rank_hyper_branch(x64):
  """STN over a LoRA-adapted model: elem is the LowRank adapter, the hyper branch is rank 2."""
  cfg = mlp.MLPConfig(features=(6, 5, 3))
  rng = np.random.default_rng(6)
  plain = mlp.init(jax.random.key(0), cfg, jnp.float64)
  adapted = {k: {"kernel": lj.LowRank(v["kernel"], jnp.asarray(rng.normal(size=(
      v["kernel"].shape[0], 2))), jnp.asarray(rng.normal(size=(2, v["kernel"].shape[1]))), 0.5),
                 "bias": v["bias"]} for k, v in plain.items()}
  params = stn.wrap(adapted, jax.random.key(1), 1, hyper_rank=2)
  params = jax.tree.map(
      lambda w: w.replace(scale_map=jnp.asarray(rng.normal(size=w.scale_map.shape)),
                          hyper_bias=jnp.asarray(rng.normal(size=w.hyper_bias.shape)))
      if isinstance(w, stn.HyperKernel) else w, params,
      is_leaf=lambda w: isinstance(w, stn.HyperKernel))
  x, z = rng.normal(size=(4, 6)), np.array([0.8])
  h = x
  for i in range(2):
    w, lora = params[f"dense_{i}"]["kernel"], adapted[f"dense_{i}"]["kernel"]
    kernel = np.asarray(lora.base) + 0.5 * np.asarray(lora.a) @ np.asarray(lora.b)
    hyper = np.asarray(w.hyper.a) @ np.asarray(w.hyper.b)
    s = z @ np.asarray(w.scale_map)
    h = h @ kernel + np.asarray(plain[f"dense_{i}"]["bias"]) + s * (
        h @ hyper + np.asarray(w.hyper_bias))
    if i == 0:
      h = np.maximum(h, 0)
  got = mlp.apply(stn.with_hyperparameters(params, jnp.asarray(z)), jnp.asarray(x), cfg)
  np.testing.assert_allclose(np.asarray(got), h, rtol=1e-11)
  np.testing.assert_allclose(np.asarray(mlp.apply(stn.fix(params, jnp.asarray(z)), x, cfg)), h,
                             rtol=1e-11)


def _val_loss(cfg, x, labels):
  return lambda p, batch: optax.softmax_cross_entropy_with_integer_labels(
      mlp.apply(p, x, cfg), labels).mean()


@pytest.mark.parametrize("centered", [False, True])
def test_hypergradient_through_the_best_response_matches_finite_differences(centered, x64):
  params, cfg = _digits_mlp_params(3)
  rng = np.random.default_rng(4)
  x, labels = jnp.asarray(rng.normal(size=(9, 64))), jnp.arange(9) % 10
  hps = (stn.Hyperparameter("a", 0.0, 1.0), stn.Hyperparameter("b"))
  tuner = stn.STN(hps, lambda *a: 0.0, _val_loss(cfg, x, labels), optax.sgd(0.1),
                  entropy_weight=0.3, centered=centered)
  hyper, key = jnp.asarray([0.4, -0.2]), jax.random.key(5)
  # Centred, the objective's value does not depend on lam (only its gradient does, through the
  # stop_gradient centre), so check there with a negligible perturbation scale: the gradient is
  # then d val(w_phi(u)) / du at u = 0, and the finite difference is taken in u.
  scale = jnp.asarray([0.1, -0.5]) if not centered else jnp.full(2, -40.0)
  grad_h, grad_s = jax.grad(lambda h, s: stn.hyper_objective(tuner, params, h, s, x, key),
                            argnums=(0, 1))(hyper, scale)
  if centered:
    f = lambda h: tuner.val_loss(stn.with_hyperparameters(params, h - hyper), None)
  else:
    f = lambda h: stn.hyper_objective(tuner, params, h, scale, x, key)
    g = lambda s: stn.hyper_objective(tuner, params, hyper, s, x, key)
  eps = 1e-6
  unit = np.eye(2)
  fd = [(f(hyper + eps * e) - f(hyper - eps * e)) / (2 * eps) for e in unit]
  np.testing.assert_allclose(np.asarray(grad_h), np.asarray(fd), rtol=1e-6, atol=1e-9)
  assert np.abs(np.asarray(grad_h)).min() > 1e-4
  if not centered:
    fd_s = [(g(scale + eps * e) - g(scale - eps * e)) / (2 * eps) for e in unit]
    np.testing.assert_allclose(np.asarray(grad_s), np.asarray(fd_s), rtol=1e-6, atol=1e-9)


def test_digits_input_noise_is_tuned_down():
  """Input-noise std starts at 2.5 on standardised digits; training with less noise gives a lower
  clean validation loss (plain 220-step runs: 0.12 / 0.19 / 0.33 / 0.81 at std 0 / 1 / 1.5 / 2.5),
  so the STN must lower it."""
  x, y = load_digits(return_X_y=True)
  x = ((x - x.mean(0)) / (x.std(0) + 1e-6)).astype(np.float32)
  perm = np.random.default_rng(0).permutation(len(x))
  train, val = perm[:1200], perm[1200:]
  cfg = mlp.MLPConfig(features=(64, 32, 10))
  params = stn.wrap(mlp.init(jax.random.key(0), cfg), jax.random.key(1), 1)
  ce = lambda logits, labels: optax.softmax_cross_entropy_with_integer_labels(
      logits, labels).mean()

  def train_loss(p, values, batch, key):
    xb, yb = batch
    return ce(mlp.apply(p, xb + values[:, :1] * jax.random.normal(key, xb.shape), cfg), yb)

  tuner = stn.STN((stn.Hyperparameter("noise", 0.0, 4.0),), train_loss,
                  lambda p, batch: ce(mlp.apply(p, batch[0], cfg), batch[1]),
                  optax.adam(3e-3), optax.adam(3e-2))
  state = stn.init(tuner, params, [2.5])
  sample = lambda idx, steps, seed: (lambda i: (jnp.asarray(x[i]), jnp.asarray(y[i])))(
      np.random.default_rng(seed).choice(idx, size=(steps, 64)))
  state, _ = stn.train_phase(tuner, state, sample(train, 100, 0), jax.random.key(2))
  noise = [float(tuner.values(state.hyper)[0])]
  for c in range(40):
    state, _ = stn.cycle(tuner, state, sample(train, 2, c + 10), sample(val, 1, c + 1000),
                         jax.random.key(c))
    noise.append(float(tuner.values(state.hyper)[0]))
  assert noise[-1] < 1.8 < noise[0]


def test_bad_input_raises_clear_errors():
  params = mlp.init(jax.random.key(0), mlp.MLPConfig(features=(4, 3)))
  with pytest.raises(ValueError, match="num_hyperparameters"):
    stn.wrap(params, jax.random.key(0), 0)
  wrapped = stn.wrap(params, jax.random.key(0), 2)
  x = jnp.ones((5, 4))
  with pytest.raises(ValueError, match="hyperparameters are unset"):
    mlp.apply(wrapped, x, mlp.MLPConfig(features=(4, 3)))
  with pytest.raises(ValueError, match="batch of 5"):
    mlp.apply(stn.with_hyperparameters(wrapped, jnp.ones((4, 2))), x, mlp.MLPConfig((4, 3)))
  with pytest.raises(ValueError, match="high > low"):
    stn.Hyperparameter("p", 1.0, 0.5)
  with pytest.raises(ValueError, match="strictly inside"):
    stn.Hyperparameter("p", 0.0, 1.0).unconstrained(1.0)
  tuner = stn.STN((stn.Hyperparameter("p", 0.0, 1.0),), None, None, optax.sgd(0.1))
  with pytest.raises(ValueError, match="2 initial values for 1"):
    stn.init(tuner, wrapped, [0.5, 0.5])
