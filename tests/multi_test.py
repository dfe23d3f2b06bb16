"""Per-example adapters (`lowrank_jax.multi`): a mixed batch with K = 4 LoRA adapters against each
example run with its own adapter alone, forward and per-adapter gradients (float32 against
single-adapter runs to 1e-6, float64 against the adapter merged into a dense weight to 1e-12), on
a small model with a wide, a tall, a 3-D kernel and an embedding, and on the tiny Llama decoder;
generation with a different adapter per prompt against separate greedy generations; bad inputs."""
import contextlib
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from experiments import bench_multi
from lowrank_jax import generate as gen
from lowrank_jax import multi
from lowrank_jax import ops
from lowrank_jax.models import llama

pytestmark = pytest.mark.usefixtures("fast_compile")

K = 4
CFG = llama.LlamaConfig.preset("tiny")
TOL = dict(rtol=1e-6, atol=1e-6)
# float32 gradients: both sides sum rounded products in different orders (measured up to 1.8e-6 of
# the gradient's scale); the float64 case shows the two agree to 1e-12.
GRAD_TOL = 3e-6


def assert_scaled_close(got, want, tol: float):
  """max |got - want| <= tol · max(1, max |want|): float32 gradients sum many rounded terms, so
  their error is relative to the gradient's scale, not to each (possibly cancelling) entry."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  err, scale = np.max(np.abs(got - want)), max(1.0, np.max(np.abs(want)))
  assert err <= tol * scale, f"max abs error {err:.3g} > {tol} x scale {scale:.3g}"


def _random_like(tree, seed: int, scale: float = 1.0):
  """Arrays of `tree`'s shapes and dtypes drawn in numpy (no compilation): normal, std `scale`
  over √(leading dim) for kernels and embeddings, `scale` otherwise; ones for norm scales."""
  rng = np.random.default_rng(seed)

  def draw(path, x):
    name = jax.tree_util.keystr(path[-1:])
    if "scale" in name:
      return jnp.ones(x.shape, x.dtype)
    std = scale / np.sqrt(x.shape[0]) if "kernel" in name and len(x.shape) > 1 else scale
    return jnp.asarray(std * rng.normal(size=x.shape), x.dtype)

  return jax.tree_util.tree_map_with_path(draw, tree)


def _states(adapter, params, k=K, scale=0.3):
  """The base and K states of `adapter` with distinct non-zero factors."""
  base, spec = jax.eval_shape(lambda p: adapter.init(jax.random.key(0), p), params)
  del base    # additive LoRA: the base is the params
  return params, [_random_like(spec, seed=10 + i, scale=scale) for i in range(k)]


def _llama_params(seed: int = 0):
  """Random tiny-Llama params with kernels of std 1/√d_in (sharp enough for the adapters to
  change what is generated)."""
  return _random_like(jax.eval_shape(lambda key: llama.init(key, CFG), jax.random.key(0)), seed)


# ---------------------------------------------------------------------------------------------
# A small model: embedding (30, 6), wide kernel (6, 10), tall 3-D kernel (2, 5, 3) with 2 inputs.
# ---------------------------------------------------------------------------------------------

def _small_params():
  rng = np.random.default_rng(1)
  return {"emb": {"embedding": jnp.asarray(rng.normal(size=(30, 6)), jnp.float32)},
          "up": {"kernel": jnp.asarray(rng.normal(size=(6, 10)) / 3, jnp.float32)},
          "down": {"kernel": jnp.asarray(rng.normal(size=(2, 5, 3)) / 3, jnp.float32)}}


def _small_model(params, ids):
  x = ops.embed(ids, params["emb"]["embedding"])                    # (B, T, 6)
  h = jnp.tanh(ops.dense(x, params["up"]["kernel"]))                 # (B, T, 10)
  return ops.dense(h.reshape(h.shape[:-1] + (2, 5)), params["down"]["kernel"], in_ndim=2)


SMALL_ADAPTER = lj.lora(rank=2, alpha=3.0, use_rslora=True, targets=r".*(kernel|embedding)",
                        kernel_axes={"down/kernel": 2})
IDS = np.random.default_rng(2).integers(0, 30, (5, 4))
COTANGENT = np.random.default_rng(3).normal(size=(5, 4, 3)).astype(np.float32)


def _reference(base, states, index, to_params, cotangent):
  """Output and per-adapter gradients with each example (or token) run with its own adapter
  alone: for each k, the model with adapter k only (`to_params`) on the whole batch, kept where
  the index is k; index -1 runs the base model."""
  select = lambda k: ((index == k)[..., None] if index.ndim == 2 else
                      (index == k)[:, None, None])
  out = _small_model(base, IDS) * select(-1)
  grads = []
  for k in range(K):
    def loss_k(trainable, k=k):
      o = _small_model(to_params(trainable), IDS)
      return jnp.sum(o * cotangent * select(k)), o
    (_, o), g = jax.value_and_grad(loss_k, has_aux=True)(states[k].trainable)
    out, grads = out + o * select(k), grads + [g]
  return out, grads


# float32 against separate single-adapter (factored) runs, to 1e-6; float64 against the adapter
# merged into a dense weight, to 1e-12.
@pytest.mark.parametrize("impl,per_token,dtype", [("onehot", False, "float32"),
                                                  ("gather", True, "float32"),
                                                  ("onehot", True, "float64"),
                                                  ("gather", False, "float64")])
def test_mixed_batch_equals_each_example_run_with_its_adapter(impl, per_token, dtype):
  with jax.enable_x64(dtype == "float64"):
    cast = lambda tree: jax.tree.map(lambda x: x.astype(dtype), tree)
    base, states = _states(SMALL_ADAPTER, cast(_small_params()))
    states = [cast(s) for s in states]
    cotangent = COTANGENT.astype(dtype)
    index = np.array([2, 0, 3, 1, -1])
    if per_token:    # one adapter per token: rows cycle through the adapters and the base
      index = (index[:, None] + np.arange(4)[None]) % (K + 1) - 1

    def loss(trainable):
      p = multi.apply(SMALL_ADAPTER, base, lj.AdapterState(trainable, {}), index, impl=impl)
      out = _small_model(p, IDS)
      return jnp.sum(out * cotangent), out

    stacked = multi.stack(states)
    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(stacked.trainable)
    if dtype == "float32":
      to_params, tol, grad_tol = (lambda t: SMALL_ADAPTER.apply(base, lj.AdapterState(t, {})),
                                  TOL, GRAD_TOL)
    else:
      to_params, tol, grad_tol = (
          lambda t: lj.merge(SMALL_ADAPTER.apply(base, lj.AdapterState(t, {}))),
          dict(rtol=1e-12, atol=1e-12), 1e-12)
    want_out, want_grads = _reference(base, states, index, to_params, cotangent)
    assert out.dtype == dtype
    np.testing.assert_allclose(out, want_out, **tol)
    # Slice k of the stack's gradient is adapter k's gradient on its own examples.
    for k in range(K):
      jax.tree.map(lambda g, w: assert_scaled_close(g, w, grad_tol),
                   multi.take(lj.AdapterState(grads, {}), k).trainable, want_grads[k])

    # Factored: no array of the wide kernel's shape (a ΔW or its gradient) in the step.
    jaxpr = jax.make_jaxpr(jax.grad(lambda t: loss(t)[0]))(stacked.trainable)
    shapes = {tuple(v.aval.shape) for e in jaxpr.jaxpr.eqns for v in e.outvars}
    assert (6, 10) not in shapes and (10, 6) not in shapes


@pytest.mark.parametrize("method", ["sorsa", "chain"])
def test_vector_diagonal_and_chained_adapters_run_per_example(method):
  """SORSA's weight has a trainable diagonal (d of shape (K, r)); `chain(lora, lora)` nests two
  per-example weights on one kernel."""
  params = _small_params()
  targets = r"(up|down)/kernel"
  if method == "sorsa":
    adapter = lj.sorsa(rank=2, targets=targets, kernel_axes={"down/kernel": 2})
  else:
    adapter = lj.chain(*[lj.lora(rank=r, targets=targets, kernel_axes={"down/kernel": 2})
                         for r in (1, 2)])
  base_spec, state_spec = jax.eval_shape(lambda p: adapter.init(jax.random.key(0), p), params)
  base = _random_like(base_spec, seed=0) if method == "sorsa" else params
  states = [_random_like(state_spec, seed=10 + i) for i in range(K)]
  index = np.array([3, 1, 0, 2, -1])
  out = jax.jit(lambda stacked: _small_model(multi.apply(adapter, base, stacked, index), IDS))(
      multi.stack(states))
  for k in range(-1, K):
    p = base if k < 0 else adapter.apply(base, states[k])
    np.testing.assert_allclose(out[index == k], _small_model(p, IDS)[index == k], **TOL)


# ---------------------------------------------------------------------------------------------
# The tiny Llama decoder: forward, per-adapter gradients, generation.
# ---------------------------------------------------------------------------------------------

LLAMA_ADAPTER = lj.lora(
    rank=4, alpha=8.0,
    targets=r"embed/embedding|lm_head/kernel|.*/(q_proj|v_proj|gate_proj)/kernel")
LLAMA_INDEX = np.array([1, 3, 0, 2, 1])


def test_llama_mixed_batch_forward_and_gradients_equal_separate_runs():
  base, states = _states(LLAMA_ADAPTER, _llama_params(), scale=0.1)
  ids = np.random.default_rng(4).integers(0, CFG.vocab_size, (5, 6))
  cot = np.random.default_rng(5).normal(size=(5, 6, CFG.vocab_size)).astype(np.float32)

  def mixed(trainable):
    p = multi.apply(LLAMA_ADAPTER, base, lj.AdapterState(trainable, {}))
    out = llama.apply(p, ids, CFG, adapter_index=LLAMA_INDEX)
    return jnp.sum(out * cot), out

  def single(trainable, weight):
    out = llama.apply(LLAMA_ADAPTER.apply(base, lj.AdapterState(trainable, {})), ids, CFG)
    return jnp.sum(out * cot * weight[:, None, None]), out

  (_, out), grads = jax.jit(jax.value_and_grad(mixed, has_aux=True))(
      multi.stack(states).trainable)
  single_step = jax.jit(jax.value_and_grad(single, has_aux=True))
  for k in range(K):
    (_, out_k), grads_k = single_step(states[k].trainable, jnp.asarray(LLAMA_INDEX == k, float))
    rows = LLAMA_INDEX == k
    np.testing.assert_allclose(out[rows], out_k[rows], **TOL)
    jax.tree.map(lambda g, w: assert_scaled_close(g, w, GRAD_TOL),
                 multi.take(lj.AdapterState(grads, {}), k).trainable, grads_k)


def test_generate_with_an_adapter_per_prompt_equals_separate_greedy_generations():
  base, states = _states(LLAMA_ADAPTER, _llama_params(), scale=0.1)
  prompts = np.array([[11, 42, 7, 99, 3], [0, 0, 250, 18, 64], [5, 6, 120, 33, 0],
                      [9, 8, 7, 6, 5], [1, 2, 3, 4, 0]])
  mask = (np.arange(5)[None] >= np.array([0, 2, 0, 0, 0])[:, None]) & (
      np.arange(5)[None] < np.array([5, 5, 4, 5, 4])[:, None])
  n = 6
  mixed, lengths = gen.generate(multi.apply(LLAMA_ADAPTER, base, multi.stack(states)), CFG,
                                prompts, n, prompt_mask=mask, adapter_index=LLAMA_INDEX)
  separate = np.stack([gen.generate(LLAMA_ADAPTER.apply(base, s), CFG, prompts, n,
                                    prompt_mask=mask)[0] for s in states])   # (K, B, n)
  np.testing.assert_array_equal(mixed, separate[LLAMA_INDEX, np.arange(len(prompts))])
  np.testing.assert_array_equal(lengths, [n] * len(prompts))
  # The adapters disagree, so a wrong index would show.
  assert all(len({tuple(separate[k, b]) for k in range(K)}) > 1 for b in range(len(prompts)))


# ---------------------------------------------------------------------------------------------
# Bad inputs: one clear error each.
# ---------------------------------------------------------------------------------------------

def test_bad_inputs_raise_one_clear_error():
  params = _small_params()
  base, states = _states(SMALL_ADAPTER, params, k=2)
  p = multi.apply(SMALL_ADAPTER, base, multi.stack(states))
  with pytest.raises(ValueError, match=r"values \[-2, 2\] are out of range"):
    multi.with_index(p, np.array([0, 2, -2]))
  with pytest.raises(ValueError, match="integer array"):
    multi.with_index(p, np.array([0.0, 1.0]))
  with pytest.raises(ValueError, match="no per-example index"):
    _small_model(p, IDS)
  with pytest.raises(ValueError, match=r"index of shape \(3,\) must match .* \(5, 4\)"):
    _small_model(multi.with_index(p, np.array([0, 1, 1])), IDS)
  # Under jit the values are unknown: an out-of-range example gets NaN, never another's adapter.
  traced = jax.jit(lambda index: _small_model(multi.with_index(p, index), IDS))(
      jnp.array([0, 1, 2, -2, -1]))
  assert np.isfinite(traced[np.array([0, 1, 4])]).all() and np.isnan(traced[2:4]).all()
  with pytest.raises(TypeError, match="no single dense value"):
    lj.merge(p)
  with pytest.raises(ValueError, match="no per-example adapters"):
    multi.with_index(params, np.array([0]))

  # Stacks: another rank, other targets, another adapter's stack.
  _, rank3 = _states(lj.lora(rank=3, targets=r".*kernel", kernel_axes={"down/kernel": 2}),
                     params, k=1)
  _, rank2 = _states(lj.lora(rank=2, targets=r".*kernel", kernel_axes={"down/kernel": 2}),
                     params, k=1)
  with pytest.raises(ValueError, match=r"state 1 differs from state 0 at .*'down'.*a.*shape "
                                       r"\(2, 5, 3\).*vs shape \(2, 5, 2\)"):
    multi.stack(rank2 + rank3)
  with pytest.raises(ValueError, match=r"state 1 does not have the structure.*only in state 0: "
                                       r"\[.*'emb'"):
    multi.stack(states[:1] + rank2)
  with pytest.raises(ValueError, match="does not cover this adapter's targets"):
    multi.apply(SMALL_ADAPTER, base, multi.stack(rank2 + rank2))

  # A method without a factored per-example product.
  krona = lj.krona(2, 2, targets=r"up/kernel")
  kbase, kstates = _states(krona, params, k=2)
  with pytest.raises(TypeError, match=r"'up'.*Kron leaf, which has no factored per-example"):
    multi.apply(krona, kbase, multi.stack(kstates))

  # Generation: one adapter per prompt.
  lbase, lstates = _states(LLAMA_ADAPTER, _llama_params(), k=2)
  lp = multi.apply(LLAMA_ADAPTER, lbase, multi.stack(lstates))
  with pytest.raises(ValueError, match=r"one entry per prompt, shape \(2,\), got \(3,\)"):
    gen.generate(lp, CFG, np.ones((2, 3), np.int32), 2, adapter_index=[0, 1, 0])
  with pytest.raises(ValueError, match=r"values \[5\] are out of range; valid: 0..1"):
    gen.generate(lp, CFG, np.ones((2, 3), np.int32), 2, adapter_index=[0, 5])


def test_benchmark_smoke_run_prints_a_row_per_mode():
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    bench_multi.main(["--preset", "tiny", "--batch", "4", "--seq", "4", "--rank", "2",
                      "--rounds", "1", "--steps", "1", "--kinds", "forward"])
  rows = [json.loads(line) for line in out.getvalue().splitlines()]
  assert rows[0]["k"] == 4
  assert [r["mode"] for r in rows[1:]] == ["single_forward", "mixed_onehot_forward",
                                           "mixed_gather_forward"]
  assert rows[1]["ratio_to_single"] == 1.0 and all(r["ms"] > 0 for r in rows[1:])
