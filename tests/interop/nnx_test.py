"""lj.interop.nnx_merge / nnx_route on stock nnx models: equal to the merged path, factored."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lowrank_jax as lj
from tests.interop import checks
from tests.interop import stock_models

BLOCK_AXES = {r"attn/(query|key|value)/kernel": 1, r"attn/out/kernel": 2}
TAGGER_AXES = {r"split/kernel": 1, r"join/kernel": 2, r"heads/kernel": 1, r"conv/kernel": "conv"}


def _compare(model, adapter, kernel_axes, inputs):
  """Factored (`nnx_merge` of the split model with structured Param values) vs `nnx.merge` of
  the merged values: outputs, adapter gradients, gradient jaxpr (see `checks.compare_paths`)."""
  graphdef, params_state = nnx.split(model, nnx.Param)
  pure = nnx.to_pure_dict(params_state)
  _, base, state = checks.init_perturbed(adapter, lambda: pure)
  kernels = checks.adapted_kernels(adapter.apply(base, state), kernel_axes)
  assert kernels

  def forward(trainable, merged):
    p = adapter.apply(base, lj.AdapterState(trainable, state.frozen))
    st = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(st, lj.merge(p) if merged else p)
    module = nnx.merge(graphdef, st) if merged else lj.interop.nnx_merge(graphdef, st)
    out = module(*inputs)
    return out if isinstance(out, jax.Array) else jnp.concatenate(
        [o.reshape(-1) for o in out])

  checks.compare_paths(forward, state.trainable, kernels)


X = jax.random.normal(jax.random.key(4), (2, 5, 12))


def _by_layer(path, leaf):
  """LoLDU on the MLP and on the query projection, LoRA on the other attention projections."""
  del leaf
  if path.endswith("kernel"):
    return "loldu" if path.startswith("fc") or path == "attn/query/kernel" else "lora"
  return None


def test_transformer_block_lora_and_loldu():
  adapter = lj.partition({"lora": lj.lora(2, 4.0, targets=r".*kernel", kernel_axes=BLOCK_AXES),
                          "loldu": lj.loldu(3, 2.0, targets=r".*kernel",
                                            kernel_axes=BLOCK_AXES)}, _by_layer)
  _compare(stock_models.NnxBlock(12, 2, 20, rngs=nnx.Rngs(0)), adapter, BLOCK_AXES, (X,))


def test_embed_attend_linear_general_einsum_conv():
  _compare(stock_models.NnxTagger(rngs=nnx.Rngs(0)),
           lj.lora(2, 3.0, targets=r".*(kernel|embedding)", kernel_axes=TAGGER_AXES),
           TAGGER_AXES, (jax.random.normal(jax.random.key(6), (4, 5)), jnp.array([3, 0, 10, 7])))


def _adapted_state(model, adapter):
  graphdef, st = nnx.split(model, nnx.Param)
  pure = nnx.to_pure_dict(st)
  _, base, state = checks.init_perturbed(adapter, lambda: pure)
  adapted = adapter.apply(base, state)
  return graphdef, st, adapted


def test_split_merge_of_a_routed_model_and_fallback():
  """A routed module splits and merges like any nnx module; a layer with a custom dot_general
  gets the merged weight, with one warning naming its path."""
  model = stock_models.NnxBlock(12, 2, 20, rngs=nnx.Rngs(0))
  model.fc2 = nnx.Linear(20, 12, dot_general=lambda *a, **k: jax.lax.dot_general(*a, **k),
                         rngs=nnx.Rngs(1))
  graphdef, st, adapted = _adapted_state(model, lj.lora(2, targets=r"fc\d/kernel"))
  nnx.replace_by_pure_dict(st, adapted)
  with pytest.warns(RuntimeWarning, match="fc2/kernel: a custom dot_general"):
    routed = lj.interop.nnx_merge(graphdef, st)
  assert type(routed.fc1).__name__ == "FactoredLinear" and type(routed.fc2) is nnx.Linear
  again = nnx.merge(*nnx.split(routed))
  assert type(again.fc1).__name__ == "FactoredLinear"
  ref_state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(ref_state, lj.merge(adapted))
  ref = nnx.merge(graphdef, ref_state)(X)
  np.testing.assert_allclose(routed(X), ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(again(X), ref, rtol=1e-5, atol=1e-5)


def test_wrong_shape_is_refused_naming_the_path():
  model = stock_models.NnxBlock(12, 2, 20, rngs=nnx.Rngs(0))
  graphdef, st, adapted = _adapted_state(model, lj.lora(2, targets=r"fc1/kernel"))
  adapted["fc1"]["kernel"] = lj.LowRank(jnp.zeros((20, 12)), jnp.zeros((20, 2)),
                                        jnp.zeros((2, 12)))
  nnx.replace_by_pure_dict(st, adapted)
  with pytest.raises(ValueError, match=r"fc1/kernel.*\(20, 12\).*\(12, 20\)"):
    lj.interop.nnx_merge(graphdef, st)
