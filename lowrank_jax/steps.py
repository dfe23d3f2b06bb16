"""One train step and one eval step, shared by the trainer, `testing`, benchmarks and experiments.

The step follows flax examples' `apply_model` (loss and gradients of the model applied to a batch,
then the update) with big_vision's hygiene: the train state is donated, the step's key is
`fold_in(rng, step)` (a resumed run sees the same keys), nothing syncs with the host, and the base
params are a separate argument that is neither donated nor differentiated.

The train state is a plain dict::

  adapter   the adapter's trainable state (differentiated; updated by the optimizer),
  frozen    the adapter's frozen buffers (changed only by `adapter.update`),
  head      params trained fully (a nested partial tree of the params, e.g. a classifier head,
            overriding the same paths of the adapted params); {} for none,
  opt       the optimizer state of the trainable tree {"adapter": ..., "head": ...},
  step      int32 count of steps taken,
  rng       key data of the loop key; None makes every step deterministic (no dropout keys).

Gradients are taken of the task loss (w.r.t. adapter and head) and of `adapter.penalty` (w.r.t.
the adapter only: it depends on nothing else) separately. The optimizer gets their sum;
`adapter.update` (rank growth or pruning) gets the task gradient when `adapter.update_grad` is
"task", else the sum.

>>> import jax, jax.numpy as jnp, optax, lowrank_jax as lj
>>> from lowrank_jax import steps
>>> params = {'dense': {'kernel': jnp.ones((4, 3))}}
>>> adapter = lj.lora(rank=2, targets=r'dense/kernel')
>>> base, st = adapter.init(jax.random.key(0), params)
>>> def task_loss(p, batch, rng):
...   y = batch['x'] @ lj.merge(p)['dense']['kernel']
...   return jnp.mean((y - batch['y']) ** 2), {}
>>> opt = optax.sgd(0.1)
>>> train_step = steps.make_train_step(adapter, task_loss, opt)
>>> state = steps.init_train_state(st, opt)
>>> batch = {'x': jnp.ones((2, 4)), 'y': jnp.zeros((2, 3))}
>>> state, metrics = train_step(state, base, batch)
>>> int(state['step']), sorted(metrics)
(1, ['grad_norm', 'loss', 'penalty'])
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import optax

from lowrank_jax import base as base_lib
from lowrank_jax import quant
from lowrank_jax import structured
from lowrank_jax import tree as tree_lib

PyTree = Any
Batch = Mapping[str, Any]
# task_loss(params, batch, rng) -> (scalar loss, {name: metric}); rng is None when deterministic.
TaskLoss = Callable[[PyTree, Batch, Optional[jax.Array]], tuple[jax.Array, dict]]
# eval_metrics(params, batch) -> {name: array}.
EvalMetrics = Callable[[PyTree, Batch], dict]


def init_train_state(adapter_state: base_lib.AdapterState, optimizer: optax.GradientTransformation,
                     *, head: Optional[PyTree] = None,
                     rng: Optional[jax.Array] = None) -> dict:
  """The train state at step 0 (see the module docstring), every leaf in its own buffer.

  Args:
    adapter_state: the adapter's initial state (`adapter.init`).
    optimizer: the optimizer of the trainable tree `{"adapter": ..., "head": ...}`.
    head: params trained fully, as a nested partial tree of the params; None: none.
    rng: the loop key; None: deterministic steps.

  Raises:
    ValueError: the adapter state or the head holds a quantized weight (those are frozen).
  """
  head = {} if head is None else head
  quant.check_frozen({"adapter": adapter_state.trainable, "head": head}, "the trained params")
  state = {"adapter": adapter_state.trainable, "frozen": adapter_state.frozen, "head": head,
           "opt": optimizer.init({"adapter": adapter_state.trainable, "head": head}),
           "step": jnp.zeros((), jnp.int32),
           "rng": None if rng is None else jax.random.key_data(rng)}
  # An init may share one array between leaves (or with the base); a donated buffer must be
  # donated once and must not be a buffer of the base.
  return jax.tree.map(lambda x: jnp.array(x, copy=True), state)


def adapter_state(state: dict) -> base_lib.AdapterState:
  """The adapter state held in a train state."""
  return base_lib.AdapterState(state["adapter"], state["frozen"])


def adapted_params(adapter: base_lib.Adapter, base: PyTree, state: base_lib.AdapterState,
                   head: PyTree, rng: Optional[jax.Array] = None) -> PyTree:
  """The model params: `adapter.apply(base, state)` with the `head` paths replaced."""
  params = adapter.apply(base, state, rng=rng)
  if not head:
    return params
  return tree_lib.replace_by_name(params, tree_lib.unnest(head), is_leaf=structured.is_structured,
                                  what="head")


def _split_key(state: dict) -> tuple[Optional[jax.Array], Optional[jax.Array]]:
  """(adapter key, model key) of this step: split(fold_in(rng, step)), or (None, None)."""
  if state["rng"] is None:
    return None, None
  rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
  k_adapter, k_model = jax.random.split(rng)
  return k_adapter, k_model


def loss_and_grads(adapter: base_lib.Adapter, task_loss: TaskLoss, state: dict, base: PyTree,
                   batch: Batch) -> tuple[dict, dict, dict]:
  """Loss, metrics and gradients of one batch (flax examples' `apply_model`).

  Returns:
    (metrics, task_grads, grads): metrics hold `loss` (task loss + penalty), `penalty` and the
    task's own metrics; `task_grads` is the gradient of the task loss and `grads` that of task loss
    + penalty, both of the trainable tree {"adapter": ..., "head": ...}.
  """
  k_adapter, k_model = _split_key(state)
  frozen = state["frozen"]

  def task_fn(trainable):
    st = base_lib.AdapterState(trainable["adapter"], frozen)
    params = adapted_params(adapter, base, st, trainable["head"], rng=k_adapter)
    return task_loss(params, batch, k_model)

  def penalty_fn(adapter_trainable):
    return adapter.penalty(base_lib.AdapterState(adapter_trainable, frozen))

  trainable = {"adapter": state["adapter"], "head": state["head"]}
  (loss, aux), task_grads = jax.value_and_grad(task_fn, has_aux=True)(trainable)
  penalty, penalty_grads = jax.value_and_grad(penalty_fn)(state["adapter"])
  grads = {"adapter": jax.tree.map(jnp.add, task_grads["adapter"], penalty_grads),
           "head": task_grads["head"]}
  return {"loss": loss + penalty, "penalty": penalty, **aux}, task_grads, grads


def make_train_step(adapter: base_lib.Adapter, task_loss: TaskLoss,
                    optimizer: optax.GradientTransformation, *,
                    donate: bool = True,
                    skip_nonfinite: bool = False,
                    state_shardings: Optional[PyTree] = None) -> Callable[[dict, PyTree, Batch],
                                                              tuple[dict, dict]]:
  """The jitted `train_step(state, base, batch) -> (state, metrics)`.

  One optimizer step on the trainable tree, then `adapter.update(state, grads, step)` (when the
  adapter has one) with the gradient `adapter.update_grad` names. `metrics` hold `loss`,
  `penalty`, `grad_norm` (of the optimizer's gradient) and the task's metrics, on device.

  Args:
    adapter: the adapter.
    task_loss: `(params, batch, rng) -> (loss, metrics)` of the adapted params.
    optimizer: optimizer of `{"adapter": ..., "head": ...}` (`init_train_state` initializes it).
    donate: donate the train state (the caller must not reuse the state it passes).
    skip_nonfinite: a step whose loss or gradients hold a NaN/Inf leaves the adapter, head and
      optimizer state as they were (the step count and data still advance); `metrics["skipped"]`
      is 1 on such a step, else 0.
    state_shardings: shardings of the train state (a tree like it, `lowrank_jax.sharding`); the
      new state is constrained to them, so a sharded state keeps its layout from step to step.

  Raises:
    ValueError: `adapter.update_grad` is not one of `base.UPDATE_GRADS`.
  """
  if adapter.update_grad not in base_lib.UPDATE_GRADS:
    raise ValueError(f"adapter {adapter.name!r} has update_grad={adapter.update_grad!r}; valid: "
                     f"{list(base_lib.UPDATE_GRADS)}")

  def train_step(state, base, batch):
    metrics, task_grads, grads = loss_and_grads(adapter, task_loss, state, base, batch)
    trainable = {"adapter": state["adapter"], "head": state["head"]}
    updates, opt = optimizer.update(grads, state["opt"], trainable)
    trainable = optax.apply_updates(trainable, updates)
    new_adapter = base_lib.AdapterState(trainable["adapter"], state["frozen"])
    if adapter.update is not None:   # rank growth / pruning, outside the gradient
      seen = task_grads if adapter.update_grad == "task" else grads
      new_adapter = adapter.update(new_adapter, seen["adapter"], state["step"])
    new_state = {"adapter": new_adapter.trainable, "frozen": new_adapter.frozen,
                 "head": trainable["head"], "opt": opt, "step": state["step"] + 1,
                 "rng": state["rng"]}
    metrics = {**metrics, "grad_norm": optax.global_norm(grads)}
    if skip_nonfinite:
      finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
      kept = {k: state[k] for k in ("adapter", "frozen", "head", "opt")}
      new_state.update(jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                    {k: new_state[k] for k in kept}, kept))
      metrics["skipped"] = 1 - finite.astype(jnp.int32)
    if state_shardings is not None:
      new_state = jax.lax.with_sharding_constraint(new_state, state_shardings)
    return new_state, metrics

  return jax.jit(train_step, donate_argnums=(0,) if donate else ())


def make_eval_step(adapter: base_lib.Adapter,
                   eval_metrics: EvalMetrics) -> Callable[[dict, PyTree, Batch], dict]:
  """The jitted `eval_step(state, base, batch) -> eval_metrics(adapted params, batch)`;
  deterministic (no dropout keys), the state is not donated."""

  def eval_step(state, base, batch):
    params = adapted_params(adapter, base, adapter_state(state), state["head"])
    return eval_metrics(params, batch)

  return jax.jit(eval_step)
