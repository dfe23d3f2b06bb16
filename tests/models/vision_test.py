"""ViT, MLP, CNN and the model registry: shapes, conv kernels, structured weights, names."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax import models, structured
from lowrank_jax.models import cnn, mlp, vit
from lowrank_jax import tree as tree_lib


@pytest.mark.parametrize("name,shape", [("vit_test", (2, 28, 28, 1)), ("cnn_mnist", (2, 28, 28, 1)),
                                        ("mlp_digits", (2, 8, 8, 1))])
def test_forward_and_grad(name, shape):
  spec = models.get_model(name)
  params = jax.jit(spec.init)(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), shape)

  def loss(p):
    out = spec.apply(p, x)
    return jnp.mean(out ** 2), out

  (value, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  assert np.isfinite(value) and out.shape == (2, 10)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_vit_tiny_shapes_without_allocating():
  cfg = vit.ViTConfig.preset("vit_tiny")
  shapes = jax.eval_shape(lambda: vit.init(jax.random.key(0), cfg))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert 5.6e6 < n < 5.8e6
  assert shapes["patch_embed"]["kernel"].shape == (16, 16, 3, 192)
  out = jax.eval_shape(lambda p: vit.apply(p, jnp.zeros((1, 224, 224, 3)), cfg), shapes)
  assert out.shape == (1, 1000)


def test_conv_kernels_are_4d_and_accept_structured_weights():
  cfg = cnn.CNNConfig()
  params = cnn.init(jax.random.key(0), cfg)
  assert params["conv_0"]["kernel"].shape == (3, 3, 1, 16)
  assert params["conv_1"]["kernel"].shape == (3, 3, 16, 32)
  w = params["conv_1"]["kernel"]
  # Matricized (kh*kw*c_in, c_out) low-rank update on a conv kernel: 3 input axes.
  lr = structured.LowRank(w, 0.1 * jnp.ones((3, 3, 16, 2)), 0.1 * jnp.ones((2, 32)), 1.0)
  adapted = {**params, "conv_1": {**params["conv_1"], "kernel": lr}}
  x = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
  apply = jax.jit(cnn.apply, static_argnums=2)
  np.testing.assert_allclose(apply(adapted, x, cfg), apply(structured.merge(adapted), x, cfg),
                             atol=1e-4)


def test_param_paths_are_readable():
  names = [n for n, _ in tree_lib.flatten_with_names(vit.init(jax.random.key(0),
                                                              vit.PRESETS["test"]))[0]]
  assert "encoder/layer_0/attention/query/kernel" in names
  assert "encoder/layer_1/mlp/fc2/bias" in names and "patch_embed/kernel" in names
  for spec_name in ("vit_test", "cnn_mnist", "mlp_digits", "minilm_tiny", "llama_tiny"):
    spec = models.get_model(spec_name)
    shapes = jax.eval_shape(lambda s=spec: s.init(jax.random.key(0)))
    modules = {n.rsplit("/", 1)[0] for n, x in tree_lib.flatten_with_names(shapes)[0]
               if n.endswith("/kernel")}
    hf = spec.hf_name_map()
    assert modules <= set(hf), (spec_name, modules - set(hf))
  assert vit.hf_name_map(vit.PRESETS["test"])["encoder/layer_0/attention/query"] == (
      "vit.encoder.layer.0.attention.attention.query")
  assert cnn.hf_name_map(cnn.CNNConfig())["conv_0"] == "convs.0"
  assert mlp.hf_name_map(mlp.MLPConfig())["dense_1"] == "layers.2"


def test_registry_and_bad_inputs():
  assert "minilm" in models.list_models() and "tinyllama_1_1b" in models.list_models()
  with pytest.raises(ValueError, match="valid names.*cnn_mnist"):
    models.get_model("resnet50")
  with pytest.raises(ValueError, match="activation"):
    mlp.MLPConfig(activation="swish2")
  with pytest.raises(ValueError, match="patch_size"):
    vit.ViTConfig(image_size=30, patch_size=7)
  cfg = vit.PRESETS["test"]
  with pytest.raises(ValueError, match="images must be"):
    vit.apply(vit.init(jax.random.key(0), cfg), jnp.zeros((1, 32, 32, 1)), cfg)
