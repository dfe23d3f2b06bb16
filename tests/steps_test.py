"""`steps.make_train_step` / `make_eval_step` against float64 numpy re-derivations.

The adapter here is a hand-written one with a quadratic penalty c·|w|² and an `update` that records
the gradient it is given in its frozen state, so the test reads what the step handed to `update`.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowrank_jax import base as base_lib
from lowrank_jax import steps

C = 0.7      # penalty weight
LR = 0.1


def _recording_adapter(update_grad):
  """base {"w": (3,), "h": ()} -> params {"w": base w + trainable w, "h": base h}."""

  def init(key, params, stats=None):
    del key, stats
    return params, base_lib.AdapterState({"w": jnp.array([0.3, -0.2, 0.5])},
                                         {"seen": jnp.zeros(3), "step": jnp.zeros((), jnp.int32)})

  def apply(base, state, *, rng=None):
    del rng
    return {"w": base["w"] + state.trainable["w"], "h": base["h"]}

  def penalty(state):
    return C * jnp.sum(state.trainable["w"] ** 2)

  def update(state, grads, step):
    return base_lib.AdapterState(state.trainable, {"seen": grads["w"], "step": step})

  return base_lib.Adapter(init, apply, penalty, update, name="recording", update_grad=update_grad)


def _task_loss(params, batch, rng):
  del rng
  y = params["h"] * params["w"] * batch["x"]
  return jnp.sum((y - batch["y"]) ** 2), {"task": jnp.sum((y - batch["y"]) ** 2)}


def _reference(b, h, w, x, y):
  """float64 numpy: task loss, its gradients w.r.t. w and the head h, the penalty's w.r.t. w."""
  b, w, x, y = (np.asarray(v, np.float64) for v in (b, w, x, y))
  wp = b + w
  r = h * wp * x - y
  return (np.sum(r ** 2), 2 * r * h * x, np.sum(2 * r * wp * x), 2 * C * w)


@pytest.mark.parametrize("update_grad", ["task", "total"])
def test_update_sees_the_gradient_its_adapter_names(update_grad):
  adapter = _recording_adapter(update_grad)
  params = {"w": jnp.array([1.0, 2.0, -1.0]), "h": jnp.array(1.5)}
  base, st = adapter.init(None, params)
  opt = optax.sgd(LR)
  state = steps.init_train_state(st, opt, head={"h": jnp.array(0.8)})
  batch = {"x": jnp.array([0.5, -1.0, 2.0]), "y": jnp.array([1.0, 0.0, -1.0])}
  w0 = np.asarray(st.trainable["w"])
  new, metrics = steps.make_train_step(adapter, _task_loss, opt)(state, base, batch)

  task, g_w, g_h, g_pen = _reference(params["w"], 0.8, w0, batch["x"], batch["y"])
  np.testing.assert_allclose(metrics["loss"], task + C * np.sum(w0 ** 2), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["penalty"], C * np.sum(w0 ** 2), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["task"], task, rtol=1e-5, atol=1e-6)
  # The optimizer sees task + penalty gradients; the head only the task's.
  np.testing.assert_allclose(new["adapter"]["w"], w0 - LR * (g_w + g_pen), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new["head"]["h"], 0.8 - LR * g_h, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["grad_norm"],
                             np.sqrt(np.sum((g_w + g_pen) ** 2) + g_h ** 2), rtol=1e-5, atol=1e-6)
  seen = g_w if update_grad == "task" else g_w + g_pen
  np.testing.assert_allclose(new["frozen"]["seen"], seen, rtol=1e-5, atol=1e-6)
  assert not np.allclose(g_pen, 0.0)   # the two cases differ
  assert int(new["frozen"]["step"]) == 0   # update gets the step before increment
  assert int(new["step"]) == 1


def test_without_update_the_frozen_state_is_kept():
  adapter = _recording_adapter("task")._replace(update=None)
  params = {"w": jnp.ones(3), "h": jnp.array(1.0)}
  base, st = adapter.init(None, params)
  opt = optax.sgd(LR)
  new, _ = steps.make_train_step(adapter, _task_loss, opt)(
      steps.init_train_state(st, opt), base, {"x": jnp.ones(3), "y": jnp.zeros(3)})
  np.testing.assert_array_equal(new["frozen"]["seen"], np.zeros(3))


def test_step_key_is_fold_in_of_the_loop_key():
  keys = []

  def task_loss(params, batch, rng):
    return jnp.sum(params["w"] * batch["x"]), {"key": jax.random.key_data(rng)}

  adapter = _recording_adapter("task")._replace(update=None)
  base, st = adapter.init(None, {"w": jnp.ones(3), "h": jnp.array(1.0)})
  opt = optax.sgd(LR)
  state = steps.init_train_state(st, opt, rng=jax.random.key(7))
  train_step = steps.make_train_step(adapter, task_loss, opt)
  for _ in range(2):
    state, m = train_step(state, base, {"x": jnp.ones(3)})
    keys.append(np.asarray(m["key"]))
  for step, got in enumerate(keys):
    _, k_model = jax.random.split(jax.random.fold_in(jax.random.key(7), step))
    np.testing.assert_array_equal(got, jax.random.key_data(k_model))


def test_state_is_donated_and_base_is_not():
  adapter = _recording_adapter("task")
  base, st = adapter.init(None, {"w": jnp.ones(3), "h": jnp.array(1.0)})
  opt = optax.adam(1e-2)
  state = steps.init_train_state(st, opt)
  old = state["adapter"]["w"]
  steps.make_train_step(adapter, _task_loss, opt)(state, base,
                                                   {"x": jnp.ones(3), "y": jnp.zeros(3)})
  assert old.is_deleted()
  assert not base["w"].is_deleted()
  assert not st.trainable["w"].is_deleted()   # init_train_state copied it


def test_unknown_update_grad():
  with pytest.raises(ValueError, match=r"update_grad='tsk'; valid: \['task', 'total'\]"):
    steps.make_train_step(_recording_adapter("tsk"), _task_loss, optax.sgd(LR))


def test_eval_sees_adapted_params_with_the_head():
  adapter = _recording_adapter("task")
  base, st = adapter.init(None, {"w": jnp.array([1.0, 2.0, 3.0]), "h": jnp.array(1.0)})
  state = steps.init_train_state(st, optax.sgd(LR), head={"h": jnp.array(2.0)})
  out = steps.make_eval_step(adapter, lambda p, b: {"y": p["h"] * p["w"] * b["x"]})(
      state, base, {"x": jnp.ones(3)})
  np.testing.assert_allclose(out["y"], 2.0 * (np.array([1.0, 2.0, 3.0]) + [0.3, -0.2, 0.5]),
                             rtol=1e-5, atol=1e-6)

