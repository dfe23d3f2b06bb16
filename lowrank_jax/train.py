"""The trainer: `train_and_evaluate(config, workdir)` fine-tunes a model with an adapter.

One flat function split by banner comments (big_vision `train.py`, flax examples), called by
`experiments/run.py` and by colabs alike. What happens, in order:

  config check -> workdir (refuse a different config) -> mesh -> data (grain, checkpointable
  iterator) -> model (+ head) -> adapter init (calibration stats if the method needs them) ->
  optimizer -> train state {adapter, head, opt, step, rng} -> jit(update_fn, donate) ->
  restore latest checkpoint -> loop (eval, metrics, checkpoints, progress) -> adapter file, results.

Gradients are taken with respect to the adapter's trainable state and the classification head
only; the base params are a separate jit argument that is neither donated nor differentiated. The
train state is donated. The step's rng is `fold_in(rng, step)`, so a resumed run sees the same keys.

Config fields (all numbers that change a result live in the config; see `configs/`):

  seed, total_steps, batch_size, eval_batch_size, eval_every, log_every, ckpt_every, keep_ckpts,
  model.{name, pretrained}, head (regex of params trained fully),
  dataset.{name, train_split, eval_split, max_train_examples, max_eval_examples, seq_len,
  shuffle_seed}, adapter.{method, **factory kwargs}, optimizer.{name, lr, head_lr, wd, b1, b2,
  schedule, warmup_steps, grad_clip}, calib_batches, baseline, save_adapter, export_peft,
  progress, overwrite.
"""
from __future__ import annotations

import dataclasses
import inspect as inspect_mod
import json
import logging
import os
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lowrank_jax import base as base_lib
from lowrank_jax import checkpoint as ckpt_lib
from lowrank_jax import metrics as metrics_lib
from lowrank_jax import registry
from lowrank_jax import structured
from lowrank_jax import targeting
from lowrank_jax import tree as tree_lib

RESULTS_FILE = "results.json"
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "cosine", "linear")
REQUIRED_FIELDS = ("seed", "total_steps", "batch_size", "model", "dataset", "adapter",
                   "optimizer", "head")
# Fields of earlier versions of the config schema; a config still holding one is an error.
DEPRECATED_FIELDS = ("num_train_steps", "learning_rate", "lr")


# =============================================================================================
# Data: `lowrank_jax.data` sources -> grain pipelines (train: shuffled, repeated, checkpointable
# iterator; eval: fixed-shape batches whose last one is padded and masked).
# =============================================================================================

IMAGE_SCALE = {"digits": 1.0 / 16.0, "fashion_mnist": 1.0 / 255.0}


def load_split(dcfg, split: str, max_examples: int):
  """A random-access source of a split (`lowrank_jax.data.load`); the first `max_examples` (0:
  all) examples of its stored (shuffled) order."""
  from lowrank_jax import data  # pylint: disable=g-import-not-at-top
  return data.load(dcfg.name, f"{split}[:{max_examples}]" if max_examples > 0 else split)


def make_transform(dcfg, tokenizer):
  """Per-example transform to model inputs: tokenized text or scaled float images + label."""
  from lowrank_jax import data  # pylint: disable=g-import-not-at-top
  if dcfg.name == "wordnet_supersense":
    if tokenizer is None:
      raise ValueError(f"dataset {dcfg.name} is text; use a text model (e.g. model.name='minilm')")
    return data.text_transform(tokenizer, text_key="gloss")
  if tokenizer is not None:
    raise ValueError(f"dataset {dcfg.name} is images; model is a text model")
  return data.image_transform(scale=IMAGE_SCALE.get(dcfg.name, 1.0 / 255.0))


def num_classes_of(name: str) -> int:
  from lowrank_jax import data  # pylint: disable=g-import-not-at-top
  return data.num_classes(name)


def train_iterator(source, transform, batch_size: int, seed: int):
  """Infinite shuffled batches, reshuffled each epoch; `get_state()`/`set_state()` checkpoint it."""
  from lowrank_jax import data  # pylint: disable=g-import-not-at-top
  if len(source) < batch_size:
    raise ValueError(f"batch_size={batch_size} exceeds the {len(source)} train examples")
  return data.make_pipeline(source, batch_size=batch_size, seed=seed, num_epochs=None,
                            transform=transform, shard_index=0, shard_count=1)


def eval_batches(source, transform, batch_size: int, limit: int = 0) -> list[dict]:
  """Fixed-shape batches with a `mask` (0 on the padding of the last batch): no recompilation.

  Args:
    source: random-access examples.
    transform: per-example transform.
    batch_size: examples per batch.
    limit: at most this many examples (0: all).
  """
  n = len(source) if limit <= 0 else min(limit, len(source))
  out = []
  for start in range(0, n, batch_size):
    exs = [transform(source[i]) for i in range(start, min(n, start + batch_size))]
    batch = {k: np.stack([e[k] for e in exs]) for k in exs[0]}
    m = len(exs)
    batch["mask"] = np.ones((m,), np.float32)
    if m < batch_size:
      batch = {k: np.concatenate([v, np.zeros((batch_size - m,) + v.shape[1:], v.dtype)])
               for k, v in batch.items()}
    out.append(batch)
  return out


# =============================================================================================
# Model: (params, apply_fn, tokenizer) from the registry in `lowrank_jax.models`.
# =============================================================================================

@dataclasses.dataclass
class Model:
  params: Any
  apply: Callable[..., jax.Array]    # apply(params, batch, *, train, rng) -> logits
  tokenizer: Any = None
  hf_cfg: Any = None                 # the model module's config (for hf_name_map / PEFT export)
  family: str = ""


_DROPOUT_FIELDS = ("dropout_rate", "attention_dropout_rate")   # model config overrides


def make_model(mcfg, num_classes: int, key: jax.Array, seq_len: int = 0) -> Model:
  """Builds the model named `mcfg.name` with a `num_classes` output.

  Raises:
    ValueError: unknown model (lists the valid names) or one that cannot classify.
  """
  from lowrank_jax import models  # pylint: disable=g-import-not-at-top
  spec = models.get_model(mcfg.name)
  mod, cfg = spec.module, spec.config
  k_init, k_head = jax.random.split(key)
  override = {k: mcfg[k] for k in _DROPOUT_FIELDS if k in mcfg}
  unknown = [k for k in override if not hasattr(cfg, k)]
  if unknown:
    has = [f for f in _DROPOUT_FIELDS if hasattr(cfg, f)]
    raise ValueError(f"model.{unknown[0]} is not a field of model {mcfg.name!r}; its dropout "
                     f"fields: {has}")
  if mod is models.minilm:
    if mcfg.get("pretrained", False):
      if mcfg.name != "minilm":
        raise ValueError(f"model.pretrained=True needs model.name='minilm', not {mcfg.name!r}")
      params, cfg = models.minilm.load_pretrained()
    else:
      params = spec.init(k_init)
    cfg = dataclasses.replace(cfg, **override)
    params = models.minilm.add_classifier_head(k_head, params, num_classes)
    tok = models.minilm.load_tokenizer(seq_len if seq_len > 0 else 128)

    def apply(p, batch, *, train, rng):
      return models.minilm.classify(p, cfg, batch, deterministic=not train, rng=rng)
    return Model(params, apply, tok, cfg, "minilm")
  if mod in (models.mlp, models.cnn, models.vit):
    if mcfg.get("pretrained", False):
      raise ValueError(f"model {mcfg.name!r} has no pretrained weights; set "
                       f"model.pretrained=False")
    params = spec.init(k_init)
    cfg = dataclasses.replace(cfg, **override)
    out = jax.eval_shape(lambda p, x: mod.apply(p, x, cfg), params, _dummy_input(cfg)).shape[-1]
    if out != num_classes:
      raise ValueError(f"model {mcfg.name!r} has {out} outputs, the dataset has {num_classes} "
                       f"classes")

    def apply(p, batch, *, train, rng):
      return mod.apply(p, batch["image"], cfg, deterministic=not train, rng=rng)
    return Model(params, apply, None, cfg, mod.__name__.rsplit(".", 1)[-1])
  classifiers = [n for n in models.list_models() if not n.startswith(("llama", "tinyllama"))]
  raise ValueError(f"model {mcfg.name!r} is not a classifier; valid classifiers: {classifiers}")


def _dummy_input(cfg) -> jax.ShapeDtypeStruct:
  if hasattr(cfg, "features"):                       # MLP
    return jax.ShapeDtypeStruct((1, cfg.features[0]), jnp.float32)
  if hasattr(cfg, "image_size"):                     # ViT
    return jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.channels), jnp.float32)
  return jax.ShapeDtypeStruct((1, 8, 8, cfg.in_channels), jnp.float32)   # CNN


# =============================================================================================
# Optimizer: optax from config, separate learning rates for the adapter and the head.
# =============================================================================================

def make_schedule(ocfg, lr: float, total_steps: int):
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
  """`optimizer.name` with schedules for `lr` (adapter) and `head_lr` (head), clipping, decay."""
  if ocfg.name not in OPTIMIZERS:
    raise ValueError(f"Unknown optimizer.name {ocfg.name!r}; valid: {list(OPTIMIZERS)}")

  def one(lr):
    sched = make_schedule(ocfg, lr, total_steps)
    if ocfg.name == "adamw":
      tx = optax.adamw(sched, b1=ocfg.b1, b2=ocfg.b2, weight_decay=ocfg.wd)
    else:
      tx = optax.chain(optax.add_decayed_weights(ocfg.wd), optax.sgd(sched, momentum=ocfg.b1))
    return tx

  tx = optax.multi_transform(
      {"adapter": one(ocfg.lr), "head": one(ocfg.head_lr)},
      lambda t: {k: jax.tree.map(lambda _: k, v) for k, v in t.items()})
  if ocfg.get("grad_clip", 0.0) > 0:
    tx = optax.chain(optax.clip_by_global_norm(ocfg.grad_clip), tx)
  return tx


# =============================================================================================
# Config checks (before anything is built: one clear message per mistake).
# =============================================================================================

def check_config(config: ml_collections.ConfigDict):
  missing = [f for f in REQUIRED_FIELDS if f not in config]
  if missing:
    raise ValueError(f"config is missing required fields {missing}")
  old = [f for f in DEPRECATED_FIELDS if f in config]
  if old:
    raise ValueError(f"config has deprecated fields {old}; use total_steps / optimizer.lr")
  from lowrank_jax import data  # pylint: disable=g-import-not-at-top
  if config.dataset.name not in data.list_datasets():
    raise ValueError(f"Unknown dataset {config.dataset.name!r}; valid names: "
                     f"{data.list_datasets()}")
  registry.get_factory(config.adapter.method)   # unknown/unavailable method -> ValueError
  from lowrank_jax import models  # pylint: disable=g-import-not-at-top
  models.get_model(config.model.name)           # unknown model -> ValueError
  for f in ("total_steps", "batch_size"):
    if config[f] < 1:
      raise ValueError(f"config.{f} must be >= 1, got {config[f]}")
  if config.batch_size % jax.device_count():
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the "
                     f"{jax.device_count()} devices of the data-parallel mesh")


def adapter_kwargs(config) -> dict:
  kw = {k: v for k, v in config.adapter.to_dict().items() if k != "method"}
  if "targets" in kw and isinstance(kw["targets"], (list, tuple)):
    kw["targets"] = list(kw["targets"])
  fn = registry.get_factory(config.adapter.method)
  try:
    sig = inspect_mod.signature(fn)
    if "total_steps" in sig.parameters and "total_steps" not in kw:
      kw["total_steps"] = int(config.total_steps)
  except (TypeError, ValueError):
    pass
  return kw


def split_head(params, head_regex: str) -> tuple[dict, list[str]]:
  """({path: leaf} of the fully trained params, their paths); '' trains no params fully."""
  if not head_regex:
    return {}, []
  paths = targeting.resolve(params, head_regex, what="config.head")
  leaves = dict(targeting.named_leaves(params))
  return {p: leaves[p] for p in paths}, paths


# =============================================================================================
# train_and_evaluate
# =============================================================================================

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config.adapter` on `config.model` and `config.dataset`; returns the final results.

  With `config.baseline=True`, first trains the frozen-base baseline (method "none": only the
  head trains) with the same steps, data and seed into `workdir/baseline`, and prints both
  accuracies.

  Args:
    config: a run config (see `configs/`); fields are listed in the module docstring.
    workdir: run directory (checkpoints, metrics.jsonl, tb/, adapter/, results.json). Reusing it
      resumes the run; a workdir holding a different config is refused unless
      `config.overwrite=True`.

  Returns:
    A dict of results (also written to `workdir/results.json`): `accuracy`, `eval_loss`,
    `trainable_params`, `steps`, `wall_s`, `adapter_path`, ... and `baseline` if run.

  Raises:
    ValueError: unknown method/model/dataset/optimizer, bad field values.
    ckpt_lib.ConfigMismatchError: `workdir` holds a run of a different config.
    FloatingPointError: the loss became NaN/inf (the message names the step).
  """
  t_start = time.perf_counter()
  check_config(config)
  baseline = None
  if config.get("baseline", False) and config.adapter.method != "none":
    bcfg = ml_collections.ConfigDict(config.to_dict())
    bcfg.baseline = False
    bcfg.save_adapter = False
    bcfg.export_peft = False
    bcfg.adapter = ml_collections.ConfigDict({"method": "none"})
    logging.info("Training the frozen-base baseline (method 'none') into %s/baseline", workdir)
    baseline = train_and_evaluate(bcfg, os.path.join(workdir, "baseline"))
  t_run = time.perf_counter()

  # -------------------------------------------------------------------------------------------
  # Workdir: a different config is refused; the same one resumes.
  # -------------------------------------------------------------------------------------------
  config_dict = config.to_dict()
  same = ckpt_lib.check_workdir_config(workdir, config_dict,
                                       overwrite=config.get("overwrite", False))
  results_path = os.path.join(workdir, RESULTS_FILE)
  if same and os.path.exists(results_path):   # finished already: report it, train nothing
    with open(results_path) as f:
      results = json.load(f)
    if results.get("steps") == config.total_steps:
      logging.info("%s holds a finished run of this config; not training again", workdir)
      _print_summary(results)
      return results

  # -------------------------------------------------------------------------------------------
  # Mesh: data parallel over all devices ('data' axis); state replicated, batch sharded.
  # -------------------------------------------------------------------------------------------
  # Auto axes: the compiler propagates shardings (explicit axes would put sharding in the types).
  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  data_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

  # -------------------------------------------------------------------------------------------
  # Model and data.
  # -------------------------------------------------------------------------------------------
  dcfg = config.dataset
  k_model, k_adapter, rng_loop = run_keys(config.seed)
  model = make_model(config.model, num_classes_of(dcfg.name), k_model, dcfg.get("seq_len", 0))
  transform = make_transform(dcfg, model.tokenizer)
  train_source = load_split(dcfg, dcfg.train_split, dcfg.max_train_examples)
  eval_source = load_split(dcfg, dcfg.eval_split, dcfg.max_eval_examples)
  train_iter = train_iterator(train_source, transform, config.batch_size, dcfg.shuffle_seed)
  logging.info("data: %d train / %d eval examples of %s", len(train_source), len(eval_source),
               dcfg.name)
  eval_data = None   # built at the first evaluation, then reused

  # -------------------------------------------------------------------------------------------
  # Adapter (+ calibration stats) and head. `base` is frozen; the head trains fully.
  # -------------------------------------------------------------------------------------------
  method = config.adapter.method
  adapter = registry.make_adapter(method, **adapter_kwargs(config))
  head_flat, head_paths = split_head(model.params, config.head)
  stats = None
  if registry.needs_stats(method):
    stats = _calibrate(config, model, train_source, transform,
                       adapter_kwargs(config).get("targets"))
  base, ad_state = adapter.init(k_adapter, model.params, stats)
  del k_adapter
  adapted_paths = set(tree_lib.unnest(ad_state.trainable)) if isinstance(ad_state.trainable,
                                                                         dict) else set()
  clash = sorted(adapted_paths & set(head_paths))
  if clash:
    raise ValueError(f"config.head={config.head!r} selects params the adapter also targets: "
                     f"{clash[:5]}; make the adapter targets exclude the head")

  def full_params(base, ad_state, head, rng=None):
    p = adapter.apply(base, ad_state, rng=rng)
    return tree_lib.replace_by_name(p, tree_lib.unnest(head), is_leaf=structured.is_structured) \
        if head else p

  tx = make_optimizer(config.optimizer, config.total_steps)

  def init_state():
    trainable = {"adapter": ad_state.trainable, "head": tree_lib.nest(head_flat)}
    return {"adapter": ad_state.trainable, "frozen": ad_state.frozen,
            "head": tree_lib.nest(head_flat), "opt": tx.init(trainable),
            "step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(rng_loop)}

  abstract = jax.eval_shape(init_state)
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl),
                          abstract)
  n_adapter = base_lib.count_params(ad_state)
  n_head = tree_lib.tree_size(head_flat)
  n_trainable = n_adapter + n_head
  logging.info("method %s: %d adapter + %d head = %d trainable params", method, n_adapter, n_head,
               n_trainable)
  const = jax.device_put(base, repl)
  del base
  model.params = None

  # -------------------------------------------------------------------------------------------
  # Update step: grads w.r.t. {adapter trainable, head}; base is const; state donated.
  # -------------------------------------------------------------------------------------------
  def loss_fn(trainable, frozen, base, batch, rng):
    k_ad, k_model = jax.random.split(rng)
    st = base_lib.AdapterState(trainable["adapter"], frozen)
    params = full_params(base, st, trainable["head"], rng=k_ad)
    logits = model.apply(params, batch, train=True, rng=k_model)
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch["label"]).mean()
    penalty = adapter.penalty(st)
    acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return ce + penalty, {"ce": ce, "penalty": penalty, "train_accuracy": acc}

  def update_fn(state, base, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    trainable = {"adapter": state["adapter"], "head": state["head"]}
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        trainable, state["frozen"], base, batch, rng)
    updates, opt = tx.update(grads, state["opt"], trainable)
    trainable = optax.apply_updates(trainable, updates)
    new_adapter, new_frozen = trainable["adapter"], state["frozen"]
    if adapter.update is not None:   # rank growth / pruning, outside the gradient
      st = adapter.update(base_lib.AdapterState(new_adapter, new_frozen), grads["adapter"],
                          state["step"])
      new_adapter, new_frozen = st.trainable, st.frozen
    new_state = {"adapter": new_adapter, "frozen": new_frozen, "head": trainable["head"],
                 "opt": opt, "step": state["step"] + 1, "rng": state["rng"]}
    return new_state, {"loss": loss, "grad_norm": optax.global_norm(grads), **aux}

  update_fn = jax.jit(update_fn, donate_argnums=(0,))

  @jax.jit
  def eval_fn(state, base, batch):
    st = base_lib.AdapterState(state["adapter"], state["frozen"])
    logits = model.apply(full_params(base, st, state["head"]), batch, train=False, rng=None)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                         batch["label"])
    m = batch["mask"]
    return {"correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * m),
            "loss": jnp.sum(ce * m), "count": jnp.sum(m)}

  def evaluate(state):
    nonlocal eval_data
    if eval_data is None:
      eval_data = eval_batches(eval_source, transform, config.eval_batch_size)
    tot = {"correct": 0.0, "loss": 0.0, "count": 0.0}
    for batch in eval_data:
      out = jax.device_get(eval_fn(state, const, jax.device_put(batch, data_sharding)))
      for k in tot:
        tot[k] += float(out[k])
    return {"accuracy": tot["correct"] / tot["count"], "eval_loss": tot["loss"] / tot["count"]}

  # -------------------------------------------------------------------------------------------
  # Checkpoint: restore the latest (train state + iterator state), else start fresh.
  # -------------------------------------------------------------------------------------------
  ckpt = ckpt_lib.Checkpointer(workdir, config.get("ckpt_every", 0), config.get("keep_ckpts", 2))
  start = 0
  if ckpt.latest_step() is not None:
    state, data_state, start = ckpt.restore(abstract)
    train_iter.set_state(data_state)
    logging.info("Resumed from the checkpoint at step %d", start)
  else:
    # Distinct buffers per leaf (an init may share one array between leaves; donation needs each
    # donated buffer once).
    state = jax.device_put(jax.tree.map(lambda x: jnp.array(x, copy=True), init_state()), repl)
  del ad_state, head_flat
  writer = metrics_lib.MetricWriter(workdir, resume_step=start)
  rank_fn = registry.rank_allocation_fn(method)
  ranks_writer = metrics_lib.JsonlWriter(os.path.join(workdir, "ranks.jsonl"), resume_step=start) \
      if rank_fn is not None else None
  if start == 0:
    writer.write(0, {"trainable_params": n_trainable})

  # -------------------------------------------------------------------------------------------
  # Loop.
  # -------------------------------------------------------------------------------------------
  total = config.total_steps
  progress = metrics_lib.Progress(total, start, config.batch_size,
                                  enabled=config.get("progress", True),
                                  log_every=config.get("log_every", 50), desc=method)
  log_every = max(1, config.get("log_every", 50))
  eval_every = config.get("eval_every", 0)
  ev = None
  t_loop = time.perf_counter()
  for step in range(start + 1, total + 1):
    batch = jax.device_put(next(train_iter), data_sharding)
    with jax.transfer_guard("disallow"):   # no hidden host<->device copies in the step
      state, m = update_fn(state, const, batch)
    m = jax.device_get(m)
    loss = float(m["loss"])
    if not np.isfinite(loss):
      raise FloatingPointError(
          f"loss is {loss} at step {step} (method {method}, lr {config.optimizer.lr}); "
          f"lower optimizer.lr or check the data")
    progress.update(step, loss)
    if step % log_every == 0 or step == total:
      writer.write(step, {**m, "lr": float(make_schedule(config.optimizer, config.optimizer.lr,
                                                         total)(step - 1))})
      if ranks_writer is not None:
        ranks_writer.write(step, {"ranks": rank_fn(jax.device_get(
            base_lib.AdapterState(state["adapter"], state["frozen"])))})
    if eval_every and (step % eval_every == 0) and step != total:
      writer.write(step, evaluate(state))
    if ckpt.maybe_save(step, state, train_iter.get_state()):
      logging.info("checkpoint at step %d", step)
  train_s = time.perf_counter() - t_loop
  ckpt.maybe_save(total, state, train_iter.get_state(), force=True)
  ev = evaluate(state)
  writer.write(total, ev)
  writer.close()
  if ranks_writer is not None:
    ranks_writer.close()
  ckpt.close()

  # -------------------------------------------------------------------------------------------
  # Outputs: adapter file (+ PEFT export), results.json, summary.
  # -------------------------------------------------------------------------------------------
  host = jax.device_get(state)
  adapter_path = None
  if config.get("save_adapter", True) and method != "none":
    from lowrank_jax import adapter_io  # pylint: disable=g-import-not-at-top
    adapter_path = os.path.join(workdir, "adapter")
    adapter_io.save_adapter(adapter_path,
                            base_lib.AdapterState(host["adapter"], host["frozen"]),
                            {"method": method, "adapter": config.adapter.to_dict(),
                             "model": config.model.to_dict(), "head": config.head,
                             "dataset": dcfg.name, "step": total},
                            head=host["head"], adapter=adapter)
    if config.get("export_peft", False):
      _export_peft(config, model, adapter, host, os.path.join(workdir, "peft"))
  results = {"method": method, "accuracy": ev["accuracy"], "eval_loss": ev["eval_loss"],
             "trainable_params": n_trainable, "adapter_params": n_adapter, "head_params": n_head,
             "steps": total, "resumed_from": start, "train_s": train_s,
             "wall_s": time.perf_counter() - (t_run if baseline is not None else t_start),
             "total_wall_s": time.perf_counter() - t_start, "adapter_path": adapter_path,
             "adapter_bytes": _dir_bytes(adapter_path), "workdir": workdir,
             "config": config_dict}
  if baseline is not None:
    results["baseline"] = {k: baseline[k] for k in ("accuracy", "eval_loss", "trainable_params",
                                                    "wall_s")}
  with open(results_path, "w") as f:
    json.dump(results, f, indent=2, default=str)
  _print_summary(results)
  return results


def run_keys(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(model init key, adapter init key, loop key) of a run: `split(key(seed), 3)`."""
  return tuple(jax.random.split(jax.random.key(seed), 3))


def load_trained(config: ml_collections.ConfigDict, adapter_path: str) -> tuple[Any, Model]:
  """Rebuilds a finished run's adapted params from its config and adapter file (no checkpoint).

  The base params are re-created exactly as the run made them (pretrained weights, or the same
  init keys; residual methods re-run their deterministic init), then the saved adapter state and
  head are applied.

  Args:
    config: the run's config.
    adapter_path: the run's `workdir/adapter` directory (`adapter_io.save_adapter`).

  Returns:
    (params, model): params with structured adapted leaves (`lowrank_jax.merge` makes them dense)
    and the `Model` whose `apply(params, batch, train=False, rng=None)` gives logits.
  """
  from lowrank_jax import adapter_io  # pylint: disable=g-import-not-at-top
  check_config(config)
  k_model, k_adapter, _ = run_keys(config.seed)
  dcfg = config.dataset
  model = make_model(config.model, num_classes_of(dcfg.name), k_model, dcfg.get("seq_len", 0))
  state, meta, head = adapter_io.load_adapter(adapter_path)
  if meta.get("method") != config.adapter.method:
    raise ValueError(f"{adapter_path} holds a {meta.get('method')!r} adapter, the config says "
                     f"{config.adapter.method!r}")
  adapter = registry.make_adapter(config.adapter.method, **adapter_kwargs(config))
  stats = None
  if registry.needs_stats(config.adapter.method):
    source = load_split(dcfg, dcfg.train_split, dcfg.max_train_examples)
    stats = _calibrate(config, model, source, make_transform(dcfg, model.tokenizer),
                       adapter_kwargs(config).get("targets"))
  base, _ = adapter.init(k_adapter, model.params, stats)
  params = adapter.apply(base, state)
  if head:
    params = tree_lib.replace_by_name(params, tree_lib.unnest(head),
                                      is_leaf=structured.is_structured)
  return params, model


def _dir_bytes(path: Optional[str]) -> int:
  if not path or not os.path.isdir(path):
    return 0
  return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def _print_summary(r: dict):
  lines = [f"[{r['method']}] eval accuracy {r['accuracy']:.4f} (loss {r['eval_loss']:.4f}) after "
           f"{r['steps']} steps; trainable params {r['trainable_params']:,} (adapter "
           f"{r['adapter_params']:,} + head {r['head_params']:,}); wall {r['wall_s']:.1f}s"]
  if "baseline" in r:
    b = r["baseline"]
    lines.insert(0, f"[baseline: frozen base + trained head] eval accuracy {b['accuracy']:.4f} "
                    f"(trainable params {b['trainable_params']:,})")
    lines.append(f"{r['method']} vs baseline: {r['accuracy']:.4f} vs {b['accuracy']:.4f} "
                 f"({'+' if r['accuracy'] >= b['accuracy'] else ''}"
                 f"{100 * (r['accuracy'] - b['accuracy']):.2f} points)")
  if "baseline" in r:
    lines.append(f"total wall time (baseline + {r['method']}): {r['total_wall_s']:.1f}s")
  if r.get("adapter_path"):
    lines.append(f"adapter saved to {r['adapter_path']} ({r['adapter_bytes'] / 1e6:.2f} MB)")
  print("\n".join(lines), flush=True)


def _calibrate(config, model: Model, train_source, transform, targets):
  """Calibration statistics for methods such as CorDA (`lowrank_jax.calibrate.collect`)."""
  try:
    from lowrank_jax import calibrate  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError(f"method {config.adapter.method!r} needs calibration statistics, but "
                     f"lowrank_jax.calibrate is not available ({e})") from None
  n = int(config.get("calib_batches", 8))
  batches = eval_batches(train_source, transform, config.batch_size, limit=n * config.batch_size)
  apply_fn = lambda p, b: model.apply(p, b, train=False, rng=None)
  text = "attention_mask" in batches[0]
  logging.info("calibrating %s on %d batches", config.adapter.method, len(batches))
  return calibrate.collect(apply_fn, model.params, batches, targets,
                           mask_key="attention_mask" if text else None,
                           sample_scale="corda" if config.adapter.method == "corda" else None)


def _export_peft(config, model: Model, adapter: base_lib.Adapter, host: dict, path: str):
  from lowrank_jax import adapter_io  # pylint: disable=g-import-not-at-top
  if model.family != "minilm":
    raise ValueError(f"export_peft supports MiniLM runs, not {config.model.name!r}")
  adapter_io.export_peft(
      path, adapter, base_lib.AdapterState(host["adapter"], host["frozen"]), model="minilm",
      cfg=model.hf_cfg, base_model_name_or_path="sentence-transformers/all-MiniLM-L6-v2")
