"""Adapter files: our own format (any method), and the Hugging Face PEFT layout (LoRA family).

Our format (`save_adapter` / `load_adapter`), a directory holding:

  adapter.safetensors   every array of the AdapterState (and the optional head), flat, named by
                        its `/`-joined pytree path, NamedTuple fields included, e.g.
                        ``trainable/encoder/layer_0/attention/query/kernel/a``,
                        ``head/head/kernel``.
  adapter_config.json   {"format": "lowrank_jax.adapter", "version": 1, "config": <user dict>,
                        "adapter": {"name", "method", "hparams"} (with `adapter=`; see
                        `saved_adapter_info`), "tree": <structure of the state>} -- the structure
                        records dicts, NamedTuples (by class, lowrank_jax classes only), tuples,
                        lists, None and typed PRNG keys, so `load_adapter` rebuilds the exact
                        pytree.

PEFT layout (`export_peft` / `import_peft`), what `peft.PeftModel.from_pretrained(model, dir)`
reads for a `LoraConfig` adapter:

  adapter_model.safetensors
      base_model.model.<hf_module>.lora_A.weight   (r, d_in)  = aᵀ
      base_model.model.<hf_module>.lora_B.weight   (d_out, r) = bᵀ
      base_model.model.<hf_head>.weight / .bias    (only with `head=`; listed in modules_to_save)
  adapter_config.json
      {"peft_type": "LORA", "r", "lora_alpha", "target_modules", "use_rslora", "task_type",
       "base_model_name_or_path", "lora_dropout", "bias": "none", "fan_in_fan_out": false,
       "modules_to_save", "init_lora_weights": true, ...}

Our LoRA leaf state is `LoRAFactors(a, b)` with a (d_in, r), b (r, d_out) for a flax kernel
(d_in, d_out); PyTorch `nn.Linear.weight` is (d_out, d_in), and PEFT computes
W + (alpha/r)·B·A with `lora_A.weight` (r, d_in) and `lora_B.weight` (d_out, r). So
`lora_A.weight = aᵀ`, `lora_B.weight = bᵀ`, and the same update follows:
ΔW_torch = s·B·A = s·bᵀ·aᵀ = (s·a·b)ᵀ = ΔW_flaxᵀ. `<hf_module>` comes from the model's
`hf_name_map(cfg)` (our module path, the param path without `/kernel`, -> HF module name): for MiniLM ``encoder/layer_0/attention/query`` ->
``encoder.layer.0.attention.self.query`` (a `BertModel`; with ``task_type="SEQ_CLS"`` the encoder
sits under ``bert.`` in `BertForSequenceClassification`), for Llama
``layers/layer_0/attention/q_proj`` -> ``model.layers.0.self_attn.q_proj`` (`LlamaForCausalLM`).
`target_modules` lists the short module names (``["query", "value"]``) when they select exactly the
exported modules, else the full module names.

The exporter reads the method, rank, alpha, rsLoRA and dropout from the adapter (`Adapter.hparams`)
and refuses methods without a PEFT LoRA layout. Residual-init adapters (PiSSA, CorDA: `init`
replaced W by W − s·a0·b0) are exported as PEFT does ("pissa -> lora" conversion): with the
initial factors (a0, b0), ΔW = s·(a·b − a0·b0) = s·[a, a0]·[b; −b0], a rank-2r LoRA of the
*original* weights with alpha doubled (alpha·√2 for rsLoRA) so that the scale stays alpha/r.

>>> import jax, jax.numpy as jnp, tempfile, lowrank_jax as lj
>>> from lowrank_jax import adapter_io
>>> params = {'dense': {'kernel': jnp.ones((4, 3))}}
>>> adapter = lj.lora(rank=2, targets='dense/kernel')
>>> _, state = adapter.init(jax.random.key(0), params)
>>> d = tempfile.mkdtemp()
>>> _ = adapter_io.save_adapter(d, state, {'run': 'demo'}, adapter=adapter)
>>> state2, cfg, _ = adapter_io.load_adapter(d)
>>> cfg['run'], type(state2.trainable['dense']['kernel']).__name__
('demo', 'LoRAFactors')
>>> info = adapter_io.saved_adapter_info(d)
>>> info['method'], info['hparams']['rank'], info['hparams']['dtype']
('lora', 2, 'float32')
"""
from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import re
from typing import Any, Iterator, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax import base as base_lib
from lowrank_jax import registry
from lowrank_jax import tree as tree_lib

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
PEFT_MODELS = ("minilm", "llama")


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary path beside `path` to write; when the block succeeds, renames it to
  `path` (atomic on one filesystem), so `path` is always absent, the old file, or whole; when it
  fails, removes the temporary file."""
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


# =============================================================================================
# Our format.
# =============================================================================================

def _encode_tree(node: Any, prefix: str, arrays: dict[str, np.ndarray]) -> dict:
  """Structure of `node` as JSON; fills `arrays` with {path: numpy array}."""
  join = lambda k: f"{prefix}/{k}" if prefix else str(k)
  if node is None:
    return {"type": "none"}
  if isinstance(node, dict):
    for k in node:
      if not isinstance(k, str) or "/" in k:
        raise ValueError(f"adapter state dict keys must be strings without '/', got {k!r} at "
                         f"{prefix or '<root>'}")
    return {"type": "dict", "items": {k: _encode_tree(v, join(k), arrays) for k, v in node.items()}}
  if isinstance(node, tuple) and hasattr(node, "_fields"):
    cls = type(node)
    if not cls.__module__.startswith("lowrank_jax"):
      raise ValueError(f"cannot save NamedTuple {cls.__module__}.{cls.__qualname__} at "
                       f"{prefix}: only lowrank_jax state types are supported")
    return {"type": "namedtuple", "class": f"{cls.__module__}:{cls.__qualname__}",
            "items": {f: _encode_tree(getattr(node, f), join(f), arrays) for f in node._fields}}
  if isinstance(node, (tuple, list)):
    return {"type": type(node).__name__,
            "items": [_encode_tree(v, join(i), arrays) for i, v in enumerate(node)]}
  if isinstance(node, (jax.Array, np.ndarray, np.generic, int, float)):
    x = node
    is_key = isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
    if is_key:
      impl = str(jax.random.key_impl(x))
      x = jax.random.key_data(x)
    arrays[prefix] = np.ascontiguousarray(np.asarray(x))
    return {"type": "prng_key", "impl": impl} if is_key else {"type": "array"}
  raise ValueError(f"cannot save a {type(node).__name__} at {prefix or '<root>'} in an adapter "
                   f"file (arrays, dicts, tuples, lists, NamedTuples and None are supported)")


def _decode_tree(spec: dict, prefix: str, arrays: dict[str, np.ndarray]) -> Any:
  join = lambda k: f"{prefix}/{k}" if prefix else str(k)
  t = spec["type"]
  if t == "none":
    return None
  if t == "dict":
    return {k: _decode_tree(v, join(k), arrays) for k, v in spec["items"].items()}
  if t == "namedtuple":
    module, qualname = spec["class"].split(":")
    if not module.startswith("lowrank_jax"):
      raise ValueError(f"adapter file names a non-lowrank_jax class {spec['class']!r}")
    cls = importlib.import_module(module)
    for part in qualname.split("."):
      cls = getattr(cls, part)
    return cls(**{k: _decode_tree(v, join(k), arrays) for k, v in spec["items"].items()})
  if t in ("tuple", "list"):
    items = [_decode_tree(v, join(i), arrays) for i, v in enumerate(spec["items"])]
    return tuple(items) if t == "tuple" else items
  if prefix not in arrays:
    raise ValueError(f"adapter file is missing the array {prefix!r}")
  x = jnp.asarray(arrays[prefix])
  if t == "prng_key":
    return jax.random.wrap_key_data(x, impl=spec["impl"])
  return x


def _jsonable(x: Any) -> Any:
  """`x` as JSON: mappings and sequences recursively, dtypes by name, other objects by repr."""
  if isinstance(x, np.generic):
    x = x.item()
  if x is None or isinstance(x, (bool, int, float, str)):
    return x
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (tuple, list)):
    return [_jsonable(v) for v in x]
  try:
    return jnp.dtype(x).name
  except TypeError:
    return repr(x)


def save_adapter(path: str, adapter_state: base_lib.AdapterState, config_dict: dict, *,
                 head: Any = None, adapter: Optional[base_lib.Adapter] = None) -> str:
  """Writes an adapter (and optionally the trained head) to the directory `path`.

  Args:
    path: output directory (created).
    adapter_state: the `AdapterState` (trainable and frozen parts are both saved).
    config_dict: JSON-serializable description (run, model, ...), returned by `load_adapter`.
    head: optional pytree of fully trained params (e.g. the classification head).
    adapter: the `Adapter` the state belongs to; its name, registered method and `hparams` are
      recorded (read them back with `saved_adapter_info`). Dtypes are written by name and
      callables (e.g. a targets predicate) by repr.

  Returns:
    `path`.
  """
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  os.makedirs(path, exist_ok=True)
  arrays: dict[str, np.ndarray] = {}
  tree = {"trainable": _encode_tree(adapter_state.trainable, "trainable", arrays),
          "frozen": _encode_tree(adapter_state.frozen, "frozen", arrays),
          "head": _encode_tree(head, "head", arrays)}
  meta = {"format": "lowrank_jax.adapter", "version": 1, "config": config_dict, "tree": tree}
  if adapter is not None:
    meta["adapter"] = {"name": adapter.name, "method": registry.method_of(adapter),
                       "hparams": _jsonable(adapter.hparams)}
  with atomic_path(os.path.join(path, ADAPTER_FILE)) as tmp:
    safetensors.numpy.save_file(arrays, tmp, metadata={"format": "lowrank_jax.adapter"})
  with atomic_path(os.path.join(path, ADAPTER_CONFIG)) as tmp, open(tmp, "w") as f:
    json.dump(meta, f, indent=2, default=str)
  return path


def load_adapter(path: str) -> tuple[base_lib.AdapterState, dict, Any]:
  """Reads a directory written by `save_adapter`.

  Returns:
    (adapter_state, config_dict, head) -- head is None if none was saved.

  Raises:
    FileNotFoundError: the directory lacks the files. ValueError: not our format.
  """
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  meta = _read_meta(path)
  arrays = safetensors.numpy.load_file(os.path.join(path, ADAPTER_FILE))
  tree = meta["tree"]
  state = base_lib.AdapterState(_decode_tree(tree["trainable"], "trainable", arrays),
                                _decode_tree(tree["frozen"], "frozen", arrays))
  return state, meta["config"], _decode_tree(tree["head"], "head", arrays)


def saved_adapter_info(path: str) -> Optional[dict]:
  """`{"name", "method", "hparams"}` of the adapter saved in `path`, or None if none was given.

  `method` is the registered method (None for combinators such as `chain`); `hparams` are the
  arguments the adapter was built with, as JSON (see `save_adapter`).
  """
  return _read_meta(path).get("adapter")


def _read_meta(path: str) -> dict:
  for f in (ADAPTER_FILE, ADAPTER_CONFIG):
    if not os.path.exists(os.path.join(path, f)):
      raise FileNotFoundError(f"{path} is not an adapter directory: {f} is missing"
                              + (" (it looks like a PEFT adapter: use import_peft)" if
                                 os.path.exists(os.path.join(path, PEFT_WEIGHTS)) else ""))
  with open(os.path.join(path, ADAPTER_CONFIG)) as f:
    meta = json.load(f)
  if meta.get("format") != "lowrank_jax.adapter":
    raise ValueError(f"{path}/{ADAPTER_CONFIG} is not a lowrank_jax adapter config")
  return meta


# =============================================================================================
# PEFT layout.
# =============================================================================================

def _name_map(model: str, cfg) -> dict[str, str]:
  if model not in PEFT_MODELS:
    raise ValueError(f"Unknown model {model!r} for the PEFT layout; valid: {list(PEFT_MODELS)}")
  from lowrank_jax import models  # pylint: disable=g-import-not-at-top
  module = {"minilm": models.minilm, "llama": models.llama}[model]
  return module.hf_name_map(cfg)


def _hf_prefix(model: str, task_type: Optional[str]) -> str:
  return "bert." if model == "minilm" and task_type == "SEQ_CLS" else ""


def _lora_leaves(state: base_lib.AdapterState) -> dict[str, Any]:
  flat = tree_lib.unnest(state.trainable)
  bad = [p for p, v in flat.items() if not (hasattr(v, "a") and hasattr(v, "b"))]
  if bad:
    raise ValueError(f"export_peft needs a LoRA-family state (LoRAFactors(a, b) per leaf); "
                     f"{bad[:3]} are not")
  return flat


def _peft_method(adapter: base_lib.Adapter) -> str:
  """The registered method of `adapter` if it has a PEFT LoRA layout, else a ValueError."""
  exportable = [m for m in registry.list_methods(available_only=True)
                if registry.facts(m).peft_exportable]
  method = registry.method_of(adapter)
  if method is None or not registry.facts(method).peft_exportable:
    raise ValueError(f"export_peft: adapter {adapter.name!r} has no PEFT LoRA layout; exportable "
                     f"methods: {exportable}")
  missing = [k for k in ("rank", "alpha", "use_rslora", "dropout") if k not in adapter.hparams]
  if missing:
    raise ValueError(f"export_peft: adapter.hparams lacks {missing}; build the adapter with its "
                     f"factory (lowrank_jax.{method}) so that it records its arguments")
  return method


def _initial_leaves(method: str, residual_init: bool, flat: dict[str, Any],
                    initial: Optional[base_lib.AdapterState]) -> Optional[dict[str, Any]]:
  """The initial factors per path of a residual-init export, checked against the state."""
  if not residual_init:
    if initial is not None:
      raise ValueError(f"export_peft: initial= is only for residual-init methods; {method!r} "
                       f"adds its update to the unchanged weights, so pass no initial state")
    return None
  if initial is None:
    raise ValueError(f"export_peft: {method!r} replaced the base weights by a residual at init, so "
                     f"its state alone does not describe an update of the original weights; pass "
                     f"initial=<the AdapterState its init returned> (base, initial = "
                     f"adapter.init(...)) to export the LoRA of the original weights")
  init_flat = _lora_leaves(initial)
  if sorted(init_flat) != sorted(flat):
    raise ValueError(f"export_peft: initial= has paths {sorted(init_flat)[:3]}..., the state has "
                     f"{sorted(flat)[:3]}...; pass the initial state of this adapter")
  for p, f in flat.items():
    f0 = init_flat[p]
    if (np.shape(f0.a), np.shape(f0.b)) != (np.shape(f.a), np.shape(f.b)):
      raise ValueError(f"export_peft: initial= factors at {p} have shapes {np.shape(f0.a)} x "
                       f"{np.shape(f0.b)}, the state's {np.shape(f.a)} x {np.shape(f.b)}")
  return init_flat


def export_peft(path: str, adapter: base_lib.Adapter, state: base_lib.AdapterState, *,
                model: str, cfg, initial: Optional[base_lib.AdapterState] = None,
                target_modules: Optional[Sequence[str]] = None, task_type: Optional[str] = None,
                base_model_name_or_path: Optional[str] = None, head: Any = None) -> str:
  """Writes a LoRA-family adapter in the Hugging Face PEFT layout (see module docstring).

  The method, rank r, alpha (None means r), rsLoRA and dropout come from `adapter.hparams`, so the
  written scale is the one the adapter trained with.

  A head exported with `task_type="SEQ_CLS"` is loaded by PEFT into
  `BertForSequenceClassification`, whose classifier reads the BERT pooler output (tanh of a dense
  layer on the [CLS] token's state); `minilm.classify`, which trained it, reads the mean of the
  token states over the attention mask instead. The exported head therefore meets other features
  in Hugging Face unless the model there pools by the mean too.

  Args:
    path: output directory.
    adapter: the adapter the state belongs to (a registered PEFT-exportable method: LoRA, PiSSA,
      CorDA).
    state: the adapter state (`LoRAFactors(a, b)` leaves under kernel paths).
    model: "minilm" or "llama" (which `hf_name_map`).
    cfg: the model config (`MiniLMConfig` / `LlamaConfig`).
    initial: for residual-init methods (PiSSA, CorDA), required: the state `adapter.init`
      returned; the export is then the rank-2r LoRA of the original weights. Refused for others.
    target_modules: PEFT `target_modules`; by default the short names if they select exactly the
      exported modules, else the full module names.
    task_type: PEFT task type (None, "FEATURE_EXTRACTION", "SEQ_CLS", "CAUSAL_LM").
    base_model_name_or_path: written to the config.
    head: optional `{'head': {'kernel', 'bias'}}`-style trained head, exported as a module to save.

  Returns:
    `path`.

  Raises:
    ValueError: a method without PEFT layout (named, with the exportable ones), an adapter without
      its hparams, a missing/unexpected/mismatched `initial`, factors that are not rank-r 2-D
      LoRA factors, modules without a Hugging Face name, an unknown model.
  """
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  method = _peft_method(adapter)
  hp = adapter.hparams
  rank, use_rslora = int(hp["rank"]), bool(hp["use_rslora"])
  alpha = float(rank if hp["alpha"] is None else hp["alpha"])
  names = _name_map(model, cfg)
  prefix = PEFT_PREFIX + _hf_prefix(model, task_type)
  flat = _lora_leaves(state)
  init_flat = _initial_leaves(method, registry.facts(method).residual_init, flat, initial)
  out_rank, out_alpha = rank, alpha
  if init_flat is not None:
    out_rank, out_alpha = 2 * rank, alpha * (math.sqrt(2.0) if use_rslora else 2.0)
  tensors, modules = {}, []
  for p, f in sorted(flat.items()):
    module, leaf = p.rsplit("/", 1) if "/" in p else ("", p)
    if leaf != "kernel" or module not in names:
      raise ValueError(f"{p} is not a kernel of a module with a Hugging Face name; exportable "
                       f"modules: {sorted(names)[:6]}...")
    a, b = np.asarray(f.a, np.float32), np.asarray(f.b, np.float32)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != rank or b.shape[0] != rank:
      raise ValueError(f"{p}: factors {a.shape} x {b.shape} are not rank-{rank} 2-D LoRA factors")
    if init_flat is not None:
      a0, b0 = np.asarray(init_flat[p].a, np.float32), np.asarray(init_flat[p].b, np.float32)
      a, b = np.concatenate([a, a0], 1), np.concatenate([b, -b0], 0)
    hf = names[module]
    modules.append(hf)
    tensors[f"{prefix}{hf}.lora_A.weight"] = np.ascontiguousarray(a.T)
    tensors[f"{prefix}{hf}.lora_B.weight"] = np.ascontiguousarray(b.T)
  modules_to_save = None
  if head is not None:
    modules_to_save = []
    for p, v in tree_lib.unnest(head).items():
      module, leaf = p.rsplit("/", 1)
      if module not in names or leaf not in ("kernel", "bias"):
        raise ValueError(f"head param {p} has no Hugging Face name")
      hf = names[module]
      modules_to_save.append(hf.rsplit(".", 1)[-1])
      v = np.asarray(v, np.float32)
      tensors[f"{PEFT_PREFIX}{hf}.{'weight' if leaf == 'kernel' else 'bias'}"] = \
          np.ascontiguousarray(v.T if leaf == "kernel" else v)
    modules_to_save = sorted(set(modules_to_save))
  if target_modules is None:
    target_modules = _short_targets(modules, [n for m, n in names.items()
                                              if not m.split("/")[-1].endswith(("norm",))])
  os.makedirs(path, exist_ok=True)
  with atomic_path(os.path.join(path, PEFT_WEIGHTS)) as tmp:
    safetensors.numpy.save_file(tensors, tmp, metadata={"format": "pt"})
  config = {
      "peft_type": "LORA", "r": out_rank, "lora_alpha": out_alpha,
      "target_modules": list(target_modules), "use_rslora": bool(use_rslora),
      "lora_dropout": float(hp["dropout"]), "bias": "none", "fan_in_fan_out": False,
      "init_lora_weights": True, "inference_mode": True, "task_type": task_type,
      "base_model_name_or_path": base_model_name_or_path, "modules_to_save": modules_to_save,
      "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
  }
  with atomic_path(os.path.join(path, PEFT_CONFIG)) as tmp, open(tmp, "w") as f:
    json.dump(config, f, indent=2)
  return path


def _short_targets(modules: list[str], all_modules: list[str]) -> list[str]:
  """Short names (last component) if PEFT's suffix match selects exactly `modules`, else full."""
  short = sorted({m.rsplit(".", 1)[-1] for m in modules})
  selected = {m for m in all_modules if any(m == s or m.endswith("." + s) for s in short)}
  return short if selected == set(modules) else sorted(modules)


def import_peft(path: str, *, model: str, cfg, dtype=jnp.float32):
  """Reads a PEFT LoRA adapter directory into our state.

  Args:
    path: directory with `adapter_model.safetensors` and `adapter_config.json`.
    model: "minilm" or "llama".
    cfg: the model config.
    dtype: dtype of the factors.

  Returns:
    (adapter, state, info): a `lowrank_jax.lora` adapter targeting exactly the imported kernels
    (so `adapter.apply(params, state)` gives the adapted params), its `AdapterState`, and the PEFT
    config dict. The head (`modules_to_save`), if present, is in `info["head"]` as our params.

  Raises:
    ValueError: not a LORA adapter, unknown module names, inconsistent ranks, unsupported options
      (fan_in_fan_out, rank_pattern/alpha_pattern, DoRA).
  """
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  from lowrank_jax.adapters import lora as lora_lib  # pylint: disable=g-import-not-at-top
  for f in (PEFT_WEIGHTS, PEFT_CONFIG):
    if not os.path.exists(os.path.join(path, f)):
      raise FileNotFoundError(f"{path} is not a PEFT adapter directory: {f} is missing")
  with open(os.path.join(path, PEFT_CONFIG)) as f:
    pcfg = json.load(f)
  if pcfg.get("peft_type") != "LORA":
    raise ValueError(f"only peft_type 'LORA' can be imported, got {pcfg.get('peft_type')!r}")
  for key in ("rank_pattern", "alpha_pattern"):
    if pcfg.get(key):
      raise ValueError(f"adapter_config.json has {key}={pcfg[key]}; per-module ranks/alphas are "
                       f"not supported")
  if pcfg.get("fan_in_fan_out") or pcfg.get("use_dora"):
    raise ValueError("fan_in_fan_out / use_dora adapters are not supported")
  rank, alpha = int(pcfg["r"]), float(pcfg.get("lora_alpha", pcfg["r"]))
  inverse = {hf: ours for ours, hf in _name_map(model, cfg).items()}
  tensors = safetensors.numpy.load_file(os.path.join(path, PEFT_WEIGHTS))
  pat = re.compile(r"^base_model\.model\.(?:bert\.)?(.+)\.lora_([AB])(?:\.default)?\.weight$")
  factors: dict[str, dict[str, np.ndarray]] = {}
  head: dict[str, Any] = {}
  for name, value in tensors.items():
    m = pat.match(name)
    if m:
      hf, which = m.group(1), m.group(2)
      if hf not in inverse:
        raise ValueError(f"PEFT tensor {name}: module {hf!r} is not a {model} module (e.g. "
                         f"{sorted(inverse)[:4]})")
      factors.setdefault(inverse[hf], {})[which] = value
      continue
    hm = re.match(r"^base_model\.model\.(.+)\.(weight|bias)$", name)
    if hm and hm.group(1) in inverse:
      ours = inverse[hm.group(1)]
      head[f"{ours}/{'kernel' if hm.group(2) == 'weight' else 'bias'}"] = jnp.asarray(
          value.T if hm.group(2) == "weight" else value, dtype)
      continue
    raise ValueError(f"unexpected tensor {name!r} in {PEFT_WEIGHTS}")
  if not factors:
    raise ValueError(f"{path}/{PEFT_WEIGHTS} has no lora_A/lora_B tensors")
  trainable = {}
  for module, ab in sorted(factors.items()):
    if set(ab) != {"A", "B"}:
      raise ValueError(f"module {module}: need both lora_A and lora_B, got {sorted(ab)}")
    a, b = ab["A"].T, ab["B"].T
    if a.shape[1] != rank or b.shape[0] != rank:
      raise ValueError(f"module {module}: lora_A {ab['A'].shape} / lora_B {ab['B'].shape} do not "
                       f"have r={rank}")
    trainable[f"{module}/kernel"] = lora_lib.LoRAFactors(jnp.asarray(a, dtype),
                                                         jnp.asarray(b, dtype))
  targets = [re.escape(p) for p in sorted(trainable)]
  adapter = lora_lib.lora(rank=rank, alpha=alpha, targets=targets,
                          use_rslora=bool(pcfg.get("use_rslora", False)))
  state = base_lib.AdapterState(tree_lib.nest(trainable), {})
  info = dict(pcfg)
  info["head"] = tree_lib.nest(head) if head else None
  return adapter, state, info
