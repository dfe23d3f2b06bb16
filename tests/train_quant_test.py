"""The runner on a quantized frozen base (`config.model.base_format`): the decoder demo trains
LoRA on an NF4 base and its loss falls; the base the adapter nests on holds codes, never the dense
kernels; bad quantization settings are refused by `check_config`, naming the field."""
import json
import os

import jax
import numpy as np
import pytest

from configs import common
from configs import gloss_lm
from lowrank_jax import quant
from lowrank_jax import structured
from lowrank_jax import train
from lowrank_jax import tree as tree_lib

TARGETS = (r"layers/layer_\d+/(attention|mlp)/\w+_proj/kernel",)
# gloss_lm's runlocal model: hidden 32, MLP 64, so every projection's input size is 32 or 64.
BLOCK = 32


def _config(**model_fields):
  """The gloss_lm runlocal decoder with LoRA rank 4 on its projections (the base frozen)."""
  c = gloss_lm.get_config("runlocal")
  c.progress = False
  c.head = ""
  c.total_steps = 6
  c.log_every = 1
  c.eval_before = True
  c.export_hf = False
  c.save_adapter = False
  c.dataset.max_train_examples = 64
  c.dataset.max_eval_examples = 16
  c.dataset.seq_len = 64
  c.optimizer.lr = 1e-2
  c.adapter = common.adapter_config("lora", rank=4, targets=TARGETS, total_steps=c.total_steps)
  for k, v in model_fields.items():
    c.model[k] = v
  return c


def _projections(params) -> dict:
  return {p: leaf for p, leaf in tree_lib.flatten_with_names(params)[0]
          if "_proj/kernel" in p}


def test_decoder_demo_trains_lora_on_an_nf4_base(tmp_path, fast_compile):
  c = _config(base_format="nf4", quant_block_size=BLOCK)
  r = train.train_and_evaluate(c, str(tmp_path))
  assert r["perplexity"] < r["before"]["perplexity"] - 1.0, (r["before"], r["perplexity"])
  with open(os.path.join(str(tmp_path), "metrics.jsonl")) as f:
    losses = [m["loss"] for m in map(json.loads, f) if "grad_norm" in m]
  assert len(losses) == c.total_steps and losses[-1] < losses[0], losses
  # The frozen base as stored: each projection's 4-bit codes and one fp32 absmax per block of 32
  # inputs, instead of its fp32 entries.
  dense = jax.eval_shape(lambda k: train.decoder_spec(c.model, k)[0], jax.random.key(0))
  proj = sum(x.size for x in _projections(dense).values())
  assert r["base_bytes"] == train.tree_bytes(dense) - 4 * proj + proj // 2 + 4 * proj // BLOCK


def test_the_adapter_nests_on_codes_never_dense_kernels():
  c = _config(base_format="nf4", quant_block_size=BLOCK, double_quant=True)
  train.check_config(c)
  params, spec = train.decoder_spec(c.model, jax.random.key(0))
  model = train.Model(params, None, None, spec)
  dense = _projections(params)
  adapter, base, state, head = train.init_adapter(c, model, None, jax.random.key(1))
  assert head == {}
  # Every leaf of the frozen base under a projection is a code or scale array with at most half
  # as many entries as the kernel it stands for: no dense copy of it is kept.
  names = tree_lib.flatten_with_names(base)[0]
  for path, kernel in dense.items():
    under = [(p, x) for p, x in names if p.startswith(path)]
    assert under, path
    for p, x in under:
      # Packed 4-bit codes (uint8), int8 codes of the absmaxes and their float32 scales.
      assert x.dtype in (np.uint8, np.int8, np.float32) and x.size <= kernel.size // 2, p
  adapted = adapter.apply(base, state)
  for path in dense:
    w = dict(tree_lib.flatten_with_names(adapted, is_leaf=structured.is_structured)[0])[path]
    assert isinstance(w.base, quant.NF4) and isinstance(w.base.absmax, quant.Int8Vector), path
  assert model.params is not params and isinstance(_leaf(model.params, next(iter(dense))),
                                                   quant.NF4)


def _leaf(params, path):
  return dict(tree_lib.flatten_with_names(params, is_leaf=quant.is_quantized)[0])[path]


@pytest.mark.parametrize("fields,match", [
    ({"base_format": "fp4"}, r"config.model.base_format='fp4'; valid: \['float', 'int8', 'nf4'\]"),
    ({"base_format": "nf4"}, r"base_format='nf4'.*nf4 needs the input size of "
                             r"layers/layer_0/attention/k_proj/kernel \(shape \(32, 16\)\) to be a "
                             r"multiple of block_size=64"),
    ({"base_format": "nf4", "quant_block_size": 5},
     r"config.model.quant_block_size=5; valid: an even int >= 2"),
    ({"base_format": "int8", "double_quant": True},
     r"config.model.double_quant applies to base_format='nf4' only"),
    ({"quant_targets": ".*kernel"}, r"config.model.quant_targets is set but "
                                    r"config.model.base_format='float' quantizes nothing"),
    ({"base_format": "nf4", "quant_block_size": BLOCK, "double_quant": 1},
     r"config.model.double_quant=1; valid: True or False"),
    ({"base_format": "int8", "quant_tile_rows": -2},
     r"config.model.quant_tile_rows=-2; valid: 0 \(whole kernels\)"),
    ({"base_format": "int8", "quant_targets": "nothing/kernel"},
     r"quant_targets='nothing/kernel'.*'nothing/kernel' matches no parameter path"),
])
def test_bad_quantization_settings_are_refused(fields, match):
  with pytest.raises(ValueError, match=match):
    train.check_config(_config(**fields))


def test_a_quantized_kernel_cannot_be_in_the_head():
  c = _config(base_format="int8", quant_targets=".*kernel")
  c.head = "lm_head/kernel"
  with pytest.raises(ValueError, match=r"config.head='lm_head/kernel' selects kernels that "
                     r"config.model.base_format='int8' quantizes: \['lm_head/kernel'\]"):
    train.check_config(c)


def test_every_run_config_takes_the_base_format_from_the_command_line():
  """`--config.model.base_format=...` works on a locked config (as `experiments.run` parses it):
  the field exists in every config built on `common.base_config`, and a float base quantizes
  nothing while int8 defaults to the adapter's targets."""
  from configs import quickstart
  c = quickstart.get_config("runlocal").lock()
  assert train.quant_settings(c) is None
  c.model.base_format = "int8"
  s = train.quant_settings(c)
  assert s["fmt"] == "int8" and list(s["targets"]) == list(c.adapter.targets)
