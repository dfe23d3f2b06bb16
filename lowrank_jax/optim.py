"""Optimizer and learning-rate schedule from a config's `optimizer` block.

The optimizer works on the train step's trainable tree `{"adapter": ..., "head": ...}`
(`lowrank_jax.steps`) with one learning rate for the adapter (`lr`) and one for the fully
trained head (`head_lr`), both on the same schedule, after optional global-norm clipping.

Fields: name (adamw | sgd), lr, head_lr, wd, b1 (adamw beta1; sgd momentum), b2, schedule
(constant | cosine | linear), warmup_steps (linear warm-up from 0), grad_clip (0: none).

>>> import ml_collections
>>> from lowrank_jax import optim
>>> ocfg = ml_collections.ConfigDict(dict(name="adamw", lr=1e-3, head_lr=1e-2, wd=0.0, b1=0.9,
...                                       b2=0.999, schedule="cosine", warmup_steps=10))
>>> [round(float(optim.make_schedule(ocfg, ocfg.lr, 100)(s)), 6) for s in (0, 5, 10, 100)]
[0.0, 0.0005, 0.001, 0.0]
"""
from __future__ import annotations

import jax
import optax

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "cosine", "linear")


def make_schedule(ocfg, lr: float, total_steps: int) -> optax.Schedule:
  """`ocfg.schedule` peaking at `lr` after `ocfg.warmup_steps` linear warm-up steps.

  Raises:
    ValueError: unknown schedule (lists the valid ones).
  """
  if ocfg.schedule not in SCHEDULES:
    raise ValueError(f"Unknown optimizer.schedule {ocfg.schedule!r}; valid: {list(SCHEDULES)}")
  warm = int(ocfg.get("warmup_steps", 0))
  if ocfg.schedule == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), optax.constant_schedule(lr)],
                                [warm]) if warm else optax.constant_schedule(lr)
  if ocfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, warm, max(total_steps, warm + 1), 0.0)
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warm),
                               optax.linear_schedule(lr, 0.0, max(total_steps - warm, 1))], [warm])


def make_optimizer(ocfg, total_steps: int) -> optax.GradientTransformation:
  """`optimizer.name` with schedules for `lr` (adapter) and `head_lr` (head), clipping, decay.

  Raises:
    ValueError: unknown optimizer or schedule (lists the valid ones).
  """
  if ocfg.name not in OPTIMIZERS:
    raise ValueError(f"Unknown optimizer.name {ocfg.name!r}; valid: {list(OPTIMIZERS)}")

  def one(lr):
    sched = make_schedule(ocfg, lr, total_steps)
    if ocfg.name == "adamw":
      return optax.adamw(sched, b1=ocfg.b1, b2=ocfg.b2, weight_decay=ocfg.wd)
    return optax.chain(optax.add_decayed_weights(ocfg.wd), optax.sgd(sched, momentum=ocfg.b1))

  tx = optax.multi_transform(
      {"adapter": one(ocfg.lr), "head": one(ocfg.head_lr)},
      lambda t: {k: jax.tree.map(lambda _: k, v) for k, v in t.items()})
  if ocfg.get("grad_clip", 0.0) > 0:
    tx = optax.chain(optax.clip_by_global_norm(ocfg.grad_clip), tx)
  return tx
