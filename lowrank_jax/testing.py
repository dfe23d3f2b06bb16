"""The adapter contract as reusable checks (optax `contrib/_common_test.py` style).

Every adapter in the project passes these through `tests/adapters/contract_test.py`; a user's own
adapter can call them too. They run on a tiny model that has an embedding table, a conv kernel and
two dense kernels, all through `lowrank_jax.ops`, so factored paths are exercised.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank_jax import base as base_lib
from lowrank_jax import introspect
from lowrank_jax import ops
from lowrank_jax import steps
from lowrank_jax import structured
from lowrank_jax import tree as tree_lib

TINY_PATHS = ("embed/embedding", "conv/kernel", "dense_0/kernel", "dense_1/kernel")


def tiny_params(key=None, dtype=jnp.float32) -> dict:
  """Embedding (13, 6), conv (3, 3, 3, 4), dense_0 (6, 8), dense_1 (8, 6), with biases."""
  key = jax.random.key(0) if key is None else key
  k = jax.random.split(key, 4)
  n = lambda kk, s, sc: (sc * jax.random.normal(kk, s)).astype(dtype)
  return {
      "embed": {"embedding": n(k[0], (13, 6), 1.0)},
      "conv": {"kernel": n(k[1], (3, 3, 3, 4), 0.3), "bias": jnp.zeros((4,), dtype)},
      "dense_0": {"kernel": n(k[2], (6, 8), 0.5), "bias": jnp.full((8,), 0.1, dtype)},
      "dense_1": {"kernel": n(k[3], (8, 6), 0.5), "bias": jnp.zeros((6,), dtype)},
  }


def tiny_batch(key=None, dtype=jnp.float32) -> dict:
  """A batch for `tiny_apply`: ids (4, 5), images (4, 6, 6, 3) and regression targets y (4, 10)."""
  key = jax.random.key(1) if key is None else key
  k = jax.random.split(key, 3)
  return {"ids": jax.random.randint(k[0], (4, 5), 0, 13),
          "images": jax.random.normal(k[1], (4, 6, 6, 3)).astype(dtype),
          "y": jax.random.normal(k[2], (4, 10)).astype(dtype)}


def tiny_apply(params, batch) -> jax.Array:
  """The tiny model: embedding, two dense layers and a conv, features (4, 10) for `tiny_batch`."""
  h = ops.embed(batch["ids"], params["embed"]["embedding"])
  h = jnp.tanh(ops.dense(h, params["dense_0"]["kernel"]) + params["dense_0"]["bias"])
  h = ops.dense(h, params["dense_1"]["kernel"]) + params["dense_1"]["bias"]
  z = ops.conv(batch["images"], params["conv"]["kernel"]) + params["conv"]["bias"]
  return jnp.concatenate([h.mean(1), jnp.tanh(z).mean((1, 2))], axis=-1)


def tiny_loss(params, batch) -> jax.Array:
  """Mean squared error of `tiny_apply` against the batch's targets `y`."""
  return jnp.mean((tiny_apply(params, batch) - batch["y"]) ** 2)


def _cast(tree, dtype):
  return jax.tree_util.tree_map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def perturb(state: base_lib.AdapterState, key, scale=0.3) -> base_lib.AdapterState:
  """Adds noise to every float trainable leaf, so that factors are not at their (often 0) init."""
  leaves, treedef = jax.tree_util.tree_flatten(state.trainable)
  keys = jax.random.split(key, max(len(leaves), 1))
  new = [x + scale * jax.random.normal(kk, x.shape, x.dtype) * (1.0 + jnp.abs(x))
         if jnp.issubdtype(x.dtype, jnp.floating) else x for kk, x in zip(keys, leaves)]
  return base_lib.AdapterState(jax.tree_util.tree_unflatten(treedef, new), state.frozen)


def _tol(dtype):
  return {"float64": 1e-9, "float32": 2e-4, "bfloat16": 3e-2}[jnp.dtype(dtype).name]


def assert_close(a, b, dtype=jnp.float32, scale=1.0):
  """Asserts pytrees `a` and `b` agree within the tolerance of `dtype`, times `scale`."""
  tol = _tol(dtype) * scale
  chex.assert_trees_all_close(_cast(a, jnp.float32), _cast(b, jnp.float32), atol=tol, rtol=tol)


def check_identity_at_init(adapter, params=None, batch=None, key=None, stats=None):
  """Merged params and model output equal the base model's at init."""
  params = tiny_params() if params is None else params
  batch = tiny_batch() if batch is None else batch
  base, state = adapter.init(jax.random.key(2) if key is None else key, params, stats)
  adapted = adapter.apply(base, state)
  chex.assert_trees_all_equal_structs(structured.merge(adapted), params)
  assert_close(structured.merge(adapted), params, scale=5)
  assert_close(tiny_apply(adapted, batch), tiny_apply(params, batch), scale=5)


def merged_leaf(params, path: str) -> jax.Array:
  """Dense value of the `/`-joined `path` in `merge(params)` (for dense-formula references)."""
  return dict(tree_lib.flatten_with_names(structured.merge(params))[0])[path]


def check_dense_reference(adapter, dense_ref: Callable[[Any, base_lib.AdapterState], dict],
                          params=None, batch=None, stats=None):
  """`merge(apply(base, s))` equals the hand-written dense formula `dense_ref(base, s)` on a perturbed
  state, and the factored forward equals the merged forward."""
  params = tiny_params() if params is None else params
  batch = tiny_batch() if batch is None else batch
  base, state = adapter.init(jax.random.key(3), params, stats)
  state = perturb(state, jax.random.key(4))
  adapted = adapter.apply(base, state)
  merged = structured.merge(adapted)
  expected = dense_ref(base, state)
  if not expected:
    raise AssertionError("dense_ref returned no paths")
  flat = dict(tree_lib.flatten_with_names(merged)[0])
  for path, w in expected.items():
    assert_close(flat[path], w, scale=5)
  assert_close(tiny_apply(adapted, batch), tiny_apply(merged, batch), scale=5)
  # The adapted model differs from the base one (the state is not silently ignored).
  if np.allclose(np.asarray(tiny_apply(adapted, batch)), np.asarray(tiny_apply(params, batch))):
    raise AssertionError("perturbed adapter state does not change the model output")


@contextlib.contextmanager
def enable_x64():
  """Context manager: float64 enabled inside, the previous setting restored after."""
  old = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", old)


def check_grads_f64(adapter_fn: Callable[[], base_lib.Adapter], stats_fn=None):
  """`jax.test_util.check_grads` (reverse mode, order 1) of loss + penalty w.r.t. the trainable
  state, in float64. `adapter_fn` builds the adapter inside the x64 context."""
  from jax.test_util import check_grads
  with enable_x64():
    params = tiny_params(dtype=jnp.float64)
    batch = tiny_batch(dtype=jnp.float64)
    adapter = adapter_fn()
    stats = stats_fn(params) if stats_fn else None
    base, state = adapter.init(jax.random.key(5), params, stats)
    state = perturb(_cast(state, jnp.float64), jax.random.key(6), scale=0.1)

    def loss(trainable):
      s = base_lib.AdapterState(trainable, state.frozen)
      return tiny_loss(adapter.apply(base, s), batch) + adapter.penalty(s)

    # jit: the checker evaluates the loss at several points; eager dispatch would dominate.
    check_grads(jax.jit(loss), (state.trainable,), order=1, modes=("rev",), atol=1e-5,
                rtol=1e-5)


def make_step(adapter, optimizer=None):
  """A train step over the trainable state only, on `tiny_loss` (`steps.make_train_step`).

  Returns `(step, opt)`: `step(base, state, opt_state, batch, step_count=None) -> (state,
  opt_state, loss)` with `opt_state = opt.init(state.trainable)`. With a `step_count`, methods
  that have `adapter.update` (rank growth/pruning) are updated after the optimizer step, as the
  trainer does; without one they are not. The state is not donated.
  """
  optimizer = optax.adam(1e-2) if optimizer is None else optimizer
  task_loss = lambda params, batch, rng: (tiny_loss(params, batch), {})
  with_update = steps.make_train_step(adapter, task_loss, optimizer, donate=False)
  without_update = steps.make_train_step(adapter._replace(update=None), task_loss, optimizer,
                                         donate=False)

  def step(base, state, opt_state, batch, step_count=None):
    train_step = without_update if step_count is None else with_update
    count = jnp.asarray(0 if step_count is None else step_count, jnp.int32)
    train_state = {"adapter": state.trainable, "frozen": state.frozen, "head": {},
                   "opt": opt_state, "step": count, "rng": None}
    train_state, metrics = train_step(train_state, base, batch)
    return steps.adapter_state(train_state), train_state["opt"], metrics["loss"]

  def init(trainable):
    return optimizer.init({"adapter": trainable, "head": {}})

  return step, optax.GradientTransformation(init, optimizer.update)


def check_jit_stable(adapter, stats=None, dtypes=(jnp.float32, jnp.bfloat16)):
  """Under jit, three optimizer steps compile once, keep state structure/dtypes, and the adapted
  params keep the structure and dtypes of `params` (bf16 bases too)."""
  for dtype in dtypes:
    params = tiny_params(dtype=dtype)
    batch = tiny_batch(dtype=dtype)
    base, state = adapter.init(jax.random.key(7), params, stats)
    step, opt = make_step(adapter)
    chex.clear_trace_counter()

    def train_step(b, s, o, x):
      return step(b, s, o, x)

    jitted = jax.jit(chex.assert_max_traces(train_step, n=1))
    opt_state = opt.init(state.trainable)
    s = state
    for _ in range(3):
      s, opt_state, loss = jitted(base, s, opt_state, batch)
      chex.assert_trees_all_equal_shapes_and_dtypes(s, state)
    if not np.isfinite(float(loss)):
      raise AssertionError(f"non-finite loss {loss} with {jnp.dtype(dtype).name} params")
    merged = jax.jit(lambda b, s: structured.merge(adapter.apply(b, s)))(base, s)
    chex.assert_trees_all_equal_shapes_and_dtypes(merged, params)


def check_only_trainable_change(adapter, stats=None):
  """After optimizer steps the base and frozen buffers are bitwise unchanged; trainables move."""
  params = tiny_params()
  batch = tiny_batch()
  base, state = adapter.init(jax.random.key(8), params, stats)
  base0 = jax.tree_util.tree_map(np.array, base)
  frozen0 = jax.tree_util.tree_map(np.array, state.frozen)
  step, opt = make_step(adapter)
  opt_state = opt.init(state.trainable)
  s = state
  for _ in range(2):
    s, opt_state, _ = step(base, s, opt_state, batch)
  chex.assert_trees_all_equal(base, base0)
  chex.assert_trees_all_equal(s.frozen, frozen0)
  moved = [not np.array_equal(np.asarray(a), np.asarray(b))
           for a, b in zip(jax.tree_util.tree_leaves(s.trainable),
                           jax.tree_util.tree_leaves(state.trainable))]
  if not any(moved):
    raise AssertionError("no trainable leaf changed after two optimizer steps")


def check_learns(adapter, *, steps=150, max_ratio=0.5, lr=1e-2, stats=None):
  """Fits a teacher (the base model with a random low-rank change of its dense kernels): final
  loss must fall below `max_ratio` x the initial loss."""
  params = tiny_params()
  batch = dict(tiny_batch())
  k = jax.random.split(jax.random.key(9), 4)
  teacher = jax.tree_util.tree_map(lambda x: x, params)
  teacher["dense_0"]["kernel"] = params["dense_0"]["kernel"] + \
      0.8 * jnp.outer(jax.random.normal(k[0], (6,)), jax.random.normal(k[1], (8,)))
  teacher["dense_1"]["kernel"] = params["dense_1"]["kernel"] + \
      0.8 * jnp.outer(jax.random.normal(k[2], (8,)), jax.random.normal(k[3], (6,)))
  batch["y"] = tiny_apply(teacher, batch)
  base, state = adapter.init(jax.random.key(10), params, stats)
  step, opt = make_step(adapter, optax.adam(lr))
  opt_state = opt.init(state.trainable)
  s, losses = state, []
  for _ in range(steps):
    s, opt_state, loss = step(base, s, opt_state, batch)
    losses.append(float(loss))
  if not losses[-1] < max_ratio * losses[0]:
    raise AssertionError(f"loss did not fall enough: {losses[0]:.4g} -> {losses[-1]:.4g} "
                         f"(need < {max_ratio} x initial)")
  return losses


def check_merge_roundtrip(adapter, stats=None):
  """merge -> unmerge -> merge: unmerge recovers the base; re-merging gives the same params."""
  params = tiny_params()
  base, state = adapter.init(jax.random.key(11), params, stats)
  state = perturb(state, jax.random.key(12))
  merged = structured.merge(adapter.apply(base, state))
  recovered = introspect.unmerge(merged, adapter, state)
  assert_close(recovered, structured.merge(base), scale=10)
  merged2 = structured.merge(adapter.apply(recovered, state))
  assert_close(merged2, merged, scale=10)
