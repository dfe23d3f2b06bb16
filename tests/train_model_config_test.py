"""`model.config` in a run: on a checkpoint or pretrained weights only the model's execution fields
(precision, remat, attention kernel), applied; anything else refused by name before any work."""
import ml_collections
import numpy as np
import pytest
import jax
import jax.numpy as jnp

from lowrank_jax import train
from lowrank_jax.models import llama


def _mcfg(**fields):
  return ml_collections.ConfigDict(fields)


def test_checkpoint_takes_execution_fields_and_refuses_the_rest(tmp_path):
  cfg = llama.LlamaConfig.preset("tiny")
  params = llama.init(jax.random.key(0), cfg)
  llama.save_hf_checkpoint(params, cfg, tmp_path)
  mcfg = _mcfg(name="llama_tiny", checkpoint=str(tmp_path),
               config={"remat": "nothing_saveable", "compute_dtype": "bfloat16"})
  loaded, spec = train.decoder_spec(mcfg, None)
  assert (spec.config.remat, spec.config.compute_dtype) == ("nothing_saveable", "bfloat16")
  assert spec.config.hidden_size == cfg.hidden_size
  ids = jax.random.randint(jax.random.key(1), (2, 6), 0, cfg.vocab_size)
  ref = llama.apply(params, ids, cfg)
  out = llama.apply(loaded, ids, spec.config)
  assert not np.array_equal(np.asarray(out), np.asarray(ref))     # bf16 products: they differ
  np.testing.assert_allclose(out, ref, atol=0.05 * float(jnp.abs(ref).max()))

  mcfg.config.hidden_size = 32
  with pytest.raises(ValueError, match=r"model.config \['hidden_size'\] would change the model "
                     r"loaded by model.checkpoint=.*sets only \['compute_dtype', 'remat'"):
    train.decoder_spec(mcfg, None)


def test_pretrained_classifier_refuses_shape_fields_in_check_config():
  from configs import quickstart  # pylint: disable=g-import-not-at-top
  c = quickstart.get_config()
  c.model.config = {"num_layers": 2}
  with pytest.raises(ValueError, match=r"model.config \['num_layers'\] would change the model "
                     r"loaded by model.pretrained=True; on loaded weights model.config sets only "
                     r"\['compute_dtype', 'materialize_cotangents'\]"):
    train.check_config(c)
  c.model.config = {"num_layerz": 2}
  with pytest.raises(ValueError, match=r"model.config.num_layerz is not a field of model 'minilm'"):
    train.check_config(c)


def test_classifier_applies_model_config():
  """A classifier's `model.config` used to be ignored; now it reaches the model."""
  key = jax.random.key(0)
  plain = train.make_model(_mcfg(name="minilm_tiny"), 3, key)
  half = train.make_model(_mcfg(name="minilm_tiny", config={"compute_dtype": "bfloat16"}), 3, key)
  assert half.spec.config.compute_dtype == "bfloat16"
  wide = train.make_model(_mcfg(name="minilm_tiny", config={"intermediate_size": 96}), 3, key)
  assert wide.params["encoder"]["layer_0"]["mlp"]["intermediate"]["kernel"].shape[1] == 96
  batch = {"input_ids": jnp.array([[101, 2000, 2001, 102]]), "attention_mask": jnp.ones((1, 4))}
  a = plain.apply(plain.params, batch, train=False, rng=None)
  b = half.apply(half.params, batch, train=False, rng=None)
  assert not np.array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_allclose(b, a, atol=0.05 * float(jnp.abs(a).max()) + 1e-3)


def test_sft_config_exposes_the_execution_fields():
  """The instruction-tuning config loads a checkpoint and still lets a run pick remat etc."""
  from configs import gloss_sft  # pylint: disable=g-import-not-at-top
  c = gloss_sft.get_config("runlocal")
  assert set(c.model.config) <= set(llama.EXECUTION_FIELDS)
  c.model.config.remat = "nothing_saveable"
  c.model.config.compute_dtype = "bfloat16"
  train.check_config(c)
  c.model.config.remat = "fast"
  with pytest.raises(ValueError, match=r"LlamaConfig.remat.*'fast'"):
    train.check_config(c)
  c.model.config.remat = "nothing_saveable"
  c.model.config.num_layers = 1
  with pytest.raises(ValueError, match=r"\['num_layers'\] would change the model loaded by "
                     r"model.checkpoint='/tmp/gloss_lm/hf'"):
    train.check_config(c)
