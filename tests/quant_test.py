"""Quantized bases against float64 numpy references written from the formats' definitions: the NF4
levels (normal quantiles), block-wise NF4 and per-channel int8 round trips within their bounds,
nibble packing, products and gradients, adapters nested on a quantized base, merge, frozenness."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import special

import lowrank_jax as lj
from lowrank_jax import quant
from lowrank_jax import steps
from lowrank_jax.adapters.krona import krona

# The 16 NF4 values as published with QLoRA (bitsandbytes' NF4 table); bitsandbytes took the
# quantiles of a float32 linspace, so they differ from the float64 definition by up to 2e-7.
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                 -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                 0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]


def ref_levels() -> np.ndarray:
  """NF4 from its definition, with scipy's normal quantile (the library uses the stdlib's)."""
  offset = 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))
  pos = special.ndtri(np.linspace(offset, 0.5, 9)[:-1])
  neg = -special.ndtri(np.linspace(offset, 0.5, 8)[:-1])
  v = np.sort(np.concatenate([pos, [0.0], neg]))
  return v / v.max()


def ref_nf4(w: np.ndarray, block: int = 64):
  """(codes (d_in, d_out), absmax (d_in/block, d_out), dequantized) in float64."""
  levels = ref_levels()
  d_in, d_out = w.shape
  blocks = w.astype(np.float64).reshape(d_in // block, block, d_out)
  absmax = np.abs(blocks).max(axis=1)
  normalized = blocks / absmax[:, None, :]
  codes = np.abs(normalized[..., None] - levels).argmin(-1).reshape(d_in, d_out)
  return codes, absmax, ref_nf4_dequant(codes, absmax, block)


def ref_nf4_dequant(codes, absmax, block=64):
  d_in, d_out = codes.shape
  return (ref_levels()[codes].reshape(d_in // block, block, d_out)
          * absmax[:, None, :]).reshape(d_in, d_out)


def ref_nf4_bound(w, absmax, block=64):
  """Per entry: absmax times half the gap between the two levels around w / absmax."""
  levels = ref_levels()
  d_in, d_out = w.shape
  n = (w.reshape(d_in // block, block, d_out) / absmax[:, None, :]).reshape(d_in, d_out)
  hi = np.clip(np.searchsorted(levels, n), 1, 15)
  half_gap = (levels[hi] - levels[hi - 1]) / 2
  return half_gap * np.repeat(absmax, block, axis=0)


def unpack(packed: np.ndarray) -> np.ndarray:
  out = np.empty((2 * packed.shape[0], packed.shape[1]), np.uint8)
  out[0::2], out[1::2] = packed >> 4, packed & 15
  return out


def _weight(shape, seed=0):
  w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
  w[3, 1] = 9.0   # an outlier: its block's absmax
  return w


def test_nf4_levels_follow_the_normal_quantile_definition():
  np.testing.assert_allclose(quant.NF4_LEVELS, ref_levels(), rtol=0, atol=1e-12)
  np.testing.assert_allclose(quant.NF4_LEVELS, PUBLISHED_NF4, rtol=0, atol=3e-7)


@pytest.mark.parametrize("shape", [(128, 40), (64, 192)])   # tall, wide
def test_nf4_round_trip_within_bound(shape):
  w = _weight(shape)
  q = quant.quantize_nf4(jnp.asarray(w))
  codes, absmax, deq = ref_nf4(w)
  np.testing.assert_array_equal(unpack(np.asarray(q.packed)), codes)
  np.testing.assert_allclose(np.asarray(q.absmax), absmax, rtol=1e-7)
  got = np.asarray(q.materialize(), np.float64)
  np.testing.assert_allclose(got, deq, rtol=1e-6, atol=1e-7)
  err = np.abs(got - w)
  assert np.all(err <= ref_nf4_bound(w, absmax) * (1 + 1e-6) + 1e-7)
  assert err.max() > 0.1 * ref_nf4_bound(w, absmax).max()   # the bound is not vacuous here


def test_nf4_double_quant():
  """Absmaxes minus their mean, int8 per block of 256 (400 blocks: a padded second block)."""
  w = _weight((128, 200))
  q = quant.quantize_nf4(jnp.asarray(w), double_quant=True)
  codes, absmax, _ = ref_nf4(w)
  flat = absmax.reshape(-1)
  offset = flat.mean()
  centred = np.zeros(512)
  centred[:flat.size] = flat - offset
  step = np.abs(centred.reshape(2, 256)).max(1) / 127
  hat = (np.round(centred.reshape(2, 256) / step[:, None]) * step[:, None]).reshape(-1)
  hat = hat[:flat.size].reshape(absmax.shape) + offset
  np.testing.assert_array_equal(unpack(np.asarray(q.packed)), codes)
  np.testing.assert_allclose(np.asarray(q.block_absmax()), hat, rtol=1e-6)
  assert np.all(np.abs(hat - absmax) <= np.repeat(step, 256)[:flat.size].reshape(absmax.shape)
                / 2 + 1e-7)
  got = np.asarray(q.materialize(), np.float64)
  np.testing.assert_allclose(got, ref_nf4_dequant(codes, hat), rtol=1e-6, atol=1e-7)
  scale_err = np.repeat(np.abs(hat - absmax), 64, axis=0)   # |level| <= 1
  assert np.all(np.abs(got - w) <= ref_nf4_bound(w, absmax) + scale_err + 1e-6)


def test_packing_bit_exact():
  codes = np.random.default_rng(1).integers(0, 16, (64, 6)).astype(np.uint8)
  packed = np.asarray(quant.pack_nibbles(jnp.asarray(codes)))
  np.testing.assert_array_equal(packed, (codes[0::2] << 4) | codes[1::2])
  q = quant.NF4(jnp.asarray(packed), jnp.ones((1, 6), jnp.float32))
  np.testing.assert_array_equal(np.asarray(q.materialize()), ref_levels()[codes].astype(np.float32))


@pytest.mark.parametrize("shape,in_ndim", [((96, 24), 1), ((24, 96), 1), ((3, 8, 5), 2)])
def test_int8_round_trip_within_half_step(shape, in_ndim):
  w = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
  w[..., 0] = 0.0    # an all-zero channel stays zero
  q = quant.quantize_int8(jnp.asarray(w), in_ndim=in_ndim)
  w2 = w.reshape(-1, shape[-1]).astype(np.float64)
  scale = np.abs(w2).max(0) / 127
  codes = np.round(w2 / np.where(scale > 0, scale, 1))
  np.testing.assert_array_equal(np.asarray(q.codes).reshape(w2.shape), codes)
  got = np.asarray(q.materialize(), np.float64).reshape(w2.shape)
  np.testing.assert_allclose(got, codes * scale, rtol=1e-6, atol=0)
  assert np.all(np.abs(got - w2) <= scale / 2 * (1 + 1e-6))
  assert q.shape == shape and q.dtype == jnp.float32


@pytest.mark.parametrize("fmt,tile_rows,shape", [
    ("int8", None, (128, 48)), ("int8", 32, (64, 160)), ("nf4", None, (64, 160)),
    ("nf4", 64, (128, 48))])   # tall and wide, whole and tiled
def test_matmul_and_input_grad_equal_dense_dequantized(fmt, tile_rows, shape):
  w = _weight(shape)
  q = quant.quantize({"k": jnp.asarray(w)}, fmt, "k", tile_rows=tile_rows)["k"]
  deq = np.asarray(q.materialize(), np.float64)
  x = np.random.default_rng(3).standard_normal((2, 3, shape[0])).astype(np.float32)
  g = np.random.default_rng(4).standard_normal((2, 3, shape[1])).astype(np.float32)
  y, vjp = jax.vjp(lambda x: lj.ops.dense(x, q), jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(y), x @ deq, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(g))[0]), g @ deq.T, rtol=1e-5, atol=1e-5)


def test_bf16_inputs_and_dtype():
  w = _weight((128, 32))
  q = quant.quantize({"k": jnp.asarray(w, jnp.bfloat16)}, "nf4", "k", tile_rows=64)["k"]
  assert q.dtype == jnp.bfloat16 and q.materialize().dtype == jnp.bfloat16
  _, absmax, deq = ref_nf4(np.asarray(jnp.asarray(w, jnp.bfloat16), np.float64))
  np.testing.assert_allclose(np.asarray(q.materialize(), np.float64), deq, rtol=2 ** -8)
  x = np.random.default_rng(5).standard_normal((4, 128))
  y = lj.ops.dense(jnp.asarray(x, jnp.bfloat16), q)
  assert y.dtype == jnp.bfloat16
  ref = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64) @ deq
  np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=0, atol=0.02 * np.abs(ref).max())
  y32 = lj.ops.dense(jnp.asarray(x, jnp.float32), q.astype(jnp.float32))
  assert y32.dtype == jnp.float32


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_lora_on_quantized_base_equals_dense_formula(fmt):
  """LoRA's init sees the dequantized base and keeps the quantized leaf; the adapted product,
  its factor gradients and merge follow x·(deq + s·a·b)."""
  w = _weight((128, 48))
  params = quant.quantize({"layer": {"kernel": jnp.asarray(w)}}, fmt)
  adapter = lj.lora(rank=4, alpha=8.0, targets="layer/kernel")
  base, state = adapter.init(jax.random.key(0), params)
  assert base["layer"]["kernel"] is params["layer"]["kernel"]
  rng = np.random.default_rng(6)
  a = rng.standard_normal((128, 4)).astype(np.float32)
  b = rng.standard_normal((4, 48)).astype(np.float32)
  state = lj.with_trainable(state, {"layer": {"kernel": lj.LoRAFactors(jnp.asarray(a),
                                                                       jnp.asarray(b))}})
  x = rng.standard_normal((5, 128)).astype(np.float32)
  g = rng.standard_normal((5, 48)).astype(np.float32)

  def loss(trainable):
    p = adapter.apply(base, lj.with_trainable(state, trainable))
    return jnp.sum(lj.ops.dense(jnp.asarray(x), p["layer"]["kernel"]) * g)

  deq = np.asarray(params["layer"]["kernel"].materialize(), np.float64)
  a64, b64, x64, g64 = (v.astype(np.float64) for v in (a, b, x, g))
  value, grads = jax.value_and_grad(loss)(state.trainable)
  np.testing.assert_allclose(float(value), np.sum((x64 @ (deq + 2 * a64 @ b64)) * g64), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grads["layer"]["kernel"].a), 2 * x64.T @ (g64 @ b64.T),
                             rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(np.asarray(grads["layer"]["kernel"].b), 2 * (x64 @ a64).T @ g64,
                             rtol=1e-4, atol=1e-3)
  merged = lj.merge(adapter.apply(base, state))["layer"]["kernel"]
  assert merged.dtype == jnp.float32 and not lj.structured.is_structured(merged)
  np.testing.assert_allclose(np.asarray(merged), deq + 2 * a64 @ b64, rtol=1e-5, atol=1e-5)


def test_pissa_and_krona_nest_on_nf4():
  """PiSSA's SVD init reads the dequantized base (its residual base is dense); KronA applies on
  the NF4 leaf as on its dense dequantized value."""
  w = _weight((128, 64))
  params = quant.quantize({"k": jnp.asarray(w)}, "nf4", "k")
  deq = params["k"].materialize()
  pissa = lj.pissa(rank=4, targets="k")
  base, state = pissa.init(jax.random.key(0), params)
  np.testing.assert_allclose(np.asarray(lj.merge(pissa.apply(base, state))["k"]),
                             np.asarray(deq), atol=1e-5)
  kron = krona(8, 8, "k", init="lokr")
  base, state = kron.init(jax.random.key(0), params)
  state = lj.with_trainable(state, jax.tree.map(lambda v: v + 0.1, state.trainable))
  x = jnp.asarray(np.random.default_rng(7).standard_normal((3, 128)), jnp.float32)
  on_quant = lj.ops.dense(x, kron.apply(base, state)["k"])
  on_dense = lj.ops.dense(x, kron.apply({"k": deq}, state)["k"])
  np.testing.assert_allclose(np.asarray(on_quant), np.asarray(on_dense), rtol=1e-5, atol=1e-5)


def test_quantized_weights_are_frozen():
  q = quant.quantize({"k": jnp.asarray(_weight((64, 8)))}, "nf4", "k")["k"]
  x = jnp.ones((2, 64))
  with pytest.raises(ValueError, match="quantized weight is frozen"):
    jax.grad(lambda absmax: jnp.sum(lj.ops.dense(x, q.replace(absmax=absmax))))(q.absmax)
  with pytest.raises(ValueError, match=r"hold quantized weights \['head/kernel'\]"):
    quant.check_frozen({"head": {"kernel": q, "bias": jnp.zeros(8)}}, "head")
  quant.check_frozen({"head": {"kernel": jnp.ones((2, 2))}}, "head")
  with pytest.raises(ValueError, match=r"the trained params hold quantized weights "
                                       r"\['head/k'\]"):
    steps.init_train_state(lj.AdapterState({}, {}), optax.sgd(0.1), head={"k": q})


@pytest.mark.parametrize("kwargs,match", [
    (dict(fmt="nf4", targets="odd"), r"multiple of block_size=64; pass a block_size dividing 96"),
    (dict(fmt="nf4", targets="conv"), r"nf4 takes 2-D kernels"),
    (dict(fmt="fp8", targets="sq"), r"fmt='fp8'; valid: \['int8', 'nf4'\]"),
    (dict(fmt="int8", targets="sq", double_quant=True), r"double_quant applies to nf4 only"),
    (dict(fmt="nf4", targets="sq", tile_rows=96), r"tile_rows=96 must be a positive divisor"),
    (dict(fmt="nf4", targets="sq", block_size=7), r"block_size must be an even int"),
    (dict(fmt="int8", targets="ids"), r"only float kernels are quantized"),
])
def test_bad_input_is_refused(kwargs, match):
  params = {"odd": jnp.ones((96, 4)), "conv": jnp.ones((3, 3, 64, 4)), "sq": jnp.ones((128, 4)),
            "ids": jnp.ones((64, 4), jnp.int32)}
  with pytest.raises(ValueError, match=match):
    quant.quantize(params, **kwargs)
  quant.quantize(params, "nf4", "odd", block_size=32)   # 96 = 3 blocks of 32
