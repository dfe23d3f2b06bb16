"""Helpers shared by the configs: strict typed config args and adapter sub-configs.

`parse_arg` follows big_vision's `configs/common.py::parse_arg`: the string after `:` in
`--config configs/x.py:method=lora,rank=4,runlocal` is parsed against typed defaults; a bare name
means True for a bool, bools parse strictly, and unknown keys raise ValueError.

>>> from configs import common
>>> a = common.parse_arg('rank=4,runlocal', rank=8, runlocal=False, method='lora')
>>> a.rank, a.runlocal, a.method
(4, True, 'lora')
>>> common.arg(method='lora', rank=4)
{'arg': 'method=lora,rank=4'}
"""
from __future__ import annotations

from typing import Any, Optional

import ml_collections

from lowrank_jax import registry

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _parse_value(key: str, text: str, default: Any) -> Any:
  if isinstance(default, bool):
    low = text.lower()
    if low in _TRUE:
      return True
    if low in _FALSE:
      return False
    raise ValueError(f"config arg {key}={text!r}: not a bool (use true/false)")
  if isinstance(default, int):
    try:
      return int(text)
    except ValueError:
      raise ValueError(f"config arg {key}={text!r}: not an int") from None
  if isinstance(default, float):
    try:
      return float(text)
    except ValueError:
      raise ValueError(f"config arg {key}={text!r}: not a float") from None
  if isinstance(default, (tuple, list)):
    return tuple(t for t in text.split("+") if t)   # lists are written a+b+c
  return text


def parse_arg(arg: Optional[str], **typed_defaults) -> ml_collections.ConfigDict:
  """Parses `"k=v,flag,..."` against `typed_defaults` (types come from the defaults).

  Args:
    arg: the config arg string (None or "" gives the defaults).
    **typed_defaults: allowed keys and their defaults.

  Returns:
    A ConfigDict with every key of `typed_defaults`.

  Raises:
    ValueError: an unknown key (the message lists the valid ones) or a value of the wrong type.
  """
  out = dict(typed_defaults)
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, eq, value = item.partition("=")
    key = key.strip()
    if key not in typed_defaults:
      raise ValueError(f"Unhandled config arg {key!r}; valid args: {sorted(typed_defaults)}")
    if not eq:
      if not isinstance(typed_defaults[key], bool):
        raise ValueError(f"config arg {key!r} needs a value ({key}=...)")
      out[key] = True
    else:
      out[key] = _parse_value(key, value.strip(), typed_defaults[key])
  return ml_collections.ConfigDict(out)


def arg(**kw) -> dict:
  """`{'arg': 'k=v,...'}` for a sweep's `add(...)`: a point given by config args."""
  def fmt(v):
    return "+".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)
  return {"arg": ",".join(f"{k}={fmt(v)}" for k, v in kw.items())}


def adapter_config(method: str, *, rank: int, targets, alpha: Optional[float] = None,
                   total_steps: int = 0, **extra) -> ml_collections.ConfigDict:
  """The `config.adapter` sub-config of `method`: its name and factory keyword arguments.

  `rank` is a size knob; each method's module says what it means there (`MethodFacts.
  config_kwargs`: LoRA-family rank r, NOLA basis counts 16·r, intrinsic dimension 64·r, KronA
  ignores it, ...). `extra` overrides or adds arguments.

  Args:
    method: a `lowrank_jax.registry` name.
    rank: the size knob.
    targets: regex(es) of the adapted kernels.
    alpha: LoRA-style alpha; None leaves it to the method's config default.
    total_steps: run length, for methods whose schedules depend on it (IncreLoRA, AdaLoRA).
    **extra: more factory arguments.

  Raises:
    ValueError: an unknown or unavailable method (the message lists the valid names).
  """
  targets = list(targets) if isinstance(targets, (tuple, list)) else targets
  kw = registry.facts(method).config_kwargs(rank, alpha, targets, total_steps)
  kw.update(extra)
  return ml_collections.ConfigDict({"method": method, **kw})


def base_config() -> ml_collections.ConfigDict:
  """Fields every run config has (the values here are placeholders the configs overwrite)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 100
  c.batch_size = 32
  c.eval_batch_size = 256
  c.eval_every = 0
  c.log_every = 10
  c.ckpt_every = 50
  c.keep_ckpts = 2
  c.model = ml_collections.ConfigDict({"name": "mlp_digits", "pretrained": False,
                                       # "int8" / "nf4": quantize the frozen base (see train.py)
                                       "base_format": "float"})
  c.head = ""
  c.dataset = ml_collections.ConfigDict({
      "name": "digits", "train_split": "train", "eval_split": "test", "max_train_examples": 0,
      "max_eval_examples": 0, "seq_len": 0, "shuffle_seed": 0})
  c.adapter = adapter_config("lora", rank=4, targets=[".*kernel"])
  c.optimizer = ml_collections.ConfigDict({
      "name": "adamw", "lr": 1e-3, "head_lr": 1e-3, "wd": 0.0, "b1": 0.9, "b2": 0.999,
      "schedule": "cosine", "warmup_steps": 0, "grad_clip": 1.0})
  c.calib_batches = 8
  c.baseline = False
  c.save_adapter = True
  c.export_peft = False
  c.progress = True
  c.overwrite = False
  c.nonfinite = "stop"   # NaN/Inf loss or gradient: "stop" the run, or "skip" the update
  # Device mesh (`lowrank_jax.sharding`): batches split over data x fsdp, params sharded over
  # fsdp and tensor by the model's partition rules; -1 takes the devices the others leave.
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  # Multi-process runs (`jax.distributed`): "" / 0 / -1 read JAX_COORDINATOR_ADDRESS,
  # JAX_NUM_PROCESSES, JAX_PROCESS_ID; one process (the default) starts nothing.
  c.distributed = ml_collections.ConfigDict({"coordinator_address": "", "num_processes": 0,
                                             "process_id": -1, "auto": False})
  return c


def parse_flags_with_config(parser, section: Optional[str] = None, argv=None):
  """Parses an argparse experiment's flags, with defaults from a ``--config path[:arg]`` file.

  For experiments that take flags rather than a config (e.g. `experiments.relax_sor`): the file's
  ``get_config(arg)`` (or its ``section`` sub-dict, when one file serves several experiments)
  holds flag values by their argparse names; flags given on the command line win. A key that is
  not a flag of `parser` raises ValueError naming it and the valid ones.

  Args:
    parser: the experiment's `argparse.ArgumentParser`; a ``--config`` flag is added to it.
    section: the config's sub-dict for this experiment, or None for the whole config.
    argv: the arguments (default: ``sys.argv[1:]``).

  Returns:
    The parsed `argparse.Namespace`; ``config`` holds the spec given, or ``""``.
  """
  import importlib.util  # pylint: disable=g-import-not-at-top

  parser.add_argument("--config", default="",
                      help="configs/repro/*.py[:arg] whose values are this experiment's defaults")
  known, _ = parser.parse_known_args(argv)
  if known.config:
    path, sep, arg = known.config.partition(":")
    spec = importlib.util.spec_from_file_location("_flag_config", path)
    if spec is None:
      raise ValueError(f"--config={known.config!r}: {path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    values = module.get_config(*([arg] if sep else []))
    values = (values[section] if section else values).to_dict()
    flags = {a.dest for a in parser._actions}  # pylint: disable=protected-access
    unknown = sorted(set(values) - flags)
    if unknown:
      raise ValueError(f"--config={known.config!r}: {unknown} are not flags of this experiment; "
                       f"valid: {sorted(flags - {'help', 'config'})}")
    parser.set_defaults(**{k: list(v) if isinstance(v, tuple) else v for k, v in values.items()})
  return parser.parse_args(argv)
