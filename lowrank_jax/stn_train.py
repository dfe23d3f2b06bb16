"""Self-Tuning Networks in the runner: `lowrank_jax.train.train_and_evaluate` hands a run of the
adapter method "stn" (`lowrank_jax.adapters.stn`) to `train_and_evaluate` here.

The run tunes the hyperparameters of `config.stn` with the alternating STN algorithm
(`lowrank_jax.stn`): ``warmup_steps`` train steps, then cycles of ``train_steps`` train steps on
``dataset.train_split`` (hyperparameters perturbed per example around ``lam``) and
``hyper_steps`` steps of Adam on ``(lam, sigma)`` against the loss on ``stn.val_split``, until
``total_steps`` train steps are done. The hypernetwork is centred (it reads ``z - lam``), so the
adapter at input 0 (its default, see `lowrank_jax.adapters.stn.stn_adapter`) is the best response
at the current hyperparameters: the final model is evaluated, saved and merged at the final
``lam`` like any other adapter. There are no checkpoints: an interrupted run starts over.

Config block `config.stn` (`default_config`; checked by `check_config` before anything is built;
read only when `adapter.method` is "stn")::

  hyperparameters: {name: (low, high, initial)}; names from HYPERPARAMETERS:
    dropout_rate, attention_dropout_rate: the model's dropout fields (model.dropout_rate, ...),
      applied with one rate per example (models of the families MODEL_FAMILIES);
    label_smoothing: per-example label smoothing of the training cross-entropy;
    weight_decay: wd * |phi|^2 over the adapter's trainable state and the head, with the
      batch's mean wd (optimizer.wd must then be 0).
    The vector z holds them in sorted name order. Each is low + (high - low) sigmoid(z).
  val_split: the split the hyper phase reads (a tfds split expression, e.g. "train[80%:]"
    with dataset.train_split="train[:80%]"); it may be neither the train nor the eval split.
  val_batch_size: batch size of the hyper phase (0: batch_size).
  warmup_steps, train_steps, hyper_steps: warm-up train steps, then per cycle train and hyper
    steps; total_steps - warmup_steps must be a positive multiple of train_steps.
  tau: weight of the perturbation entropy in the hyper objective.
  hyper_lr: Adam learning rate of (lam, sigma).
  perturbation_std: initial std of the per-example perturbation of z.

Writes to the workdir: ``schedule.csv`` (per cycle: train steps so far, each hyperparameter's
value and perturbation std, mean train loss and hyper objective; row 0 is the start of the cycles,
with the warm-up's mean loss, nan without warm-up), ``schedule.png`` (each value as
a fraction of its range), ``metrics.jsonl``, the adapter file (unless ``save_adapter=False``) and
``results.json`` (eval accuracy and loss at the final hyperparameters, the validation split's
too, and the final values under ``hyperparameters``).
"""
from __future__ import annotations

import csv
import json
import logging
import os
import time
import types
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lowrank_jax import base as base_lib
from lowrank_jax import metrics as metrics_lib
from lowrank_jax import optim
from lowrank_jax import steps
from lowrank_jax import stn as stn_lib

PyTree = Any
METHOD = "stn"
# Tunable hyperparameters: name -> what it acts on.
HYPERPARAMETERS = {
    "dropout_rate": "the model's dropout_rate field, one rate per example",
    "attention_dropout_rate": "the model's attention_dropout_rate field, one rate per example",
    "label_smoothing": "per-example label smoothing of the training cross-entropy",
    "weight_decay": "wd * |phi|^2 over the adapter's trainable state and the head",
}
DROPOUT_FIELDS = ("dropout_rate", "attention_dropout_rate")
# Model families whose dropout takes per-example (traced) rates.
MODEL_FAMILIES = ("mlp", "cnn", "minilm")
SCHEDULE_CSV = "schedule.csv"
SCHEDULE_PNG = "schedule.png"


def default_config() -> ml_collections.ConfigDict:
  """The `config.stn` block with its defaults (``val_split`` must be set by the run config)."""
  return ml_collections.ConfigDict({
      "hyperparameters": {"dropout_rate": (0.0, 0.8, 0.2), "label_smoothing": (0.0, 0.3, 0.05),
                          "weight_decay": (0.0, 1e-3, 1e-4)},
      "val_split": "",
      "val_batch_size": 0,
      "warmup_steps": 0,
      "train_steps": 2,
      "hyper_steps": 1,
      "tau": 1e-3,
      "hyper_lr": 3e-3,
      "perturbation_std": 0.5,
  })


# =============================================================================================
# Config checks.
# =============================================================================================

def _number(field: str, value, low: float, high: float = float("inf"), low_open=False):
  """Raises ValueError naming `config.stn.<field>` unless value is a finite number in range."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
    raise ValueError(f"config.stn.{field} must be a finite number, got {value!r}")
  if (value <= low if low_open else value < low) or value > high:
    raise ValueError(f"config.stn.{field}={value!r} is out of range; valid: "
                     f"{'(' if low_open else '['}{low}, {high}]")


def _int(field: str, value, low: int):
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise ValueError(f"config.stn.{field} must be an int >= {low}, got {value!r}")


def _check_hyperparameter(name: str, spec, model_spec):
  """One entry of `config.stn.hyperparameters`: a known name the model has, a valid range."""
  where = f"config.stn.hyperparameters.{name}"
  if name not in HYPERPARAMETERS:
    raise ValueError(f"{where}: unknown hyperparameter; valid names: {sorted(HYPERPARAMETERS)}")
  if not isinstance(spec, (tuple, list)) or len(spec) != 3 or not all(
      isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in spec):
    raise ValueError(f"{where} must be (low, high, initial) numbers, got {spec!r}")
  low, high, initial = map(float, spec)
  if not low < initial < high:
    raise ValueError(f"{where}=({low}, {high}, {initial}): need low < initial < high (the "
                     f"initial value must lie strictly inside the range)")
  top = 1.0 if name in DROPOUT_FIELDS or name == "label_smoothing" else float("inf")
  if low < 0 or high > top or (name in DROPOUT_FIELDS and high >= 1.0):
    valid = "[0, 1)" if name in DROPOUT_FIELDS else "[0, 1]" if top == 1.0 else "[0, inf)"
    raise ValueError(f"{where}=({low}, {high}, {initial}): the range must lie in {valid}")
  if name in DROPOUT_FIELDS:
    if model_spec.family not in MODEL_FAMILIES:
      raise ValueError(f"{where}: model {model_spec.name!r} (family {model_spec.family!r}) does "
                       f"not take per-example dropout rates; models of the families "
                       f"{list(MODEL_FAMILIES)} do, or tune other hyperparameters")
    if not hasattr(model_spec.config, name):
      raise ValueError(f"{where}: model {model_spec.name!r} has no field {name!r}; its dropout "
                       f"fields: {[f for f in DROPOUT_FIELDS if hasattr(model_spec.config, f)]}")


def check_config(config: ml_collections.ConfigDict, model_spec, task_name: str):
  """Checks `config.stn` of a run of method "stn" (nothing for other methods).

  Args:
    config: the run config.
    model_spec: the run's `models.ModelSpec`.
    task_name: the run's task.

  Raises:
    ValueError: the first problem, naming the field and what is valid.
  """
  if config.adapter.method != METHOD:
    return
  if "stn" not in config:
    raise ValueError("adapter.method='stn' needs a config.stn block (hyperparameters, val_split, "
                     "...); start from lowrank_jax.stn_train.default_config()")
  scfg = config.stn
  unknown = sorted(set(scfg.keys()) - set(default_config().keys()))
  if unknown:
    raise ValueError(f"config.stn.{unknown[0]} is not a field; valid: "
                     f"{sorted(default_config().keys())}")
  scfg = ml_collections.ConfigDict({**default_config().to_dict(), **scfg.to_dict()})
  if task_name != "classification":
    raise ValueError(f"adapter.method='stn' trains classifiers; config.task={task_name!r}")
  if jax.process_count() > 1:
    raise ValueError(f"adapter.method='stn' runs in one process; this run has "
                     f"{jax.process_count()}")
  for field in ("num_hyperparameters", "hypernet_input"):
    if field in config.adapter:
      raise ValueError(f"config.adapter.{field} is set by the STN runner from config.stn; "
                       f"remove it")
  hps = scfg.hyperparameters
  if not hps:
    raise ValueError(f"config.stn.hyperparameters is empty; give at least one of "
                     f"{sorted(HYPERPARAMETERS)} as name: (low, high, initial)")
  for name in sorted(hps):
    _check_hyperparameter(name, hps[name], model_spec)
  if "weight_decay" in hps and config.optimizer.get("wd", 0.0) != 0.0:
    raise ValueError(f"config.optimizer.wd={config.optimizer.wd} with weight_decay tuned by the "
                     f"STN: set optimizer.wd=0.0")
  val = scfg.val_split
  if not isinstance(val, str) or not val:
    raise ValueError("config.stn.val_split must name the split of the hyper phase (a tfds split "
                     "expression such as 'train[80%:]', held out from dataset.train_split)")
  for field in ("train_split", "eval_split"):
    if val == config.dataset[field]:
      raise ValueError(f"config.stn.val_split={val!r} equals dataset.{field}; the hyper phase "
                       f"needs data the train phase does not see, and tuning on the eval split "
                       f"would leak it; hold out part of the train split")
  _int("warmup_steps", scfg.warmup_steps, 0)
  _int("train_steps", scfg.train_steps, 1)
  _int("hyper_steps", scfg.hyper_steps, 1)
  _int("val_batch_size", scfg.val_batch_size, 0)
  rest = config.total_steps - scfg.warmup_steps
  if rest < scfg.train_steps or rest % scfg.train_steps:
    raise ValueError(f"config.total_steps={config.total_steps} - stn.warmup_steps="
                     f"{scfg.warmup_steps} = {rest} must be a positive multiple of "
                     f"stn.train_steps={scfg.train_steps}")
  _number("tau", scfg.tau, 0.0)
  _number("hyper_lr", scfg.hyper_lr, 0.0, 10.0, low_open=True)
  _number("perturbation_std", scfg.perturbation_std, 0.0, low_open=True)



def _example_ranges(dataset: str, spec: str) -> list[tuple[str, int, int]]:
  """(split name, first, end) example ranges that the tfds split expression `spec` reads."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from lowrank_jax import data  # pylint: disable=g-import-not-at-top
  names = {part.split("[")[0].strip() for part in spec.split("+")}
  sizes = {n: types.SimpleNamespace(num_examples=len(data.load(dataset, n))) for n in names}
  out = []
  for ins in tfds.core.ReadInstruction.from_spec(spec).to_absolute(sizes):
    n = sizes[ins.splitname].num_examples
    out.append((ins.splitname, ins.from_ or 0, n if ins.to is None else ins.to))
  return out


def check_held_out(dcfg, val_split: str):
  """Raises unless `val_split` reads no example that `dcfg.train_split` or `dcfg.eval_split`
  reads (compared by example index, so "train" and "train[:80%]" overlap although the strings
  differ).

  Raises:
    ValueError: naming the split field and the shared range.
  """
  val = _example_ranges(dcfg.name, val_split)
  for field in ("train_split", "eval_split"):
    for name, lo, hi in _example_ranges(dcfg.name, dcfg[field]):
      for v_name, v_lo, v_hi in val:
        if name == v_name and max(lo, v_lo) < min(hi, v_hi):
          raise ValueError(
              f"config.stn.val_split={val_split!r} shares examples {max(lo, v_lo)}.."
              f"{min(hi, v_hi) - 1} of split {name!r} with dataset.{field}={dcfg[field]!r}; the "
              f"hyper phase needs data the train phase does not see, and tuning on the eval "
              f"split would leak it; hold out part of the train split")

def stn_block(config) -> ml_collections.ConfigDict:
  """`config.stn` with the defaults of the fields it leaves out."""
  return ml_collections.ConfigDict({**default_config().to_dict(), **config.stn.to_dict()})


def hyperparameters_of(scfg) -> tuple[tuple[stn_lib.Hyperparameter, ...], list[float]]:
  """(the tuned `Hyperparameter` objects in sorted name order, their initial values)."""
  names = sorted(scfg.hyperparameters)
  specs = [tuple(map(float, scfg.hyperparameters[n])) for n in names]
  return (tuple(stn_lib.Hyperparameter(n, lo, hi) for n, (lo, hi, _) in zip(names, specs)),
          [init for _, _, init in specs])


# =============================================================================================
# Losses and the bound model.
# =============================================================================================

def smoothed_cross_entropy(logits: jax.Array, labels: jax.Array,
                           smoothing: Optional[jax.Array] = None) -> jax.Array:
  """Mean cross-entropy (float32) against one-hot labels smoothed per example: the target is
  ``(1 - e_i) onehot + e_i / C`` for ``smoothing`` e (B,), plain labels when None."""
  logits = logits.astype(jnp.float32)
  if smoothing is None:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  c = logits.shape[-1]
  e = smoothing.astype(jnp.float32)[:, None]
  targets = (1.0 - e) * jax.nn.one_hot(labels, c, dtype=jnp.float32) + e / c
  return optax.softmax_cross_entropy(logits, targets).mean()


def squared_norm(tree: PyTree) -> jax.Array:
  """Sum of squares of every float leaf of `tree` (float32)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
  return sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves), jnp.zeros(()))


def make_bind(adapter: base_lib.Adapter, frozen: PyTree):
  """`bind(phi, z)` for `lowrank_jax.stn.STN`: phi = {"adapter", "head", "base"} becomes
  {"params": the model's params with hypernetwork input z, "trainable": phi less the base}.

  The base passes through `stop_gradient`: it is frozen, and its gradient is never formed."""

  def bind(phi, z):
    params = steps.adapted_params(adapter, jax.lax.stop_gradient(phi["base"]),
                                  base_lib.AdapterState(phi["adapter"], frozen), phi["head"])
    return {"params": stn_lib.with_hyperparameters(params, z),
            "trainable": {"adapter": phi["adapter"], "head": phi["head"]}}
  return bind


def frozen_base(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` on phi's {"adapter", "head"}; phi's "base" gets zero updates and no optimizer state."""
  trained = lambda t: {"adapter": t["adapter"], "head": t["head"]}

  def init(phi):
    return tx.init(trained(phi))

  def update(grads, state, phi=None):
    updates, state = tx.update(trained(grads), state, None if phi is None else trained(phi))
    return {**updates, "base": jax.tree.map(jnp.zeros_like, grads["base"])}, state

  return optax.GradientTransformation(init, update)


def make_losses(model_spec, hyperparameters: tuple[stn_lib.Hyperparameter, ...]):
  """(train_loss, val_loss) of `lowrank_jax.stn.STN` for a classifier over bound params."""
  index = {h.name: i for i, h in enumerate(hyperparameters)}

  def train_loss(bound, values, batch, key):
    rates = {f: values[:, index[f]] for f in DROPOUT_FIELDS if f in index}
    logits = model_spec.with_config(**rates).classify(bound["params"], batch,
                                                      deterministic=False, rng=key)
    smoothing = values[:, index["label_smoothing"]] if "label_smoothing" in index else None
    loss = smoothed_cross_entropy(logits, batch["label"], smoothing)
    if "weight_decay" in index:
      loss = loss + jnp.mean(values[:, index["weight_decay"]]) * squared_norm(bound["trainable"])
    return loss

  def val_loss(bound, batch):
    logits = model_spec.classify(bound["params"], batch, deterministic=True)
    return smoothed_cross_entropy(logits, batch["label"])

  return train_loss, val_loss


# =============================================================================================
# The loop.
# =============================================================================================

def stack_batches(iterator, n: int) -> dict:
  """`n` batches of `iterator` stacked on a leading step axis (what the jitted phases scan)."""
  batches = [next(iterator) for _ in range(n)]
  return {k: np.stack([np.asarray(b[k]) for b in batches]) for k in batches[0]}


def schedule_row(tuner: stn_lib.STN, state: stn_lib.STNState, step: int, cycle: int,
                 train_loss: float, hyper_objective: float) -> dict:
  """One row of `schedule.csv`: the hyperparameters' values and perturbation stds now."""
  values = np.asarray(tuner.values(state.hyper), np.float64)
  stds = np.asarray(jax.nn.softplus(state.scale), np.float64)
  row = {"step": step, "cycle": cycle}
  for h, v, s in zip(tuner.hyperparameters, values, stds):
    row[h.name] = float(v)
    row[f"{h.name}_std"] = float(s)
  row.update(train_loss=train_loss, hyper_objective=hyper_objective)
  return row


def write_schedule(workdir: str, rows: list[dict], hyperparameters) -> tuple[str, str]:
  """Writes `schedule.csv` and `schedule.png` (values as fractions of their ranges)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  csv_path, png_path = os.path.join(workdir, SCHEDULE_CSV), os.path.join(workdir, SCHEDULE_PNG)
  with open(csv_path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  fig, ax = plt.subplots(figsize=(6, 3.5))
  steps_axis = [r["step"] for r in rows]
  for h in hyperparameters:
    ax.plot(steps_axis, [(r[h.name] - h.low) / (h.high - h.low) for r in rows],
            label=f"{h.name} [{h.low:g}, {h.high:g}]")
  ax.set_xlabel("train step")
  ax.set_ylabel("value as a fraction of its range")
  ax.set_ylim(0.0, 1.0)
  ax.legend(fontsize=8)
  ax.set_title("STN hyperparameter schedule")
  fig.tight_layout()
  fig.savefig(png_path, dpi=120)
  plt.close(fig)
  return csv_path, png_path


def evaluate(eval_fn, phi, z, batches: list[dict], task) -> dict:
  """`task.summarize` of the eval metrics summed over fixed-shape `batches` at input `z`."""
  from lowrank_jax import tasks  # pylint: disable=g-import-not-at-top
  totals = {}
  for batch in batches:
    totals = tasks.sum_metrics(totals, jax.device_get(eval_fn(phi, z, batch)))
  return task.summarize(totals)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       baseline: Optional[dict] = None,
                       t_start: Optional[float] = None) -> dict:
  """Trains an STN adapter run of a checked `config` (see the module docstring); returns and
  writes its results, like `lowrank_jax.train.train_and_evaluate`.

  Args:
    config: the run config (method "stn", with `config.stn`).
    workdir: the run directory (already checked and locked by the trainer).
    baseline: the frozen-base baseline's results, if the trainer ran it.
    t_start: when the run (with its baseline) started, for the total wall time.
  """
  from lowrank_jax import adapter_io  # pylint: disable=g-import-not-at-top
  from lowrank_jax import tasks  # pylint: disable=g-import-not-at-top
  from lowrank_jax import train  # pylint: disable=g-import-not-at-top
  t_run = time.perf_counter()
  t_start = t_run if t_start is None else t_start
  scfg = stn_block(config)
  hyperparameters, initial = hyperparameters_of(scfg)
  task = tasks.get_task(config.get("task", train.DEFAULT_TASK))
  k_model, k_adapter, rng_loop = train.run_keys(config.seed)
  model, data = train.make_classifier_and_data(config, k_model)
  check_held_out(config.dataset, scfg.val_split)
  val_source = train.load_split(config.dataset, scfg.val_split, 0)
  val_batch_size = scfg.val_batch_size or config.batch_size
  val_iter = train.train_iterator(val_source, data.transform, val_batch_size,
                                  config.dataset.shuffle_seed + 1)
  adapter, base, ad_state, head = train.init_adapter(config, model, data, k_adapter)
  counts = train.param_counts(METHOD, ad_state, head)
  train_loss, val_loss = make_losses(model.spec, hyperparameters)
  bind = make_bind(adapter, ad_state.frozen)
  tuner = stn_lib.STN(hyperparameters, train_loss, val_loss,
                      frozen_base(optim.make_optimizer(config.optimizer, config.total_steps)),
                      optax.adam(scfg.hyper_lr), entropy_weight=float(scfg.tau), centered=True,
                      bind=bind)
  phi = {"adapter": ad_state.trainable, "head": head, "base": base}
  state = stn_lib.init(tuner, phi, initial, float(scfg.perturbation_std))
  logging.info("stn: %d hyperparameters %s from %s; %d warm-up steps, then cycles of %d train + "
               "%d hyper steps", len(hyperparameters), [h.name for h in hyperparameters], initial,
               scfg.warmup_steps, scfg.train_steps, scfg.hyper_steps)

  writer = metrics_lib.MetricWriter(workdir)
  writer.write(0, {"trainable_params": counts["trainable_params"]})
  done = 0   # train steps taken; each phase's key is fold_in(loop key, its first step)
  while done < scfg.warmup_steps:
    n = min(scfg.train_steps, scfg.warmup_steps - done)
    state, losses = stn_lib.train_phase(tuner, state, stack_batches(data.train_iter, n),
                                        jax.random.fold_in(rng_loop, done))
    done += n
  warm_loss = float(np.mean(jax.device_get(losses))) if done else float("nan")
  rows = [schedule_row(tuner, state, done, 0, warm_loss, float("nan"))]
  num_cycles = (config.total_steps - scfg.warmup_steps) // scfg.train_steps
  log_every = max(1, config.get("log_every", 50))
  t_loop = time.perf_counter()
  for c in range(1, num_cycles + 1):
    state, (t_losses, h_losses) = stn_lib.cycle(
        tuner, state, stack_batches(data.train_iter, scfg.train_steps),
        stack_batches(val_iter, scfg.hyper_steps), jax.random.fold_in(rng_loop, done))
    done += scfg.train_steps
    t_losses, h_losses = jax.device_get((t_losses, h_losses))
    rows.append(schedule_row(tuner, state, done, c, float(np.mean(t_losses)),
                             float(np.mean(h_losses))))
    if not np.isfinite(rows[-1]["train_loss"] + rows[-1]["hyper_objective"]):
      raise FloatingPointError(f"stn: a non-finite loss in cycle {c} (step {done}): {rows[-1]}; "
                               f"lower optimizer.lr or stn.hyper_lr")
    if c % log_every == 0 or c == num_cycles:
      row = rows[-1]
      writer.write(done, {"loss": row["train_loss"], **{
          k: v for k, v in row.items() if k not in ("step", "cycle", "train_loss")}})
      logging.info("stn cycle %d (step %d): %s; train loss %.4f, hyper objective %.4f", c, done,
                   ", ".join(f"{h.name}={row[h.name]:.4g}" for h in hyperparameters),
                   row["train_loss"], row["hyper_objective"])
  train_s = time.perf_counter() - t_loop
  csv_path, png_path = write_schedule(workdir, rows, hyperparameters)

  # The model at the final hyperparameters: centred input z - lam = 0.
  z_final = tuner.hypernet_input(state.hyper, state.hyper)
  eval_fn = jax.jit(lambda phi, z, batch: task.eval_metrics(
      model.apply(bind(phi, z)["params"], batch, train=False, rng=None), batch))
  ev = evaluate(eval_fn, state.params, z_final,
                data.fixed_batches(data.eval_source, config.eval_batch_size), task)
  val = evaluate(eval_fn, state.params, z_final,
                 data.fixed_batches(val_source, config.eval_batch_size), task)
  writer.write(config.total_steps, ev)
  writer.close()
  final = {h.name: rows[-1][h.name] for h in hyperparameters}
  host = jax.device_get({"adapter": state.params["adapter"], "frozen": ad_state.frozen,
                         "head": state.params["head"]})
  adapter_path = train.save_outputs(config, workdir, model, adapter, host)
  results = {"method": METHOD, **ev, "val_accuracy": val["accuracy"], "val_loss": val["eval_loss"],
             "hyperparameters": final, "initial_hyperparameters": dict(
                 zip([h.name for h in hyperparameters], initial)),
             **counts, "steps": config.total_steps, "cycles": num_cycles, "resumed_from": 0,
             "train_s": train_s, "wall_s": time.perf_counter() - t_run,
             "total_wall_s": time.perf_counter() - t_start, "adapter_path": adapter_path,
             "adapter_bytes": train._dir_bytes(adapter_path),   # pylint: disable=protected-access
             "schedule_csv": csv_path, "schedule_png": png_path, "workdir": workdir,
             "config": config.to_dict()}
  if baseline is not None:
    results["baseline"] = {k: baseline[k] for k in ("accuracy", "eval_loss", "trainable_params",
                                                    "wall_s")}
  with adapter_io.atomic_path(os.path.join(workdir, train.RESULTS_FILE)) as tmp, \
      open(tmp, "w") as f:
    json.dump(results, f, indent=2, default=str)
  print("[stn] final hyperparameters: " + ", ".join(
      f"{k} {initial_v:.4g} -> {v:.4g}" for (k, v), initial_v in zip(final.items(), initial)) +
        f"; val accuracy {val['accuracy']:.4f}", flush=True)
  train._print_summary(results)   # pylint: disable=protected-access
  return results
