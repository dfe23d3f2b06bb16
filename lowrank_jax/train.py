"""The trainer: `train_and_evaluate(config, workdir)` fine-tunes a model with an adapter.

Called by `experiments/run.py` and by colabs alike. `train_and_evaluate` composes the parts, in
order:

  distributed init -> config check -> workdir (refuse a different config) -> mesh -> model
  (`models.ModelSpec`) and data (the dataset's catalogue entry, grain, checkpointable iterator of
  this process's shard) -> adapter init (calibration stats if the method needs them) and head ->
  optimizer (`optim`) -> train state (`steps.init_train_state`) -> base params and train state
  placed on the mesh -> the task's train and eval steps (`tasks`, `steps`) -> restore the latest
  checkpoint -> loop (eval, metrics, checkpoints, progress) -> adapter file, results.

Nothing here knows a model, dataset or task by name: the model spec, the dataset's catalogue entry
and the task object say what differs. The step (`steps.make_train_step`) takes gradients with
respect to the adapter's trainable state and the classification head only; the base params are a
separate argument that is neither donated nor differentiated; the step's key is
`fold_in(rng, step)`, so a resumed run sees the same keys.

Config fields (all numbers that change a result live in the config; see `configs/`):

  seed, total_steps, batch_size, eval_batch_size, eval_every, log_every, ckpt_every, keep_ckpts,
  model.{name, pretrained, dropout_rate, attention_dropout_rate, config (the model config's
  fields; on pretrained weights or a checkpoint only its execution fields, e.g. compute_dtype and
  remat)}, head (regex of params trained fully), dataset.{name, train_split, eval_split,
  max_train_examples, max_eval_examples, seq_len, shuffle_seed}, adapter.{method, factory
  kwargs...}, optimizer.{name, lr, head_lr, wd, b1, b2, schedule, warmup_steps, grad_clip}, task
  (default "classification"), calib_batches, baseline, save_adapter, export_peft, progress,
  overwrite, nonfinite ("stop": a NaN/Inf loss or gradient stops the run; "skip": that update is
  skipped and counted), mesh.{data, fsdp, tensor} (device mesh sizes, one may be -1: the rest;
  default: every device on `data`), distributed.{coordinator_address, num_processes, process_id,
  auto} (multi-process runs; see `sharding.initialize_distributed`).

Quantized frozen base (QLoRA-style; `lowrank_jax.quant`): model.base_format ("float", the default;
"int8": per output channel; "nf4": 4-bit blocks), model.quant_targets (regex or list of regexes of
the kernels to quantize; default: the adapter's `targets`), model.quant_block_size (nf4: input
rows per absmax block, default 64), model.double_quant (nf4: quantize the absmaxes too),
model.quant_tile_rows (input rows dequantized at a time inside a product; 0: whole kernels). The
base is quantized right after it is built, before the adapter's init, so the adapter nests on the
quantized kernels (`LowRank(base=NF4(...))`) and the run never holds them dense again; the
fields, and for a randomly initialized decoder every target's shape, are checked by
`check_config` (a checkpoint's or pretrained model's shapes when it is loaded, before any kernel
is quantized). Quantized kernels are frozen: `head` must not select them.

Sharding (`lowrank_jax.sharding`): base params get the model's partition rules, adapter factors
follow their kernels, the optimizer state its trainable leaves, batches are split over data x
fsdp. In a multi-process run each process reads its own rows of every batch (its shard of the
train data), every process writes the orbax checkpoints together, and only process 0 writes the
workdir's config, lock, metrics, adapter, exports and results.

Task "causal_lm" (a decoder LM, `tasks.CausalLM`) reads, besides:

  model.checkpoint (a Hugging Face checkpoint directory to start from, on which `model.config`
  may set the model's execution fields, `ModelSpec.execution_fields`, e.g. compute_dtype and
  remat; "" initializes randomly with any `model.config` field overrides), model.tokenizer (a
  tokenizer.json; "" takes the checkpoint's, else trains a byte-level BPE of the model's vocab
  size on the train texts),
  dataset.{prompt, response} (format strings over an example's fields, e.g. "{lemmas[0]}" or
  "{label_name}"; only the response is trained; an empty prompt makes plain-text pretraining),
  dataset.template (the instruction template, with a `{prompt}` field), dataset.seq_len (the
  packed row length), eval_before (evaluate before the first step too), generate.{num_examples,
  max_new_tokens, batch_size, print_samples} (greedy generation exact match on the eval
  prompts), export_hf (write the merged model + tokenizer.json to `workdir/hf`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import os
import shutil
import time
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np

from lowrank_jax import base as base_lib
from lowrank_jax import checkpoint as ckpt_lib
from lowrank_jax import metrics as metrics_lib
from lowrank_jax import optim
from lowrank_jax import quant
from lowrank_jax import registry
from lowrank_jax import sharding as sharding_lib
from lowrank_jax import steps
from lowrank_jax import targeting
from lowrank_jax import tasks
from lowrank_jax import tree as tree_lib

RESULTS_FILE = "results.json"
REQUIRED_FIELDS = ("seed", "total_steps", "batch_size", "model", "dataset", "adapter",
                   "optimizer", "head")
# Fields of earlier versions of the config schema; a config still holding one is an error.
DEPRECATED_FIELDS = ("num_train_steps", "learning_rate", "lr")
DEFAULT_TASK = "classification"
# Config fields of how a run is launched, not of what it computes: a run may resume on another
# mesh (the checkpoint is restored onto its shardings), and each process has its own process_id.
LAUNCH_FIELDS = ("mesh", "distributed")


# =============================================================================================
# Data: `lowrank_jax.data` sources -> grain pipelines (train: shuffled, repeated, checkpointable
# iterator; eval: fixed-shape batches whose last one is padded and masked).
# =============================================================================================

def load_split(dcfg, split: str, max_examples: int):
  """A random-access source of a split (`lowrank_jax.data.load`); the first `max_examples` (0:
  all) examples of its stored (shuffled) order."""
  from lowrank_jax import data  # pylint: disable=g-import-not-at-top
  return data.load(dcfg.name, f"{split}[:{max_examples}]" if max_examples > 0 else split)


def make_transform(dcfg, tokenizer):
  """Per-example transform to model inputs (`data.example_transform` of the dataset's entry)."""
  from lowrank_jax import data  # pylint: disable=g-import-not-at-top
  return data.example_transform(dcfg.name, tokenizer)


def num_classes_of(name: str) -> int:
  """Number of classes of dataset `name` (`lowrank_jax.data.num_classes`)."""
  from lowrank_jax import data  # pylint: disable=g-import-not-at-top
  return data.num_classes(name)


def train_iterator(source, transform, batch_size: int, seed: int, shard: tuple[int, int] = (0, 1)):
  """Infinite shuffled batches, reshuffled each epoch; `get_state()`/`set_state()` checkpoint it.

  `shard` = (index, count): this process reads shard `index` of `count` of `source`, and
  `batch_size // count` rows of each batch of `batch_size`."""
  from lowrank_jax import data  # pylint: disable=g-import-not-at-top
  if len(source) < batch_size:
    raise ValueError(f"batch_size={batch_size} exceeds the {len(source)} train examples")
  return data.make_pipeline(source, batch_size=batch_size // shard[1], seed=seed, num_epochs=None,
                            transform=transform, shard_index=shard[0], shard_count=shard[1])


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


@dataclasses.dataclass
class Data:
  train_source: Any
  eval_source: Any
  transform: Callable[[dict], dict]
  train_iter: Any
  # pack_batches(source, batch_size, limit) -> packed fixed-shape batches of the first `limit`
  # (0: all) examples (None: one example a row).
  pack_batches: Optional[Callable[[Any, int, int], list[dict]]] = None
  # formatter(example) -> (prompt text, response text) of a text task (None: not one).
  formatter: Optional[Callable[[dict], tuple[str, str]]] = None

  def fixed_batches(self, source, batch_size: int, limit: int = 0) -> list[dict]:
    """Fixed-shape batches of `source` (eval, calibration): padded, so none recompiles."""
    if self.pack_batches is not None:
      return self.pack_batches(source, batch_size, limit)
    return eval_batches(source, self.transform, batch_size, limit)


def make_data(config, model: "Model", shard: tuple[int, int] = (0, 1)) -> Data:
  """The train and eval sources of `config.dataset`, as inputs of `model`; this process reads
  train shard `shard` = (index, count)."""
  dcfg = config.dataset
  transform = make_transform(dcfg, model.tokenizer)
  train_source = load_split(dcfg, dcfg.train_split, dcfg.max_train_examples)
  eval_source = load_split(dcfg, dcfg.eval_split, dcfg.max_eval_examples)
  train_iter = train_iterator(train_source, transform, config.batch_size, dcfg.shuffle_seed,
                              shard)
  logging.info("data: %d train / %d eval examples of %s", len(train_source), len(eval_source),
               dcfg.name)
  return Data(train_source, eval_source, transform, train_iter)


# =============================================================================================
# Model: params, apply and tokenizer from the model's `models.ModelSpec`.
# =============================================================================================

@dataclasses.dataclass
class Model:
  params: Any
  apply: Callable[..., jax.Array]    # apply(params, batch, *, train, rng) -> logits
  tokenizer: Any = None
  spec: Any = None                   # the `models.ModelSpec`, with the run's config


_DROPOUT_FIELDS = ("dropout_rate", "attention_dropout_rate")   # model config overrides


def make_model(mcfg, num_classes: int, key: jax.Array, seq_len: int = 0) -> Model:
  """Builds the classifier named `mcfg.name` with a `num_classes` output.

  Raises:
    ValueError: unknown model (lists the valid names), one that cannot classify, pretrained
      weights it does not have, or a dropout field its config lacks.
  """
  from lowrank_jax import models  # pylint: disable=g-import-not-at-top
  spec = models.get_model(mcfg.name)
  if not spec.is_classifier:
    raise ValueError(f"model {mcfg.name!r} is not a classifier; valid classifiers: "
                     f"{models.list_models(classifiers_only=True)}")
  k_init, k_head = jax.random.split(key)
  fields = {**config_overrides(mcfg, spec), **dropout_overrides(mcfg, spec)}
  if mcfg.get("pretrained", False):
    params, spec = spec.load_pretrained()
    spec = spec.with_config(**fields)
  else:
    spec = spec.with_config(**fields)
    params = spec.init(k_init)
  params = spec.with_classifier(k_head, params, num_classes)

  def apply(p, batch, *, train, rng):
    return spec.classify(p, batch, deterministic=not train, rng=rng)
  return Model(params, apply, spec.tokenizer(seq_len if seq_len > 0 else 128), spec)


def dropout_overrides(mcfg, spec) -> dict:
  """The dropout fields `mcfg` sets (`model.dropout_rate`, ...), checked against the model's.

  Raises:
    ValueError: a dropout field the model's config lacks.
  """
  override = {k: mcfg[k] for k in _DROPOUT_FIELDS if k in mcfg}
  unknown = [k for k in override if not hasattr(spec.config, k)]
  if unknown:
    has = [f for f in _DROPOUT_FIELDS if hasattr(spec.config, f)]
    raise ValueError(f"model.{unknown[0]} is not a field of model {mcfg.name!r}; its dropout "
                     f"fields: {has}")
  return override


# =============================================================================================
# Decoder LMs (task "causal_lm"): model, tokenizer and packed text data; generation eval.
# =============================================================================================

def decoder_spec(mcfg, key: jax.Array):
  """(params, spec) of the decoder `mcfg.name`: the Hugging Face checkpoint directory
  `model.checkpoint` when set, else a random init with the `model.config` field overrides."""
  from lowrank_jax import models  # pylint: disable=g-import-not-at-top
  spec = models.get_model(mcfg.name)
  fields = {**config_overrides(mcfg, spec), **dropout_overrides(mcfg, spec)}
  if mcfg.get("checkpoint", ""):
    params, spec = spec.load_checkpoint(mcfg.checkpoint)
    spec = spec.with_config(**fields)
  else:
    spec = spec.with_config(**fields)
    params = spec.init(key)
  return params, spec


def config_overrides(mcfg, spec) -> dict:
  """`model.config` as {field: value}, checked against the model's config. With weights loaded
  (`model.checkpoint` or `model.pretrained`) it may set only the model's execution fields
  (`ModelSpec.execution_fields`: precision, remat, ...), which leave the loaded shapes and function
  as they are; the other fields come from the checkpoint.

  Raises:
    ValueError: a field the model's config lacks, a value the config refuses, or on loaded
      weights one that is not an execution field.
  """
  fields = mcfg.get("config", None)
  fields = fields.to_dict() if fields else {}
  names = [f.name for f in dataclasses.fields(spec.config)]
  unknown = [k for k in fields if k not in names]
  if unknown:
    raise ValueError(f"model.config.{unknown[0]} is not a field of model {mcfg.name!r}; its "
                     f"fields: {names}")
  fixed = sorted(k for k in fields if k not in spec.execution_fields)
  source = (f"model.checkpoint={mcfg.checkpoint!r}" if mcfg.get("checkpoint", "")
            else "model.pretrained=True" if mcfg.get("pretrained", False) else None)
  if source and fixed:
    raise ValueError(f"model.config {fixed} would change the model loaded by {source}; on loaded "
                     f"weights model.config sets only {list(spec.execution_fields)}")
  spec.with_config(**fields)   # the config's own checks of the values (a bad remat policy, ...)
  return fields


def lm_tokenizer(config, spec, texts: Callable[[], Any]):
  """The run's tokenizer: `model.tokenizer` (a tokenizer.json or a directory holding one), else
  the checkpoint's own `tokenizer.json`, else a byte-level BPE of the model's vocab size trained
  on `texts()` (without a checkpoint only).

  Raises:
    FileNotFoundError: a checkpoint without a tokenizer.json and no `model.tokenizer`.
    ValueError: the tokenizer has more tokens than the model's vocabulary.
  """
  from lowrank_jax import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  mcfg = config.model
  path = mcfg.get("tokenizer", "") or mcfg.get("checkpoint", "")
  if path:
    tok = tok_lib.load(path)
  else:
    logging.info("training a byte-level BPE of %d tokens", spec.config.vocab_size)
    tok = tok_lib.train_bpe(texts(), spec.config.vocab_size)
  tok_lib.check_vocab(tok, spec.config.vocab_size, mcfg.name)
  return tok


def lm_formatter(dcfg):
  """(prompt, response) texts of an example: `dataset.prompt` in `dataset.template`, and
  `dataset.response` (format strings over the example's fields and `label_name`)."""
  from lowrank_jax import data  # pylint: disable=g-import-not-at-top
  entry = data.dataset_entry(dcfg.name)
  names = data.label_names(dcfg.name) if entry.label_key == "label" else ()
  return data.text_formatter(dcfg.get("prompt", ""), dcfg.response, dcfg.get("template", ""),
                             names)


def read_all(source, chunk: int = 4096):
  """Every example of a random-access `source`, read `chunk` at a time where it reads in bulk
  (`__getitems__`, as tfds data sources do)."""
  get_many = getattr(source, "__getitems__", None)
  for start in range(0, len(source), chunk):
    idx = range(start, min(len(source), start + chunk))
    yield from (get_many(list(idx)) if get_many is not None else (source[i] for i in idx))


def make_decoder_and_data(config, key: jax.Array,
                          shard: tuple[int, int] = (0, 1)) -> tuple["Model", Data]:
  """The decoder LM of `config.model` and packed batches of `config.dataset`'s texts; this
  process packs train shard `shard` = (index, count) into `batch_size // count` rows a batch."""
  from lowrank_jax import data  # pylint: disable=g-import-not-at-top
  dcfg = config.dataset
  params, spec = decoder_spec(config.model, key)
  train_source = load_split(dcfg, dcfg.train_split, dcfg.max_train_examples)
  eval_source = load_split(dcfg, dcfg.eval_split, dcfg.max_eval_examples)
  formatter = lm_formatter(dcfg)
  tok = lm_tokenizer(config, spec,
                     lambda: ("".join(formatter(ex)) for ex in read_all(train_source)))
  transform = data.lm_transform(tok, formatter, dcfg.seq_len)
  train_iter = data.make_packed_pipeline(
      train_source, transform=transform, seq_len=dcfg.seq_len,
      batch_size=config.batch_size // shard[1], seed=dcfg.shuffle_seed, num_epochs=None,
      shard_index=shard[0], shard_count=shard[1])

  def pack_batches(source, batch_size, limit):
    examples = itertools.islice(read_all(source), limit if limit > 0 else None)
    rows = data.pack_rows(map(transform, examples), dcfg.seq_len, batch_size)
    return data.packed_batches(rows, batch_size, dcfg.seq_len)

  def apply(p, batch, *, train, rng):
    return spec.lm_logits(p, batch, deterministic=not train, rng=rng)

  logging.info("data: %d train / %d eval texts of %s; model %s: %d params", len(train_source),
               len(eval_source), dcfg.name, config.model.name, tree_lib.tree_size(params))
  return (Model(params, apply, tok, spec),
          Data(train_source, eval_source, transform, train_iter, pack_batches, formatter))


def make_classifier_and_data(config, key: jax.Array,
                             shard: tuple[int, int] = (0, 1)) -> tuple["Model", Data]:
  """The classifier of `config.model` (an output per class) and batches of `config.dataset`
  (this process reads train shard `shard` = (index, count))."""
  dcfg = config.dataset
  model = make_model(config.model, num_classes_of(dcfg.name), key, dcfg.get("seq_len", 0))
  return model, make_data(config, model, shard)


# What the trainer builds for a task's `model_kind`.
MODEL_BUILDERS = {"classifier": make_classifier_and_data, "decoder": make_decoder_and_data}


def generation_eval(params, model: "Model", data: Data, gcfg) -> dict:
  """Greedy generation from the prompts of the first `gcfg.num_examples` eval examples.

  Prompts are left-padded to the longest one, so `generate` compiles once. A prediction is the
  decoded text before `<|eos|>`; it matches when it equals the reference response (both
  stripped of surrounding whitespace).

  Returns:
    {"exact_match", "samples": [(prompt, reference, prediction), ...] (the first
    `gcfg.print_samples`)}.
  """
  from lowrank_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from lowrank_jax import generate as gen_lib  # pylint: disable=g-import-not-at-top
  from lowrank_jax import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  tok, fmt = model.tokenizer, data.formatter
  eos, pad = tok_lib.special_id(tok, tok_lib.EOS), tok_lib.special_id(tok, tok_lib.PAD)
  n = min(int(gcfg.num_examples), len(data.eval_source))
  pairs = [fmt(data.eval_source[i]) for i in range(n)]
  prompts = [data_lib.encode_pair(tok, p, "")[0] for p, _ in pairs]
  bs = int(gcfg.batch_size)
  prompts += [prompts[-1]] * (-n % bs)      # whole batches (the copies are dropped)
  width = max(map(len, prompts))
  ids = np.full((len(prompts), width), pad, np.int32)
  mask = np.zeros((len(prompts), width), np.int32)
  for i, p in enumerate(prompts):
    ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
  preds = []
  for start in range(0, len(prompts), bs):
    out, lengths = gen_lib.generate(params, model.spec.config, ids[start:start + bs],
                                    int(gcfg.max_new_tokens), prompt_mask=mask[start:start + bs],
                                    stop_tokens=(eos,), pad_id=pad)
    out, lengths = np.asarray(out), np.asarray(lengths)
    preds += [tok.decode([t for t in row[:k].tolist() if t != eos])
              for row, k in zip(out, lengths)]
  preds = preds[:n]
  hits = [pred.strip() == ref.strip() for pred, (_, ref) in zip(preds, pairs)]
  samples = [(p, r, pred) for (p, r), pred in zip(pairs, preds)][:int(gcfg.print_samples)]
  return {"exact_match": float(np.mean(hits)), "samples": samples}


# =============================================================================================
# Config checks (before anything is built: one clear message per mistake).
# =============================================================================================

def check_config(config: ml_collections.ConfigDict):
  """Raises ValueError naming the missing, deprecated or invalid fields of a run config."""
  missing = [f for f in REQUIRED_FIELDS if f not in config]
  if missing:
    raise ValueError(f"config is missing required fields {missing}")
  old = [f for f in DEPRECATED_FIELDS if f in config]
  if old:
    raise ValueError(f"config has deprecated fields {old}; use total_steps / optimizer.lr")
  from lowrank_jax import data, models  # pylint: disable=g-import-not-at-top
  entry = data.dataset_entry(config.dataset.name)   # unknown dataset -> ValueError
  registry.get_factory(config.adapter.method)       # unknown/unavailable method -> ValueError
  spec = models.get_model(config.model.name)        # unknown model -> ValueError
  task = tasks.get_task(config.get("task", DEFAULT_TASK))
  if config.adapter.method == "stn":   # the STN loop's own block (lowrank_jax.stn_train)
    from lowrank_jax import stn_train  # pylint: disable=g-import-not-at-top
    stn_train.check_config(config, spec, config.get("task", DEFAULT_TASK))
  if task.model_kind == "decoder":
    if not spec.is_decoder:
      raise ValueError(f"config.task={config.task!r} trains a decoder LM; model {spec.name!r} "
                       f"is not one; decoder models: {models.list_models(decoders_only=True)}")
    if entry.modality != "text":
      raise ValueError(f"config.task={config.task!r} reads text; dataset "
                       f"{config.dataset.name!r} is {entry.modality}")
    if "response" not in config.dataset:
      raise ValueError(f"config.task={config.task!r} needs config.dataset.response, the format "
                       f"string of the trained text (e.g. '{{lemmas[0]}}: {{gloss}}')")
  elif spec.is_classifier and entry.modality != spec.modality:
    readers = [n for n in models.list_models(classifiers_only=True)
               if models.get_model(n).modality == entry.modality]
    raise ValueError(f"dataset {config.dataset.name!r} is {entry.modality}; model "
                     f"{spec.name!r} reads {spec.modality}; models that read {entry.modality}: "
                     f"{readers}")
  if config.get("generate", None) and jax.process_count() > 1:
    raise ValueError(f"config.generate runs in a single process; this run has "
                     f"{jax.process_count()}: unset config.generate")
  if config.get("export_peft", False):
    if not registry.facts(config.adapter.method).peft_exportable:
      exportable = [m for m in registry.list_methods() if registry.facts(m).peft_exportable]
      raise ValueError(f"config.export_peft=True: method {config.adapter.method!r} has no PEFT "
                       f"layout; exportable methods: {exportable}")
    if spec.hf_hub_name is None:
      raise ValueError(f"config.export_peft=True: model {spec.name!r} has no Hugging Face "
                       f"checkpoint to export against")
  for f in ("total_steps", "batch_size"):
    if config[f] < 1:
      raise ValueError(f"config.{f} must be >= 1, got {config[f]}")
  check_ranges(config)
  config_overrides(config.model, spec)
  check_seq_len(config, spec)
  check_mesh(config)
  check_base_format(config, task.model_kind)


def mesh_sizes(config) -> dict:
  """`config.mesh` as {axis: size} (default: every device on `data`)."""
  mesh = config.get("mesh", None)
  return mesh.to_dict() if mesh else {"data": -1}


def check_mesh(config):
  """`config.mesh` fits the devices, and the batches split over its data x fsdp devices.

  Raises:
    ValueError: a bad mesh (`sharding.mesh_shape`), or a batch size it does not divide.
  """
  data, fsdp, _ = sharding_lib.mesh_shape(mesh_sizes(config), jax.device_count())
  for f in ("batch_size", "eval_batch_size"):
    if f in config and config[f] % (data * fsdp):
      raise ValueError(f"config.{f}={config[f]} is not divisible by the {data * fsdp} batch "
                       f"shards of the mesh (data={data} x fsdp={fsdp}); change config.{f} or "
                       f"config.mesh")


# A learning rate above MAX_LR diverges every model here, so it is taken for a typo (1e3 for 1e-3).
MAX_LR = 10.0
NONFINITE_POLICIES = ("stop", "skip")


def _in_range(name: str, value, low, high, low_open: bool = False):
  """Raises ValueError naming `name` unless `low <= value <= high` (`low < value` if open)."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
    raise ValueError(f"config.{name} must be a finite number, got {value!r}")
  if (value <= low if low_open else value < low) or value > high:
    lo = f"({low}" if low_open else f"[{low}"
    raise ValueError(f"config.{name}={value!r} is out of range; valid: {lo}, {high}]")


def check_ranges(config: ml_collections.ConfigDict):
  """Learning rates, intervals, checkpoint count, eval batch and the non-finite policy.

  Raises:
    ValueError: the first field out of its valid range (the message names field and range).
  """
  opt = config.optimizer
  for f in ("lr", "head_lr"):
    if f in opt:
      _in_range(f"optimizer.{f}", opt[f], 0.0, MAX_LR, low_open=True)
  for f in ("eval_every", "log_every", "ckpt_every"):
    if f in config:
      _in_range(f, config[f], 0, float("inf"))
  if "keep_ckpts" in config:   # the last step is always checkpointed
    _in_range("keep_ckpts", config.keep_ckpts, 1, float("inf"))
  if "eval_batch_size" in config:
    _in_range("eval_batch_size", config.eval_batch_size, 1, float("inf"))
  policy = config.get("nonfinite", "stop")
  if policy not in NONFINITE_POLICIES:
    raise ValueError(f"config.nonfinite={policy!r}; valid: {list(NONFINITE_POLICIES)}")


def check_seq_len(config: ml_collections.ConfigDict, spec):
  """`dataset.seq_len` fits the model's positions (`max_position_embeddings` of its config, with
  the `model.config` overrides).

  Raises:
    ValueError: a sequence length beyond the model's positions.
  """
  seq_len = config.dataset.get("seq_len", 0)
  overrides = config.model.get("config", None)
  limit = (overrides.get("max_position_embeddings", None) if overrides else None) or getattr(
      getattr(spec, "config", None), "max_position_embeddings", None)
  if limit and seq_len > limit:
    raise ValueError(f"config.dataset.seq_len={seq_len} exceeds the {limit} positions of model "
                     f"{spec.name!r}; valid: 0 < seq_len <= {limit}")


def adapter_kwargs(config) -> dict:
  """The factory keyword arguments of `config.adapter`, plus what a factory takes from the run
  itself unless the config sets it: `total_steps` (schedules), `base_lr` (the run's peak
  `optimizer.lr`, which SORSA's official recipe divides its regularizer weight by) and, with a
  `config.stn` block, `num_hyperparameters` (the STN adapter's gate width)."""
  kw = {k: v for k, v in config.adapter.to_dict().items() if k != "method"}
  if "targets" in kw and isinstance(kw["targets"], (list, tuple)):
    kw["targets"] = list(kw["targets"])
  run = {"num_hyperparameters": len(config.stn.hyperparameters)} if "stn" in config else {}
  return registry.with_run_settings(config.adapter.method, kw,
                                    total_steps=int(config.total_steps),
                                    base_lr=float(config.optimizer.lr), **run)


def split_head(params, head_regex: str) -> tuple[dict, list[str]]:
  """({path: leaf} of the fully trained params, their paths); '' trains no params fully."""
  if not head_regex:
    return {}, []
  paths = targeting.resolve(params, head_regex, what="config.head")
  leaves = dict(targeting.named_leaves(params))
  return {p: leaves[p] for p in paths}, paths


# =============================================================================================
# Quantized frozen base (`config.model.base_format`).
# =============================================================================================

BASE_FORMATS = ("float",) + quant.FORMATS
QUANT_FIELDS = ("quant_targets", "quant_block_size", "double_quant", "quant_tile_rows")


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def quant_settings(config) -> Optional[dict]:
  """The `quant.quantize` arguments of `config.model`'s base format (None: a float base).

  Raises:
    ValueError: an unknown format, a quantization field with a float base, no targets, or a field
      of the wrong type or range (each names the field and what is valid).
  """
  mcfg = config.model
  fmt = mcfg.get("base_format", "float")
  if fmt not in BASE_FORMATS:
    raise ValueError(f"config.model.base_format={fmt!r}; valid: {list(BASE_FORMATS)}")
  if fmt == "float":
    stray = [f for f in QUANT_FIELDS if f in mcfg]
    if stray:
      raise ValueError(f"config.model.{stray[0]} is set but config.model.base_format='float' "
                       f"quantizes nothing; set base_format to one of {list(quant.FORMATS)}")
    return None
  targets = mcfg.get("quant_targets", None) or config.adapter.get("targets", None)
  if not targets:
    raise ValueError(f"config.model.base_format={fmt!r} needs config.model.quant_targets (a "
                     f"regex, or a list of them, of the kernels to quantize); the adapter has no "
                     f"`targets` to default to")
  if not isinstance(targets, str):
    targets = list(targets)
  block_size = mcfg.get("quant_block_size", quant.NF4_BLOCK)
  double_quant = mcfg.get("double_quant", False)
  tile_rows = mcfg.get("quant_tile_rows", 0)
  if fmt != "nf4":
    for f in ("quant_block_size", "double_quant"):
      if f in mcfg:
        raise ValueError(f"config.model.{f} applies to base_format='nf4' only (int8 has one scale "
                         f"per output channel)")
  if not _is_int(block_size) or block_size < 2 or block_size % 2:
    raise ValueError(f"config.model.quant_block_size={block_size!r}; valid: an even int >= 2")
  if not isinstance(double_quant, bool):
    raise ValueError(f"config.model.double_quant={double_quant!r}; valid: True or False")
  if not _is_int(tile_rows) or tile_rows < 0:
    raise ValueError(f"config.model.quant_tile_rows={tile_rows!r}; valid: 0 (whole kernels) or a "
                     f"positive divisor of each target's input size")
  return {"fmt": fmt, "targets": targets, "block_size": int(block_size),
          "double_quant": double_quant, "tile_rows": int(tile_rows) or None}


def check_quantizable(config, params) -> Optional[dict]:
  """`quant_settings(config)` after checking that they fit `params` (arrays or shapes only):
  every target quantizable by the format, none of them selected by `config.head`.

  Raises:
    ValueError: as `quant_settings`; a target the format cannot hold (named, with its shape); a
      quantized kernel that `config.head` would train.
  """
  settings = quant_settings(config)
  if settings is None:
    return None
  try:
    paths = quant.check(params, **settings)
  except ValueError as e:
    raise ValueError(f"config.model.base_format={settings['fmt']!r} "
                     f"(config.model.quant_targets={settings['targets']!r}): {e}") from None
  head = set(targeting.resolve(params, config.head, what="config.head")) if config.head else set()
  clash = sorted(head & set(paths))
  if clash:
    raise ValueError(f"config.head={config.head!r} selects kernels that config.model.base_format="
                     f"{settings['fmt']!r} quantizes: {clash[:5]}; quantized kernels are frozen; "
                     f"exclude them from config.model.quant_targets or from config.head")
  return settings


def quantize_base(config, params):
  """`params` with the kernels `config.model.quant_targets` selects quantized as
  `config.model.base_format` says (unchanged for a float base); every target is checked first."""
  settings = check_quantizable(config, params)
  if settings is None:
    return params
  q = quant.quantize(params, **settings)
  logging.info("base quantized to %s: %d -> %d bytes", settings["fmt"], tree_bytes(params),
               tree_bytes(q))
  return q


def tree_bytes(tree) -> int:
  """Bytes of the arrays of `tree` as stored (quantized weights: their codes and scales)."""
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def check_base_format(config, model_kind: str):
  """`config.model`'s quantization fields; for a randomly initialized decoder also every target's
  shape (from `jax.eval_shape` of its init: nothing is allocated). Other models are checked when
  their params are built, before any kernel is quantized (`quantize_base`).

  Raises:
    ValueError: see `check_quantizable`.
  """
  if quant_settings(config) is None:
    return
  if model_kind == "decoder" and not config.model.get("checkpoint", ""):
    shapes = jax.eval_shape(lambda k: decoder_spec(config.model, k)[0], jax.random.key(0))
    check_quantizable(config, shapes)


# =============================================================================================
# Adapter (+ calibration stats) and head: `base` is frozen, the head trains fully.
# =============================================================================================

def init_adapter(config, model: Model, data: Data, key: jax.Array):
  """(adapter, base, adapter state, head as a nested partial tree of the params); with a quantized
  `config.model.base_format`, `model.params` is replaced by its quantized base first, so the
  calibration and the adapter's init see the kernels the run trains on.

  Raises:
    ValueError: `config.head` selects params that the adapter also targets, or quantized ones.
  """
  method = config.adapter.method
  adapter = registry.make_adapter(method, **adapter_kwargs(config))
  model.params = quantize_base(config, model.params)   # before anything reads the base
  head_flat, head_paths = split_head(model.params, config.head)
  stats = None
  if registry.needs_stats(method):
    limit = int(config.get("calib_batches", 8)) * config.batch_size
    stats = _calibrate(config, model,
                       data.fixed_batches(data.train_source, config.batch_size, limit),
                       adapter_kwargs(config).get("targets"))
  base, ad_state = adapter.init(key, model.params, stats)
  adapted_paths = set(tree_lib.unnest(ad_state.trainable)) if isinstance(ad_state.trainable,
                                                                         dict) else set()
  clash = sorted(adapted_paths & set(head_paths))
  if clash:
    raise ValueError(f"config.head={config.head!r} selects params the adapter also targets: "
                     f"{clash[:5]}; make the adapter targets exclude the head")
  return adapter, base, ad_state, tree_lib.nest(head_flat)


def param_counts(method: str, ad_state, head) -> dict:
  """{"adapter_params", "head_params", "trainable_params"} (logged)."""
  n_adapter, n_head = base_lib.count_params(ad_state), tree_lib.tree_size(head)
  logging.info("method %s: %d adapter + %d head = %d trainable params", method, n_adapter, n_head,
               n_adapter + n_head)
  return {"adapter_params": n_adapter, "head_params": n_head,
          "trainable_params": n_adapter + n_head}


def make_steps(adapter, model: Model, task, optimizer, skip_nonfinite: bool = False,
               state_shardings=None):
  """(train_step, eval_step) of `task` on `model`'s output (`steps.make_train_step` /
  `steps.make_eval_step`): the task never sees the model, the model never sees the task;
  `skip_nonfinite`: a step with a NaN/Inf loss or gradient leaves the state unchanged;
  `state_shardings`: the train state's shardings, which every step keeps."""

  def task_loss(params, batch, rng):
    return task.loss(model.apply(params, batch, train=True, rng=rng), batch)

  def eval_metrics(params, batch):
    return task.eval_metrics(model.apply(params, batch, train=False, rng=None), batch)

  return (steps.make_train_step(adapter, task_loss, optimizer, skip_nonfinite=skip_nonfinite,
                                state_shardings=state_shardings),
          steps.make_eval_step(adapter, eval_metrics))


def make_evaluate(eval_step, base, data: Data, batch_size: int, task, sharding):
  """`evaluate(state) -> task.summarize(sums of eval_step over the eval set)`; the eval batches
  are built at the first call, then reused."""
  cache = []

  def evaluate(state):
    if not cache:
      cache.extend(data.fixed_batches(data.eval_source, batch_size))
      tasks.check_batch(cache[0], task.eval_keys, "eval")
    totals = {}
    for batch in cache:
      totals = tasks.sum_metrics(totals, sharding_lib.to_host(
          eval_step(state, base, sharding_lib.put_global(batch, jax.tree.map(lambda _: sharding,
                                                                             batch)))))
    return task.summarize(totals)
  return evaluate


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
    ValueError: unknown method/model/dataset/optimizer/task, bad field values.
    ckpt_lib.ConfigMismatchError: `workdir` holds a run of a different config.
    FloatingPointError: the loss became NaN/inf (the message names the step).
  """
  sharding_lib.initialize_distributed(config.get("distributed", None))
  check_config(config)
  lock = ckpt_lib.workdir_lock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
  with lock:
    return _train_and_evaluate(config, workdir)


class _SilentWriter:
  """The metric writer of processes other than 0: writes nothing."""

  def write(self, step, metrics):
    del step, metrics

  def close(self):
    pass


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """`train_and_evaluate` of a checked config, holding the workdir's lock."""
  t_start = time.perf_counter()
  baseline = train_baseline(config, workdir)
  t_run = time.perf_counter()
  finished = finished_results(config, workdir)
  if finished is not None:
    return finished
  if config.adapter.method == "stn":   # Self-Tuning Networks: the alternating loop
    from lowrank_jax import stn_train  # pylint: disable=g-import-not-at-top
    return stn_train.train_and_evaluate(config, workdir, baseline=baseline, t_start=t_start)

  mesh = sharding_lib.make_mesh(mesh_sizes(config))
  data_sharding = sharding_lib.batch_sharding(mesh)
  shard = sharding_lib.process_batch_shard(data_sharding, config.batch_size)
  k_model, k_adapter, rng_loop = run_keys(config.seed)
  task = tasks.get_task(config.get("task", DEFAULT_TASK))
  model, data = MODEL_BUILDERS[task.model_kind](config, k_model, shard)
  adapter, base, ad_state, head = init_adapter(config, model, data, k_adapter)
  del k_adapter
  counts = param_counts(config.adapter.method, ad_state, head)
  counts["base_bytes"] = tree_bytes(base)   # the frozen params as stored (quantized: codes)
  tx = optim.make_optimizer(config.optimizer, config.total_steps)
  init_state = functools.partial(steps.init_train_state, ad_state, tx, head=head, rng=rng_loop)
  # A residual-init method's PEFT export needs the factors its init produced.
  initial = jax.device_get(ad_state) if config.get("export_peft", False) else None
  const, state_shardings = place(mesh, base, init_state, model.spec.partition_rules)
  del base
  model.params = None
  train_step, eval_step = make_steps(adapter, model, task, tx,
                                     config.get("nonfinite", "stop") == "skip", state_shardings)
  evaluate = make_evaluate(eval_step, const, data, config.eval_batch_size, task, data_sharding)

  ckpt = ckpt_lib.Checkpointer(workdir, config.get("ckpt_every", 0), config.get("keep_ckpts", 2))
  try:   # a failing run still finishes the checkpoint it is writing
    state, start = restore_or_init(ckpt, init_state, data.train_iter, state_shardings)
    del ad_state, head
    writer = metrics_lib.MetricWriter(workdir, resume_step=start) \
        if jax.process_index() == 0 else _SilentWriter()
    before = {}
    if start == 0:
      writer.write(0, {"trainable_params": counts["trainable_params"]})
      before = evaluate_before(config, state, adapter, const, model, data, evaluate)
    t_loop = time.perf_counter()
    state, tokens = train_loop(config, workdir, state, start, train_step, const, data,
                               data_sharding, evaluate, ckpt, writer)
    train_s = time.perf_counter() - t_loop
    ckpt.maybe_save(config.total_steps, state, data_state_of(data.train_iter), force=True)
    ev = evaluate(state)
    writer.write(config.total_steps, ev)
    writer.close()
  finally:
    ckpt.close()

  host = sharding_lib.to_host(state)
  main = jax.process_index() == 0   # process 0 writes the adapter, exports and results
  adapter_path = save_outputs(config, workdir, model, adapter, host, initial) if main else None
  if jax.process_count() > 1 and config.get("export_hf", False):   # process 0 alone: host copies
    state, const = host, sharding_lib.to_host(const)
  if main:
    ev.update(decoder_outputs(config, workdir, state, adapter, const, model, data))
  if tokens:
    ev["tokens_per_s"] = tokens / train_s
  if before:
    ev["before"] = before
  results = {"method": config.adapter.method, **ev, **counts, "steps": config.total_steps,
             "resumed_from": start, "train_s": train_s,
             "wall_s": time.perf_counter() - (t_run if baseline is not None else t_start),
             "total_wall_s": time.perf_counter() - t_start, "adapter_path": adapter_path,
             "adapter_bytes": _dir_bytes(adapter_path), "workdir": workdir,
             "config": config.to_dict()}
  if baseline is not None:
    results["baseline"] = {k: baseline[k] for k in ("accuracy", "eval_loss", "trainable_params",
                                                    "wall_s")}
  if main:
    from lowrank_jax import adapter_io  # pylint: disable=g-import-not-at-top
    with adapter_io.atomic_path(os.path.join(workdir, RESULTS_FILE)) as tmp, open(tmp, "w") as f:
      json.dump(results, f, indent=2, default=str)
    _print_summary(results)
  return results


def merged_params(adapter, base, state: dict):
  """The dense params of a train state (adapter merged, head in place)."""
  from lowrank_jax import merge  # pylint: disable=g-import-not-at-top
  return merge(steps.adapted_params(adapter, base, steps.adapter_state(state), state["head"]))


def evaluate_before(config, state, adapter, base, model: Model, data: Data, evaluate) -> dict:
  """With `config.eval_before`, the eval metrics (and, with `config.generate`, the generation
  metrics) of the train state before any step; else {}."""
  if not config.get("eval_before", False):
    return {}
  out = evaluate(state)
  if config.get("generate", None):
    out.update(generation_eval(merged_params(adapter, base, state), model, data,
                               config.generate))
  return out


def decoder_outputs(config, workdir: str, state, adapter, base, model: Model, data: Data) -> dict:
  """What a finished run adds besides its eval metrics: with `config.generate`, generation
  metrics of the trained model; with `config.export_hf`, the merged model written as a Hugging
  Face checkpoint (+ its tokenizer.json) to `workdir/hf` ({"hf_path"})."""
  if not (config.get("generate", None) or config.get("export_hf", False)):
    return {}
  params = merged_params(adapter, base, state)
  out = {}
  if config.get("generate", None):
    out.update(generation_eval(params, model, data, config.generate))
  if config.get("export_hf", False):
    from lowrank_jax import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
    path = os.path.join(workdir, "hf")
    tmp = f"{path}.tmp{os.getpid()}"   # written whole, then renamed into place
    shutil.rmtree(tmp, ignore_errors=True)
    model.spec.save_checkpoint(jax.device_get(params), tmp)
    tok_lib.save(model.tokenizer, tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    out["hf_path"] = path
  return out


def train_baseline(config, workdir: str) -> Optional[dict]:
  """With `config.baseline`, trains the frozen-base baseline (method "none", same steps, data and
  seed) into `workdir/baseline` and returns its results; else None."""
  if not config.get("baseline", False) or config.adapter.method == "none":
    return None
  bcfg = ml_collections.ConfigDict(config.to_dict())
  bcfg.baseline = False
  bcfg.save_adapter = False
  bcfg.export_peft = False
  bcfg.adapter = ml_collections.ConfigDict({"method": "none"})
  logging.info("Training the frozen-base baseline (method 'none') into %s/baseline", workdir)
  return train_and_evaluate(bcfg, os.path.join(workdir, "baseline"))


def process_0_first(name: str, fn: Callable[[], Any]) -> Any:
  """`fn()` on process 0, then, after every process got there (barrier `name`), on the others
  (which then find what process 0 wrote)."""
  out = fn() if jax.process_index() == 0 else None
  sharding_lib.barrier(name)
  return out if jax.process_index() == 0 else fn()


def finished_results(config, workdir: str) -> Optional[dict]:
  """The results of a finished run of this config in `workdir` (reported, not retrained), else
  None. A workdir holding a different config is refused (`ckpt_lib.check_workdir_config`)."""
  stored = {k: v for k, v in config.to_dict().items() if k not in LAUNCH_FIELDS}
  same = process_0_first("workdir config", lambda: ckpt_lib.check_workdir_config(
      workdir, stored, overwrite=config.get("overwrite", False)))
  results_path = os.path.join(workdir, RESULTS_FILE)
  if not (same and os.path.exists(results_path)):
    return None
  with open(results_path) as f:
    results = json.load(f)
  if results.get("steps") != config.total_steps:
    return None
  logging.info("%s holds a finished run of this config; not training again", workdir)
  if jax.process_index() == 0:
    _print_summary(results)
  return results


def place(mesh, base, init_state, rules) -> tuple[Any, Any]:
  """(base params on `mesh` by the model's partition `rules`, shardings of the train state that
  `init_state()` makes); logs the params no rule matches (replicated)."""
  specs, unmatched = sharding_lib.param_specs(base, rules, dict(mesh.shape))
  if unmatched and mesh.size > 1:
    logging.info("no partition rule matches %d params (replicated): %s", len(unmatched),
                 unmatched[:8])
  state_specs = sharding_lib.train_state_specs(jax.eval_shape(init_state), base, specs)
  return (sharding_lib.put_global(base, sharding_lib.named(mesh, specs)),
          sharding_lib.named(mesh, state_specs))


def data_state_of(train_iter) -> Any:
  """The iterator state a checkpoint holds: this process's, or every process's in a list."""
  if jax.process_count() == 1:
    return train_iter.get_state()
  return {"process_states": sharding_lib.allgather_json(train_iter.get_state())}


def set_data_state(train_iter, data_state):
  """Restores `train_iter` from a checkpoint's iterator state (`data_state_of`).

  Raises:
    ValueError: the checkpoint was written by another number of processes.
  """
  if jax.process_count() > 1:
    states = data_state.get("process_states", []) if isinstance(data_state, dict) else []
    if len(states) != jax.process_count():
      raise ValueError(f"the checkpoint holds the data state of {len(states) or 1} processes; "
                       f"this run has {jax.process_count()}; resume with as many processes")
    data_state = states[jax.process_index()]
  train_iter.set_state(data_state)


def restore_or_init(ckpt, init_state, train_iter, shardings):
  """(state, start step): the latest checkpoint (train state and iterator state), else
  `init_state()` at step 0; the state is placed with `shardings` (a tree like the state)."""
  fresh = lambda: sharding_lib.put_global(init_state(), shardings)
  if ckpt.latest_step() is None:
    return fresh(), 0
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          jax.eval_shape(init_state), shardings)
  restored = ckpt.restore_intact(abstract)   # skips (and warns about) damaged checkpoints
  if restored is None:
    logging.warning("no intact checkpoint; starting at step 0")
    return fresh(), 0
  state, data_state, start = restored
  set_data_state(train_iter, data_state)
  logging.info("Resumed from the checkpoint at step %d", start)
  return state, start


def train_loop(config, workdir, state, start, train_step, base, data: Data, sharding, evaluate,
               ckpt, writer):
  """Steps `start + 1 .. total_steps`: metrics every `log_every` (rank allocations too, for
  methods that change them; tokens/s for tasks that count tokens), evaluation every `eval_every`,
  checkpoints; returns (the state, the tokens the steps read: 0 for tasks that count none).

  With `config.nonfinite="skip"`, a step whose loss or gradients are not finite is not applied
  and counted (`skipped_steps` in the metrics); with "stop" (the default) the run stops, and the
  last checkpoint written stays the newest.

  Raises:
    FloatingPointError: with `config.nonfinite="stop"`, the loss or gradients became NaN/inf (the
      message names the step and the first non-finite leaves of the updated state).
  """
  method, total = config.adapter.method, config.total_steps
  schedule = optim.make_schedule(config.optimizer, config.optimizer.lr, total)
  rank_fn = registry.rank_allocation_fn(method)
  main = jax.process_index() == 0
  ranks_writer = metrics_lib.JsonlWriter(os.path.join(workdir, "ranks.jsonl"), resume_step=start) \
      if rank_fn is not None and main else None
  progress = metrics_lib.Progress(total, start, config.batch_size,
                                  enabled=config.get("progress", True) and main,
                                  log_every=config.get("log_every", 50), desc=method)
  log_every = max(1, config.get("log_every", 50))
  eval_every = config.get("eval_every", 0)
  tokens_total, tokens_since, t_log = 0.0, 0.0, time.perf_counter()
  skipped = 0
  for step in range(start + 1, total + 1):
    batch = sharding_lib.put_local_batch(next(data.train_iter), sharding)
    if step == start + 1:
      progress.note("compiling the train step", start)
    with jax.transfer_guard("disallow"):   # no hidden host<->device copies in the step
      state, m = train_step(state, base, batch)
    m = jax.device_get(m)
    if "tokens" in m:   # tasks that count the tokens they read: tokens/s between logs
      tokens_total += float(m["tokens"])
      tokens_since += float(m["tokens"])
    loss = float(m["loss"])
    skipped += int(m.pop("skipped", 0))
    if not (np.isfinite(loss) and np.isfinite(float(m["grad_norm"]))):
      if config.get("nonfinite", "stop") == "skip":
        logging.warning("step %d: loss %s, gradient norm %s not finite; update skipped (%d so "
                        "far)", step, loss, m["grad_norm"], skipped)
      else:
        bad = nonfinite_leaves({k: state[k] for k in ("adapter", "head")})
        raise FloatingPointError(
            f"loss is {loss} at step {step} (gradient norm {float(m['grad_norm'])}, method "
            f"{method}, lr {config.optimizer.lr}); non-finite leaves after the update: {bad[:5]}; "
            f"the newest checkpoint is step {ckpt.latest_step()}; lower optimizer.lr or check "
            f"the data, or set config.nonfinite='skip'")
    m["skipped_steps"] = skipped
    progress.update(step, loss)
    if step % log_every == 0 or step == total:
      extra = {}
      if "tokens" in m:
        now = time.perf_counter()
        extra["tokens_per_s"] = tokens_since / max(now - t_log, 1e-9)
        tokens_since, t_log = 0.0, now
      writer.write(step, {**m, "lr": float(schedule(step - 1)), **extra})
      if rank_fn is not None:
        ranks = rank_fn(sharding_lib.to_host(steps.adapter_state(state)))
        if ranks_writer is not None:
          ranks_writer.write(step, {"ranks": ranks})
    if eval_every and (step % eval_every == 0) and step != total:
      progress.note("evaluating", step)
      writer.write(step, evaluate(state))
    if ckpt.every and step % ckpt.every == 0 and ckpt.maybe_save(
        step, state, data_state_of(data.train_iter)):
      logging.info("checkpoint at step %d", step)
  if ranks_writer is not None:
    ranks_writer.close()
  return state, tokens_total


def nonfinite_leaves(tree) -> list[str]:
  """Paths ('/'-joined) of the leaves of `tree` holding a NaN or Inf, in tree order."""
  return [jax.tree_util.keystr(path, simple=True, separator="/")
          for path, leaf in jax.tree_util.tree_leaves_with_path(sharding_lib.to_host(tree))
          if np.issubdtype(np.asarray(leaf).dtype, np.inexact)
          and not np.all(np.isfinite(leaf))]


def save_outputs(config, workdir: str, model: Model, adapter: base_lib.Adapter, host: dict,
                 initial: Optional[base_lib.AdapterState] = None) -> Optional[str]:
  """Writes the adapter file (`workdir/adapter`, with the head and the adapter's hparams) and,
  with `config.export_peft`, the PEFT layout (`workdir/peft`; `initial` is the adapter state right
  after `init`, which residual-init methods need); returns the adapter path (None when not
  saved)."""
  method = config.adapter.method
  if not config.get("save_adapter", True) or method == "none":
    return None
  from lowrank_jax import adapter_io  # pylint: disable=g-import-not-at-top
  adapter_path = os.path.join(workdir, "adapter")
  adapter_io.save_adapter(adapter_path, steps.adapter_state(host),
                          {"method": method, "adapter": config.adapter.to_dict(),
                           "model": config.model.to_dict(), "head": config.head,
                           "dataset": config.dataset.name, "step": config.total_steps},
                          head=host["head"], adapter=adapter)
  if config.get("export_peft", False):
    _export_peft(config, model, adapter, host, initial, os.path.join(workdir, "peft"))
  return adapter_path


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
    ``(params, model)``, params with structured adapted leaves (`lowrank_jax.merge` makes them
    dense) and the `Model` whose `apply(params, batch, train=False, rng=None)` gives logits.
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
  model.params = quantize_base(config, model.params)
  stats = None
  if registry.needs_stats(config.adapter.method):
    source = load_split(dcfg, dcfg.train_split, dcfg.max_train_examples)
    limit = int(config.get("calib_batches", 8)) * config.batch_size
    stats = _calibrate(config, model, eval_batches(source, make_transform(dcfg, model.tokenizer),
                                                   config.batch_size, limit),
                       adapter_kwargs(config).get("targets"))
  base, _ = adapter.init(k_adapter, model.params, stats)
  return steps.adapted_params(adapter, base, state, head), model


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
  lines += _decoder_summary(r)
  print("\n".join(lines), flush=True)


def _decoder_summary(r: dict) -> list[str]:
  """Summary lines of a decoder run: perplexity (before -> after), exact match, samples."""
  if "perplexity" not in r:
    return []
  b = r.get("before", {})
  was = lambda k, f: f"{b[k]:{f}} -> " if k in b else ""
  lines = [f"eval perplexity {was('perplexity', '.3f')}{r['perplexity']:.3f} over "
           f"{int(r['eval_tokens']):,} target tokens; next-token accuracy "
           f"{was('accuracy', '.4f')}{r['accuracy']:.4f}; train {r.get('tokens_per_s', 0):.0f} "
           f"tokens/s"]
  if "exact_match" in r:
    lines.append(f"generation exact match {was('exact_match', '.4f')}{r['exact_match']:.4f}")
    untuned = [pred for _, _, pred in b.get("samples", [])]
    for i, (prompt, ref, pred) in enumerate(r["samples"]):
      was_pred = f"; before training {untuned[i]!r}" if i < len(untuned) else ""
      lines.append(f"  {prompt!r} -> {pred!r} (reference {ref!r}{was_pred})")
  if r.get("hf_path"):
    lines.append(f"merged model + tokenizer.json saved to {r['hf_path']}")
  return lines


def _calibrate(config, model: Model, batches: list[dict], targets):
  """Calibration statistics for methods such as CorDA (`lowrank_jax.calibrate.collect`) of the
  first train `batches`; padding tokens (attention mask or segment id 0) do not count."""
  try:
    from lowrank_jax import calibrate  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError(f"method {config.adapter.method!r} needs calibration statistics, but "
                     f"lowrank_jax.calibrate is not available ({e})") from None
  apply_fn = lambda p, b: model.apply(p, b, train=False, rng=None)
  mask_fn = None
  if "segment_ids" in batches[0]:
    mask_fn = lambda b: b["segment_ids"] > 0
  elif "attention_mask" in batches[0]:
    mask_fn = lambda b: b["attention_mask"]
  logging.info("calibrating %s on %d batches", config.adapter.method, len(batches))
  return calibrate.collect(apply_fn, model.params, batches, targets, mask_fn=mask_fn,
                           sample_scale=registry.facts(config.adapter.method).stats_sample_scale)


def _export_peft(config, model: Model, adapter: base_lib.Adapter, host: dict,
                 initial: Optional[base_lib.AdapterState], path: str):
  """PEFT export of the run's adapter; method, rank, alpha and rsLoRA come from the adapter."""
  from lowrank_jax import adapter_io  # pylint: disable=g-import-not-at-top
  if not registry.facts(config.adapter.method).residual_init:
    initial = None
  adapter_io.export_peft(path, adapter, steps.adapter_state(host), model=model.spec.family,
                         cfg=model.spec.config, initial=initial,
                         base_model_name_or_path=model.spec.hf_hub_name)
