"""Adapter arithmetic against float64 numpy: the combined LoRA merges to W + Σ w_i·s_i·A_i·B_i
(mixed-sign weights, rsLoRA, ranks 2, 3, 1; wide, tall and 3-D kernels), re-compression equals the
truncated SVD of that sum and reports √(Σ discarded σ²); the combined adapter's PEFT export has
rank Σ r_i and loads back to the same weights; mismatched inputs are refused."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax import adapter_io
from lowrank_jax import arithmetic
from lowrank_jax.models import llama

pytestmark = pytest.mark.usefixtures("fast_compile")

TARGETS = r".*kernel"
AXES = {"deep/kernel": 2}
# (rank, alpha, use_rslora) of the three adapters, and their weights.
CONFIGS = [(2, 4.0, False), (3, 2.0, True), (1, 1.5, True)]
WEIGHTS = [0.7, -1.3, 0.4]


def _params(dtype):
  rng = np.random.default_rng(0)
  shapes = {"wide": (6, 10), "tall": (12, 7), "deep": (3, 4, 7)}
  return {name: {"kernel": jnp.asarray(rng.normal(size=shape), dtype)}
          for name, shape in shapes.items()}


def _states(params, configs=CONFIGS, dtype="float32", seed=1, targets=TARGETS):
  """A LoRA state per config with random (non-zero) factors on every targeted kernel."""
  rng = np.random.default_rng(seed)
  states = []
  for rank, _, _ in configs:
    factors = {}
    for path, w in lj.tree.unnest(params).items():
      if re.fullmatch(targets, path):
        in_ndim = AXES.get(path, 1)
        factors[path] = lj.LoRAFactors(
            jnp.asarray(rng.normal(size=w.shape[:in_ndim] + (rank,)), dtype),
            jnp.asarray(rng.normal(size=(rank,) + w.shape[in_ndim:]), dtype))
    states.append(lj.AdapterState(lj.tree.nest(factors), {}))
  return states


def _adapters_and_states(params, configs=CONFIGS, targets=TARGETS, dtype="float32"):
  adapters = [lj.lora(rank=r, alpha=a, use_rslora=rs, targets=targets, kernel_axes=AXES,
                      dtype=dtype) for r, a, rs in configs]
  return adapters, _states(params, configs, dtype)


def _np_delta(state, path, rank, alpha, rslora):
  """s·A·B in float64, matricized (d_in, d_out), with s = alpha/r or alpha/√r (rsLoRA)."""
  f = lj.tree.unnest(state.trainable)[path]
  a = np.asarray(f.a, np.float64).reshape(-1, rank)
  b = np.asarray(f.b, np.float64).reshape(rank, -1)
  return (alpha / (np.sqrt(rank) if rslora else rank)) * a @ b


def _np_sum(states, path):
  return sum(w * _np_delta(s, path, *cfg) for w, s, cfg in zip(WEIGHTS, states, CONFIGS))


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-6), ("float64", 1e-12)])
def test_combined_merges_to_the_weighted_sum_and_compresses_to_its_truncated_svd(dtype, tol):
  with jax.enable_x64(dtype == "float64"):
    params = _params(dtype)
    adapters, states = _adapters_and_states(params, dtype=dtype)
    adapter, state = arithmetic.combine(adapters, states, WEIGHTS)
    assert adapter.hparams["rank"] == 6 and adapter.hparams["alpha"] == 6.0
    merged = lj.merge(adapter.apply(params, state))
    for path, w in lj.tree.unnest(params).items():
      want = np.asarray(w, np.float64) + _np_sum(states, path).reshape(w.shape)
      np.testing.assert_allclose(merged[path.split("/")[0]]["kernel"], want, rtol=0, atol=tol)

    k = 2
    small_adapter, small, errors = arithmetic.compress(adapter, state, k)
    assert small_adapter.hparams["rank"] == k and lj.count_params(small) == k * (16 + 19 + 19)
    small_merged = lj.merge(small_adapter.apply(params, small))
    for path, w in lj.tree.unnest(params).items():
      delta = _np_sum(states, path)
      u, s, vt = np.linalg.svd(delta, full_matrices=False)
      want = w + ((u[:, :k] * s[:k]) @ vt[:k]).reshape(w.shape)
      # QR and SVD in the factors' precision: errors relative to the update's largest entry.
      np.testing.assert_allclose(small_merged[path.split("/")[0]]["kernel"], want, rtol=0,
                                 atol=10 * tol * np.abs(delta).max())
      discarded = np.sqrt(np.sum(s[k:] ** 2))
      np.testing.assert_allclose(errors[path].frobenius, discarded, rtol=10 * tol)
      np.testing.assert_allclose(errors[path].relative, discarded / np.linalg.norm(s),
                                 rtol=10 * tol)


def test_combined_adapter_exports_to_peft_with_the_summed_rank(tmp_path):
  cfg = llama.LlamaConfig.preset("tiny")
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: jnp.asarray(0.1 * rng.normal(size=x.shape), x.dtype),
                        jax.eval_shape(lambda key: llama.init(key, cfg), jax.random.key(0)))
  targets = r".*/(q_proj|v_proj)/kernel"
  adapters = [lj.lora(rank=r, alpha=a, use_rslora=rs, targets=targets) for r, a, rs in CONFIGS]
  states = _states(params, targets=targets)
  adapter, state = arithmetic.combine(adapters, states, WEIGHTS)
  adapter_io.export_peft(str(tmp_path), adapter, state, model="llama", cfg=cfg)
  loaded, loaded_state, info = adapter_io.import_peft(str(tmp_path), model="llama", cfg=cfg)
  assert info["r"] == 6 and info["lora_alpha"] == 6.0 and not info["use_rslora"]
  path = "layers/layer_1/attention/v_proj/kernel"
  got = lj.tree.unnest(lj.merge(loaded.apply(params, loaded_state)))[path]
  want = np.asarray(lj.tree.unnest(params)[path], np.float64) + sum(
      w * _np_delta(s, path, *c) for w, s, c in zip(WEIGHTS, states, CONFIGS))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_mismatched_inputs_are_refused():
  params = _params("float32")
  adapters, states = _adapters_and_states(params)
  with pytest.raises(ValueError, match="as many adapters, states and weights"):
    arithmetic.combine(adapters, states, WEIGHTS[:2])
  with pytest.raises(ValueError, match="weights must be finite"):
    arithmetic.combine(adapters, states, [1.0, float("nan"), 1.0])
  pissa = lj.pissa(rank=2, targets=TARGETS, kernel_axes=AXES)
  with pytest.raises(ValueError, match=r"adapter 1: adapter 'pissa' replaces the base weights"):
    arithmetic.combine([adapters[0], pissa], states[:2], [1.0, 1.0])
  krona = lj.krona(2, 2, targets=r"wide/kernel")
  with pytest.raises(ValueError, match=r"adapter 'krona' is not a LoRA"):
    arithmetic.combine([krona], states[:1], [1.0])
  other, _ = _adapters_and_states(params, CONFIGS[:1], r"(wide|tall|deep)/kernel")
  with pytest.raises(ValueError, match="different targets"):
    arithmetic.combine(adapters[:1] + other, states[:1] * 2, [1.0, 1.0])
  # The same adapter on params of other shapes: another base.
  wider = dict(params, wide={"kernel": jnp.zeros((6, 11))})
  wider_states = _states(wider, CONFIGS[:1])
  with pytest.raises(ValueError, match=r"state 1 at wide/kernel adapts a kernel of \(in, out\) "
                                       r"shape \(\(6,\), \(11,\)\), state 0 one of "
                                       r"\(\(6,\), \(10,\)\)"):
    arithmetic.combine(adapters[:1] * 2, states[:1] + wider_states, [1.0, 1.0])
  with pytest.raises(ValueError, match="not rank-2 LoRAFactors"):
    arithmetic.combine(adapters[:1], states[1:2], [1.0])
  with pytest.raises(ValueError, match=r"rank must be an int in 1..2"):
    arithmetic.compress(adapters[0], states[0], 3)
