"""`models.ModelSpec`: the classifier interface every classifier model offers the trainer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax import models


def test_classifiers_are_the_models_that_classify():
  names = models.list_models(classifiers_only=True)
  assert set(names) == {n for n in models.list_models() if not n.startswith(("llama", "tinyllama"))}
  assert {models.get_model(n).modality for n in names} == {"image", "text"}
  assert not models.get_model("llama_tiny").is_classifier


@pytest.mark.parametrize("name", ["mlp_digits", "cnn_digits", "vit_test"])
def test_image_classify_is_apply_of_the_image(name):
  spec = models.get_model(name)
  params = spec.init(jax.random.key(0))
  batch = {k: jnp.ones(s.shape, s.dtype) for k, s in spec.module.dummy_batch(spec.config).items()}
  np.testing.assert_array_equal(spec.classify(params, batch), spec.apply(params, batch["image"]))
  assert spec.with_classifier(jax.random.key(1), params, 10) is params   # built-in head, 10 ways
  with pytest.raises(ValueError, match=f"model '{name}' has 10 outputs, the dataset has 7"):
    spec.with_classifier(jax.random.key(1), params, 7)


def test_text_model_gets_a_fresh_head():
  spec = models.get_model("minilm_tiny")
  params = spec.with_classifier(jax.random.key(1), spec.init(jax.random.key(0)), 5)
  batch = {k: jnp.ones(s.shape, s.dtype) for k, s in spec.module.dummy_batch(spec.config).items()}
  assert params["head"]["kernel"].shape == (spec.config.hidden_size, 5)
  assert spec.classify(params, batch).shape == (1, 5)
  assert spec.modality == "text" and spec.family == "minilm"


def test_with_config_and_pretrained_errors():
  spec = models.get_model("mlp_digits").with_config(dropout_rate=0.25)
  assert spec.config.dropout_rate == 0.25
  assert models.get_model("mlp_digits").config.dropout_rate == 0.0
  with pytest.raises(ValueError, match=r"model 'minilm_tiny' has no pretrained weights; models "
                                       r"with pretrained weights: \['minilm'\]"):
    models.get_model("minilm_tiny").load_pretrained()
  assert models.get_model("mlp_digits").tokenizer(16) is None
  assert models.get_model("mlp_digits").hf_hub_name is None
