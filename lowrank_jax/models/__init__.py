"""Models as pure functions over nested-dict params, built on `lowrank_jax.ops`.

Each module exposes a frozen config dataclass with presets, `init(key, cfg) -> params`,
`apply(params, inputs, cfg, *, deterministic=True, rng=None)` and `hf_name_map(cfg)`.
A decoder LM module has `causal_lm_logits(params, cfg, batch, *, deterministic, rng)`, the
(B, T, vocab) next-token logits of a token batch, and, to read and write Hugging Face checkpoint
directories, `load_hf_checkpoint(path) -> (params, cfg)` and `save_hf_checkpoint(params, cfg,
path)`.
A classifier module also has `MODALITY` ("image" or "text": what `classify` reads),
`classify(params, cfg, batch, *, deterministic, rng) -> logits` and `dummy_batch(cfg)`; a text
one `load_tokenizer(max_length)`; one whose head is not built in `add_classifier_head(key, params,
num_classes)`. `ModelSpec` gives the trainer all of it without knowing any model by name.

>>> from lowrank_jax import models
>>> spec = models.get_model("mlp_digits")
>>> import jax; params = spec.init(jax.random.key(0))
>>> sorted(params)
['dense_0', 'dense_1']
"""
from __future__ import annotations

import dataclasses
import types
from typing import Any, Callable, NamedTuple, Optional

import jax

from lowrank_jax.models import cnn, llama, minilm, mlp, monet, vit


class ModelSpec(NamedTuple):
  """A registry entry: the model module, its config, and its pretrained loader if any."""
  name: str
  module: types.ModuleType
  config: Any
  pretrained: Optional[Callable[[], tuple[dict, Any]]] = None   # () -> (params, config)

  def init(self, key: jax.Array, **kwargs):
    return self.module.init(key, self.config, **kwargs)

  def apply(self, params, inputs, **kwargs):
    return self.module.apply(params, inputs, self.config, **kwargs)

  def hf_name_map(self) -> dict[str, str]:
    return self.module.hf_name_map(self.config)

  @property
  def family(self) -> str:
    """The model module's short name ("minilm", "mlp", ...), as `adapter_io` names models."""
    return self.module.__name__.rsplit(".", 1)[-1]

  @property
  def is_classifier(self) -> bool:
    return hasattr(self.module, "classify")

  @property
  def is_decoder(self) -> bool:
    """Whether the model is a decoder LM (its module has next-token `causal_lm_logits`)."""
    return hasattr(self.module, "causal_lm_logits")

  @property
  def modality(self) -> Optional[str]:
    """What `classify` reads: "image" or "text" (None: not a classifier)."""
    return getattr(self.module, "MODALITY", None)

  @property
  def partition_rules(self) -> tuple:
    """The model's `(regex, spec)` partition rules (`lowrank_jax.sharding`); () replicates all."""
    return tuple(getattr(self.module, "PARTITION_RULES", ()))

  @property
  def hf_hub_name(self) -> Optional[str]:
    """The Hugging Face checkpoint the model's weights come from (None: none)."""
    return getattr(self.module, "HF_HUB_NAME", None)

  @property
  def execution_fields(self) -> tuple:
    """Config fields that change how the model computes, not its shapes or weights (precision,
    remat, ...): the `model.config` fields a run may set on a checkpoint or pretrained model."""
    return tuple(getattr(self.module, "EXECUTION_FIELDS", ()))

  def with_config(self, **fields) -> "ModelSpec":
    """This spec with config `fields` replaced (e.g. dropout rates)."""
    return self._replace(config=dataclasses.replace(self.config, **fields))

  def load_pretrained(self) -> tuple[dict, "ModelSpec"]:
    """(pretrained params, this spec with the checkpoint's config).

    Raises:
      ValueError: the model has no pretrained weights (lists the models that have).
    """
    if self.pretrained is None:
      have = [n for n, spec in _REGISTRY.items() if spec.pretrained is not None]
      raise ValueError(f"model {self.name!r} has no pretrained weights; models with pretrained "
                       f"weights: {have}; else set model.pretrained=False")
    params, config = self.pretrained()
    return params, self._replace(config=config)

  def classify(self, params, batch, *, deterministic: bool = True,
               rng: Optional[jax.Array] = None) -> jax.Array:
    """Class logits (B, num_classes) of `batch`."""
    return self.module.classify(params, self.config, batch, deterministic=deterministic, rng=rng)

  def lm_logits(self, params, batch, *, deterministic: bool = True,
                rng: Optional[jax.Array] = None) -> jax.Array:
    """Next-token logits (B, T, vocab) of a token batch (`input_ids`, optional packing)."""
    return self.module.causal_lm_logits(params, self.config, batch, deterministic=deterministic,
                                        rng=rng)

  def load_checkpoint(self, path: str) -> tuple[dict, "ModelSpec"]:
    """(params, this spec with the checkpoint's config) of a Hugging Face checkpoint directory.

    Raises:
      ValueError: the model family reads no checkpoint directories.
    """
    load = getattr(self.module, "load_hf_checkpoint", None)
    if load is None:
      raise ValueError(f"model {self.name!r} cannot load a checkpoint directory; models that "
                       f"can: {[n for n, s in _REGISTRY.items() if s.is_decoder]}")
    params, config = load(path)
    return params, self._replace(config=config)

  def save_checkpoint(self, params, path: str) -> None:
    """Writes dense `params` as a Hugging Face checkpoint directory."""
    self.module.save_hf_checkpoint(params, self.config, path)

  def with_classifier(self, key: jax.Array, params, num_classes: int):
    """`params` with a `num_classes` output: a fresh head where the model adds one, else the
    built-in output layer, checked.

    Raises:
      ValueError: the built-in output layer has another number of outputs.
    """
    if hasattr(self.module, "add_classifier_head"):
      return self.module.add_classifier_head(key, params, num_classes)
    out = jax.eval_shape(lambda p, b: self.classify(p, b), params,
                         self.module.dummy_batch(self.config)).shape[-1]
    if out != num_classes:
      raise ValueError(f"model {self.name!r} has {out} outputs, the dataset has {num_classes} "
                       f"classes")
    return params

  def tokenizer(self, max_length: int):
    """The text model's fixed-length tokenizer; None for other models."""
    load = getattr(self.module, "load_tokenizer", None)
    return None if load is None else load(max_length)


_REGISTRY: dict[str, ModelSpec] = {spec.name: spec for spec in (
    ModelSpec("mlp_digits", mlp, mlp.PRESETS["digits"]),
    ModelSpec("mlp_mnist", mlp, mlp.PRESETS["mnist"]),
    ModelSpec("cnn_mnist", cnn, cnn.PRESETS["mnist"]),
    ModelSpec("cnn_digits", cnn, cnn.PRESETS["digits"]),
    ModelSpec("cnn_cifar", cnn, cnn.PRESETS["cifar"]),
    ModelSpec("vit_tiny", vit, vit.PRESETS["vit_tiny"]),
    ModelSpec("vit_test", vit, vit.PRESETS["test"]),
    ModelSpec("minilm", minilm, minilm.MiniLMConfig.all_minilm_l6_v2(), minilm.load_pretrained),
    ModelSpec("minilm_tiny", minilm, minilm.MiniLMConfig.tiny()),
    ModelSpec("llama_tiny", llama, llama.PRESETS["tiny"]),
    ModelSpec("llama_small", llama, llama.PRESETS["small"]),
    ModelSpec("tinyllama_1_1b", llama, llama.PRESETS["tinyllama_1_1b"]),
    ModelSpec("llama2_7b", llama, llama.PRESETS["llama2_7b"]),
)}


def list_models(classifiers_only: bool = False, decoders_only: bool = False) -> list[str]:
  """Registered model names (sorted); with `classifiers_only`, those that can `classify`; with
  `decoders_only`, the decoder LMs."""
  names = sorted(_REGISTRY)
  if classifiers_only:
    names = [n for n in names if _REGISTRY[n].is_classifier]
  if decoders_only:
    names = [n for n in names if _REGISTRY[n].is_decoder]
  return names


def get_model(name: str) -> ModelSpec:
  """Registry lookup; raises ValueError listing the valid names.

  `minilm` is the all-MiniLM-L6-v2 shape; its pretrained params come from `minilm.load_pretrained()`.
  """
  if name not in _REGISTRY:
    raise ValueError(f"Unknown model {name!r}; valid names: {list_models()}")
  return _REGISTRY[name]


__all__ = ["ModelSpec", "get_model", "list_models", "cnn", "llama", "minilm", "mlp", "monet",
           "vit"]
