"""lj.interop.linen_apply on stock linen models: equal to the merged path, factored gradients."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from tests.interop import checks
from tests.interop import stock_models

VIT_AXES = {r".*/(query|key|value)/kernel": 1, r".*/out/kernel": 2, r"embedding/kernel": "conv"}
TAGGER_AXES = {r"split/kernel": 1, r"join/kernel": 2, r"heads/kernel": 1}


def _compare(model, adapter, kernel_axes, inputs, **tolerances):
  """Factored (`linen_apply`) vs merged outputs and adapter gradients; the factored gradient
  jaxpr has no product of an adapted kernel's shape, the merged one has (so the check can fail)."""
  _, base, state = checks.init_perturbed(
      adapter, lambda: model.init(jax.random.key(0), *inputs)["params"])
  kernels = checks.adapted_kernels(adapter.apply(base, state), kernel_axes)
  assert kernels

  def forward(trainable, merged):
    p = adapter.apply(base, lj.AdapterState(trainable, state.frozen))
    if merged:
      return model.apply({"params": lj.merge(p)}, *inputs)
    return lj.interop.linen_apply(model, {"params": p}, *inputs)

  checks.compare_paths(forward, state.trainable, kernels, **tolerances)


def _by_layer(path, leaf):
  """LoLDU on the first Dense, KronA on the second, LoRA on the head (one compile, 3 methods)."""
  del leaf
  return {"Dense_0/kernel": "loldu", "Dense_1/kernel": "krona", "head/kernel": "lora"}.get(path)


def test_mlp_loldu_krona_lora():
  adapter = lj.partition({"loldu": lj.loldu(3, 2.0, targets=r".*kernel"),
                          "krona": lj.krona(targets=r".*kernel"),
                          "lora": lj.lora(2, 4.0, targets=r".*kernel")}, _by_layer)
  _compare(stock_models.LinenMLP(), adapter, None,
           (jax.random.normal(jax.random.key(4), (9, 13)),))


VIT_IMAGE = jax.random.normal(jax.random.key(5), (3, 8, 8, 3))


def test_vit_lora_on_every_kernel_incl_patch_conv():
  _compare(stock_models.LinenViT(), lj.lora(2, 4.0, targets=r".*kernel", kernel_axes=VIT_AXES),
           VIT_AXES, (VIT_IMAGE,))


def test_vit_bf16():
  """dtype=bfloat16 (float32 params): the products run in bf16 as in the stock layer. The paths
  round differently (the factored one forms the factor gradients in bf16, the merged one a bf16
  dW that is contracted with the factors in float32): against the float32 model's gradients both
  are off by 1-7% per leaf here, so they are compared at 2% (outputs) and 10% (gradients)."""
  _compare(stock_models.LinenViT(dtype=jnp.bfloat16),
           lj.lora(2, 4.0, targets=r".*kernel", kernel_axes=VIT_AXES), VIT_AXES, (VIT_IMAGE,),
           rtol=2e-2, grad_rtol=0.1, dtype=jnp.bfloat16)


def test_embed_attend_dense_general_einsum():
  x = jax.random.normal(jax.random.key(6), (4, 5))
  _compare(stock_models.LinenTagger(),
           lj.lora(2, 3.0, targets=r".*(kernel|embedding)", kernel_axes=TAGGER_AXES),
           TAGGER_AXES, (x, jnp.array([3, 0, 10, 7])))


class _GroupedAndCustom(flax.linen.Module):
  @flax.linen.compact
  def __call__(self, x):
    x = flax.linen.Conv(4, (3, 3), feature_group_count=2, name="grouped")(x)
    return flax.linen.Dense(3, dot_general=jax.lax.dot_general, name="custom")(x)


def test_unroutable_layers_fall_back_to_merged_with_one_warning():
  model = _GroupedAndCustom()
  x = jax.random.normal(jax.random.key(7), (2, 5, 5, 4))
  adapter = lj.lora(2, targets=r".*kernel", kernel_axes={r"grouped/kernel": "conv"})
  _, base, state = checks.init_perturbed(
      adapter, lambda: model.init(jax.random.key(0), x)["params"])
  adapted = adapter.apply(base, state)
  with pytest.warns(RuntimeWarning) as record:
    out = jax.jit(lambda p: lj.interop.linen_apply(model, {"params": p}, x))(adapted)
  text = " ".join(str(r.message) for r in record)
  assert "params/grouped/kernel" in text and "feature_group_count 2" in text
  assert "params/custom/kernel" in text and "custom dot_general" in text
  ref = jax.jit(lambda p: model.apply({"params": lj.merge(p)}, x))(adapted)
  np.testing.assert_allclose(out, ref, rtol=1e-6)


def test_wrong_shape_is_refused_naming_the_parameter():
  model = stock_models.LinenMLP()
  x = jnp.ones((2, 13))
  params = model.init(jax.random.key(0), x)["params"]
  wrong = lj.LowRank(jnp.zeros((16, 24)), jnp.zeros((16, 2)), jnp.zeros((2, 24)))
  params["Dense_1"]["kernel"] = wrong
  with pytest.raises(flax.errors.ScopeParamShapeError, match="kernel.*Dense_1"):
    lj.interop.linen_apply(model, {"params": params}, x)
