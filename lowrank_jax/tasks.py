"""Tasks: what a batch holds besides the model inputs, the training loss and the eval metrics.

A task sees the model's output and the batch, never the model: the trainer applies the model and
hands the output over, so one task serves every model that produces its output.

>>> import jax.numpy as jnp
>>> from lowrank_jax import tasks
>>> task = tasks.get_task("classification")
>>> logits = jnp.array([[2.0, 0.0], [0.0, 2.0]])
>>> batch = {"label": jnp.array([0, 0]), "mask": jnp.array([1.0, 0.0])}
>>> {k: float(v) for k, v in task.eval_metrics(logits, batch).items()}['correct']
1.0
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

Batch = Mapping[str, Any]


class Classification(NamedTuple):
  """Single-label classification of logits (B, num_classes) against integer `label` (B,).

  Attributes:
    label_key: batch key of the integer labels.
    mask_key: batch key of the eval padding mask (1: a real example, 0: padding).
  """
  label_key: str = "label"
  mask_key: str = "mask"
  model_kind = "classifier"    # what the trainer builds: a model with a `classify` output

  @property
  def train_keys(self) -> tuple[str, ...]:
    """Batch keys (besides the model inputs) the loss reads."""
    return (self.label_key,)

  @property
  def eval_keys(self) -> tuple[str, ...]:
    """Batch keys (besides the model inputs) `eval_metrics` reads."""
    return (self.label_key, self.mask_key)

  def loss(self, logits: jax.Array, batch: Batch) -> tuple[jax.Array, dict]:
    """Mean cross-entropy in float32, and {"ce", "train_accuracy"}."""
    labels = batch[self.label_key]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                         labels).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return ce, {"ce": ce, "train_accuracy": accuracy}

  def eval_metrics(self, logits: jax.Array, batch: Batch) -> dict:
    """Sums over the unmasked examples: {"correct", "loss" (float32 cross-entropy), "count"}."""
    labels, mask = batch[self.label_key], batch[self.mask_key]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return {"correct": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
            "loss": jnp.sum(ce * mask), "count": jnp.sum(mask)}

  def summarize(self, totals: Mapping[str, float]) -> dict:
    """{"accuracy", "eval_loss"} from the `eval_metrics` sums over all eval batches."""
    return {"accuracy": totals["correct"] / totals["count"],
            "eval_loss": totals["loss"] / totals["count"]}


class CausalLM(NamedTuple):
  """Next-token prediction: logits (B, T, vocab) at position t score token t + 1 of `input_ids`,
  weighted by `loss_mask` at t (0 on prompts when training on responses only, on padding, and on
  the last token of each packed example, so no target crosses examples).

  Attributes:
    ids_key: batch key of the int token ids (B, T).
    mask_key: batch key of the float loss mask (B, T).
    segment_key: batch key of the packed segment ids (0: padding); counts the tokens read.
  """
  ids_key: str = "input_ids"
  mask_key: str = "loss_mask"
  segment_key: str = "segment_ids"
  model_kind = "decoder"       # what the trainer builds: a model with an `lm_logits` output

  @property
  def train_keys(self) -> tuple[str, ...]:
    return (self.ids_key, self.mask_key, self.segment_key)

  @property
  def eval_keys(self) -> tuple[str, ...]:
    return (self.ids_key, self.mask_key)

  def token_stats(self, logits: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array,
                                                                   jax.Array]:
    """(float32 cross-entropy, correct (argmax == target), mask), each (B, T), of the targets
    `input_ids` shifted left by one (the last position's target is a dummy 0, masked out)."""
    ids = jnp.asarray(batch[self.ids_key])
    targets = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
    mask = jnp.asarray(batch[self.mask_key], jnp.float32).at[:, -1].set(0.0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return ce, correct, mask

  def loss(self, logits: jax.Array, batch: Batch) -> tuple[jax.Array, dict]:
    """Mean cross-entropy over the masked tokens, and {"ce", "perplexity", "train_accuracy",
    "tokens" (non-padding tokens read, for the trainer's tokens/s)}."""
    ce, correct, mask = self.token_stats(logits, batch)
    n = jnp.maximum(jnp.sum(mask), 1.0)
    mean_ce = jnp.sum(ce * mask) / n
    return mean_ce, {"ce": mean_ce, "perplexity": jnp.exp(mean_ce),
                     "train_accuracy": jnp.sum(correct * mask) / n,
                     "tokens": jnp.sum(batch[self.segment_key] > 0)}

  def eval_metrics(self, logits: jax.Array, batch: Batch) -> dict:
    """Sums over the masked tokens: {"loss", "correct", "count"}."""
    ce, correct, mask = self.token_stats(logits, batch)
    return {"loss": jnp.sum(ce * mask), "correct": jnp.sum(correct * mask),
            "count": jnp.sum(mask)}

  def summarize(self, totals: Mapping[str, float]) -> dict:
    """{"eval_loss" (per token), "perplexity", "accuracy" (next-token, masked), "eval_tokens"}."""
    mean = totals["loss"] / totals["count"]
    return {"eval_loss": mean, "perplexity": float(np.exp(mean)),
            "accuracy": totals["correct"] / totals["count"], "eval_tokens": totals["count"]}


TASKS = {"classification": Classification(), "causal_lm": CausalLM()}


def get_task(name: str):
  """The task `name`; raises ValueError listing the valid names."""
  if name not in TASKS:
    raise ValueError(f"Unknown task {name!r}; valid names: {sorted(TASKS)}")
  return TASKS[name]


def check_batch(batch: Batch, keys: tuple[str, ...], what: str) -> None:
  """Raises ValueError naming the keys of `keys` that `batch` lacks."""
  missing = [k for k in keys if k not in batch]
  if missing:
    raise ValueError(f"{what} batch is missing {missing}; it has {sorted(batch)}")


def sum_metrics(totals: Mapping[str, float], metrics: Mapping[str, Any]) -> dict:
  """Adds one batch's (host) metric sums to the running `totals`."""
  return {k: totals.get(k, 0.0) + float(np.asarray(v)) for k, v in metrics.items()}
