"""Quantized frozen base weights (QLoRA-style) as structured weights: int8 and 4-bit NF4.

A quantized weight stands where the dense kernel stood, so adapters nest on top of it
(`LowRank(base=NF4(...), ...)`): their `init` sees the dequantized kernel (`materialize`), their
product runs the base through `matmul`, which dequantizes inside the product and never keeps the
dense kernel beyond it.

Formats (kernels in the flax layout, input axes first):

  int8  symmetric absmax per output channel: `scale[j] = max_i |w[i, j]| / 127`,
        `code = round(w / scale)` in [-127, 127], dequantized `code * scale`. The error of an entry
        is at most half a step, `scale[j] / 2`. Any kernel rank (the leading `in_ndim` axes are the
        inputs).
  nf4   4-bit NormalFloat (Dettmers et al. 2023, arXiv 2305.14314): blocks of `block_size` (64)
        consecutive entries along the input axis of each output column share one absmax; an entry
        is stored as the index of the level of `NF4_LEVELS` nearest to `w / absmax`, two indices per
        uint8 (the first input row of a pair in the high nibble, as bitsandbytes packs consecutive
        entries). The error of an entry is at most `absmax` times half the gap between the two
        levels around it. 2-D kernels whose input size is a multiple of `block_size` (others are
        refused). With `double_quant`, the fp32 absmaxes are themselves quantized: their mean is
        subtracted and the rest is quantized to int8, symmetric absmax per block of 256 (QLoRA
        quantizes them to an 8-bit float instead; this is the linear int8 variant), ~0.127 bits per
        parameter instead of 0.5.

The NF4 levels follow the normal-quantile definition of QLoRA/bitsandbytes: with
`offset = (1 - 1/(2*15) + 1 - 1/(2*16)) / 2`, the 8 positive levels are the standard normal
quantiles of `linspace(offset, 0.5, 9)[:-1]`, the 7 negative ones minus the quantiles of
`linspace(offset, 0.5, 8)[:-1]`, plus an exact zero, all divided by the largest, so they span
[-1, 1].

Product: `x @ w` computes in `result_type(x, w.dtype)` (the dtype the dense kernel had, changed by
`astype`), dequantizing `tile_rows` input rows at a time (None, the default: the whole kernel at
once, one full-size matmul) and accumulating tiles in float32. The backward is written by hand: the
gradient of x recomputes the dequantized tiles from the codes, so autodiff never saves a
dequantized kernel between the forward and the backward (which would hold every layer's dense
kernel at once). Tiling bounds the transient of one product: for a 4096 x 11008 bf16 kernel and
2048 tokens, XLA:CPU's compiled forward + input gradient holds 301 MiB of temporaries with the whole
kernel, 140 MiB with `tile_rows=1024`, 99 MiB with 256 (int8: 290, 137, 99 MiB).

Frozen: a quantized weight has no gradient. Differentiating with respect to its scales raises a
ValueError at trace time, and `check_frozen` refuses a trainable tree that holds one; train an
adapter on top instead.

`merge` semantics: `lowrank_jax.merge` of an adapted quantized weight is the dequantized base plus
the update, `dequantize(q) + ΔW`, dense, in the base's dtype (the quantization error stays in the
merged weight; re-quantizing the merged weight adds a second rounding).

>>> import jax, jax.numpy as jnp, lowrank_jax as lj
>>> params = {'layer': {'kernel': jax.random.normal(jax.random.key(0), (128, 32))}}
>>> q = lj.quant.quantize(params, 'nf4', targets='layer/kernel')
>>> type(q['layer']['kernel']).__name__, q['layer']['kernel'].shape
('NF4', (128, 32))
>>> adapter = lj.lora(rank=4, targets='layer/kernel')
>>> base, state = adapter.init(jax.random.key(1), q)
>>> w = adapter.apply(base, state)['layer']['kernel']      # LowRank(base=NF4(...), ...)
>>> lj.ops.dense(jnp.ones((2, 128)), w).shape
(2, 32)
>>> merged = lj.merge({'w': w})['w']                        # dequantized base + ΔW, dense
>>> bool(jnp.allclose(merged, q['layer']['kernel'].materialize()))   # ΔW = 0 at init
True
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax import structured
from lowrank_jax import targeting
from lowrank_jax import tree as tree_lib

FORMATS = ("int8", "nf4")
INT8_MAX = 127
NF4_BLOCK = 64
DOUBLE_QUANT_BLOCK = 256


def nf4_levels() -> np.ndarray:
  """The 16 NF4 levels (float64, ascending, -1 ... 0 ... 1) from the normal-quantile definition."""
  offset = (1 - 1 / (2 * 15) + 1 - 1 / (2 * 16)) / 2
  quantile = statistics.NormalDist().inv_cdf
  positive = [quantile(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
  negative = [-quantile(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
  levels = np.sort(np.array(positive + [0.0] + negative, np.float64))
  return levels / levels.max()


NF4_LEVELS = nf4_levels()


def _dtype_name(dtype) -> str:
  return jnp.dtype(dtype).name


class Quantized(structured.Structured):
  """A frozen quantized kernel, viewed as a (d_in, d_out) matrix of its `in_ndim` input axes.

  Subclasses (flax dataclasses with static fields `dtype_name` and `tile_rows`) implement
  `dequantize_rows(start, rows, dtype)`: rows `start .. start + rows - 1` of the dequantized
  matricized kernel (`start` may be traced).
  """

  @property
  def dtype(self):
    return jnp.dtype(self.dtype_name)

  @property
  def matrix_shape(self) -> tuple[int, int]:
    return (math.prod(self.shape[:self.in_ndim]), math.prod(self.shape[self.in_ndim:]))

  def dequantize_rows(self, start, rows: int, dtype) -> jax.Array:
    raise NotImplementedError

  def astype(self, dtype) -> "Quantized":
    """The same codes, dequantized to `dtype` (the dtype the products compute in)."""
    return self.replace(dtype_name=_dtype_name(dtype))

  def materialize(self) -> jax.Array:
    """The dequantized kernel, in `self.dtype`, of the original shape."""
    return self.dequantize_rows(0, self.matrix_shape[0], self.dtype).reshape(self.shape)

  def matmul(self, x: jax.Array, in_ndim: int = 1) -> jax.Array:
    if in_ndim != self.in_ndim:
      return super().matmul(x, in_ndim)
    d_in, d_out = self.matrix_shape
    lead = x.shape[:x.ndim - in_ndim]
    y = _quantized_matmul(x.reshape(-1, d_in), self)
    return y.reshape(lead + self.shape[self.in_ndim:])


def _tiles(w: Quantized) -> tuple[int, int]:
  """(rows per tile, number of tiles) of the input axis."""
  d_in = w.matrix_shape[0]
  rows = d_in if w.tile_rows is None else min(w.tile_rows, d_in)
  return rows, d_in // rows


def _after(x: jax.Array, w: Quantized) -> tuple[jax.Array, Quantized]:
  """`(x, w)` through an optimization barrier: the dequantization of `w` then depends on `x`, so
  XLA cannot hoist it ahead of the layer that needs it and keep the dequantized kernels of several
  layers alive at once. (Measured on XLA:CPU, the compiled LoRA step of the tiny Llama on an NF4
  base: 600 KB of temporaries without the barrier, 493 KB with it, as many as on a bf16 base.)"""
  return jax.lax.optimization_barrier((x, w))


def _forward(x2: jax.Array, w: Quantized) -> jax.Array:
  dt = jnp.result_type(x2.dtype, w.dtype)
  x2, w = _after(x2, w)
  rows, n = _tiles(w)
  if n == 1:
    return jnp.matmul(x2.astype(dt), w.dequantize_rows(0, rows, dt))

  def add_tile(k, acc):
    xk = jax.lax.dynamic_slice_in_dim(x2, k * rows, rows, axis=1).astype(dt)
    return acc + jnp.matmul(xk, w.dequantize_rows(k * rows, rows, dt),
                            preferred_element_type=jnp.float32)

  acc = jnp.zeros((x2.shape[0], w.matrix_shape[1]), jnp.float32)
  return jax.lax.fori_loop(0, n, add_tile, acc).astype(dt)


def _input_grad(g2: jax.Array, w: Quantized, x_dtype) -> jax.Array:
  g2, w = _after(g2, w)
  rows, n = _tiles(w)
  if n == 1:
    return jnp.matmul(g2, w.dequantize_rows(0, rows, g2.dtype).T).astype(x_dtype)

  def tile_grad(k, dx):
    gk = jnp.matmul(g2, w.dequantize_rows(k * rows, rows, g2.dtype).T)
    return jax.lax.dynamic_update_slice_in_dim(dx, gk.astype(x_dtype), k * rows, axis=1)

  return jax.lax.fori_loop(0, n, tile_grad, jnp.zeros((g2.shape[0], n * rows), x_dtype))


@jax.custom_vjp
def _quantized_matmul(x2, w):
  return _forward(x2, w)


def _quantized_matmul_fwd(x2, w):
  is_primal = lambda p: isinstance(p, jax.custom_derivatives.CustomVJPPrimal)
  if any(p.perturbed for p in jax.tree.leaves(w, is_leaf=is_primal)):
    raise ValueError(f"{type(w).__name__}: a quantized weight is frozen and has no gradient; "
                     "train an adapter on top of it (e.g. lowrank_jax.lora) instead of the "
                     "weight itself")
  x2 = x2.value
  w = jax.tree.map(lambda p: p.value, w, is_leaf=is_primal)
  return _forward(x2, w), (w, jnp.zeros((0,), x2.dtype))


def _quantized_matmul_bwd(res, g):
  w, x_like = res
  if isinstance(g, jax.custom_derivatives.SymbolicZero):
    return None, None
  return _input_grad(g, w, x_like.dtype), None


_quantized_matmul.defvjp(_quantized_matmul_fwd, _quantized_matmul_bwd, symbolic_zeros=True)


# ----------------------------------------------------------------------------------------------
# int8, per output channel.
# ----------------------------------------------------------------------------------------------

@flax.struct.dataclass
class Int8(Quantized):
  """Symmetric absmax int8 per output channel: `w ≈ codes * scale` (see the module docstring).

  Attributes:
    codes: int8, the kernel's shape.
    scale: float32 ``(*out_shape,)``, `absmax / 127` of each output channel.
    in_ndim: the number of leading input axes.
    dtype_name: the dtype of the dequantized kernel.
    tile_rows: input rows dequantized at a time (None: all).
  """
  codes: jax.Array
  scale: jax.Array
  in_ndim: int = flax.struct.field(pytree_node=False, default=1)
  dtype_name: str = flax.struct.field(pytree_node=False, default="float32")
  tile_rows: Optional[int] = flax.struct.field(pytree_node=False, default=None)

  @property
  def shape(self):
    return tuple(self.codes.shape)

  def dequantize_rows(self, start, rows, dtype):
    d_in, d_out = self.matrix_shape
    codes = jax.lax.dynamic_slice_in_dim(self.codes.reshape(d_in, d_out), start, rows, axis=0)
    return (codes.astype(jnp.float32) * self.scale.reshape(d_out)).astype(dtype)

  def embed(self, ids):
    if self.ndim != 2:
      return super().embed(ids)
    return (jnp.take(self.codes, ids, axis=0).astype(jnp.float32) * self.scale).astype(self.dtype)


def quantize_int8(w: jax.Array, *, in_ndim: int = 1, tile_rows: Optional[int] = None) -> Int8:
  """`Int8` of a float kernel whose first `in_ndim` axes are its inputs."""
  in_axes = tuple(range(in_ndim))
  absmax = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=in_axes)
  scale = absmax / INT8_MAX
  safe = jnp.where(scale > 0, scale, 1.0)
  codes = jnp.clip(jnp.round(w.astype(jnp.float32) / safe), -INT8_MAX, INT8_MAX)
  return Int8(codes.astype(jnp.int8), scale, in_ndim, _dtype_name(w.dtype), tile_rows)


# ----------------------------------------------------------------------------------------------
# NF4, block-wise, optionally with double-quantized scales.
# ----------------------------------------------------------------------------------------------

@flax.struct.dataclass
class Int8Vector:
  """A float32 vector quantized to int8: mean `offset` subtracted, symmetric absmax per block.

  Attributes:
    codes: int8 (blocks, block size), the vector zero-padded to whole blocks.
    scale: float32 (blocks,), `absmax / 127` of each block.
    offset: float32 scalar, the mean that was subtracted.
    size: the vector's length.
  """
  codes: jax.Array
  scale: jax.Array
  offset: jax.Array
  size: int = flax.struct.field(pytree_node=False)

  def dequantize(self) -> jax.Array:
    v = self.codes.astype(jnp.float32) * self.scale[:, None] + self.offset
    return v.reshape(-1)[:self.size]


def quantize_vector_int8(v: jax.Array, block: int = DOUBLE_QUANT_BLOCK) -> Int8Vector:
  """`Int8Vector` of a 1-D float vector (blocks of `block` entries)."""
  v = v.astype(jnp.float32)
  offset = jnp.mean(v)
  pad = -v.size % block
  centred = jnp.pad(v - offset, (0, pad)).reshape(-1, block)
  scale = jnp.max(jnp.abs(centred), axis=1) / INT8_MAX
  safe = jnp.where(scale > 0, scale, 1.0)[:, None]
  codes = jnp.clip(jnp.round(centred / safe), -INT8_MAX, INT8_MAX).astype(jnp.int8)
  return Int8Vector(codes, scale, offset, v.size)


@flax.struct.dataclass
class NF4(Quantized):
  """4-bit NormalFloat, block-wise absmax along the input axis (see the module docstring).

  Attributes:
    packed: uint8 (d_in / 2, d_out): row i holds the codes of input rows 2i (high nibble) and
      2i + 1 (low nibble), each an index into `NF4_LEVELS`.
    absmax: float32 (d_in / block_size, d_out), or an `Int8Vector` of its flattened values
      (double quantization).
    block_size: input rows per absmax block.
    dtype_name: the dtype of the dequantized kernel.
    tile_rows: input rows dequantized at a time (None: all); a multiple of `block_size`.
  """
  packed: jax.Array
  absmax: Any
  block_size: int = flax.struct.field(pytree_node=False, default=NF4_BLOCK)
  dtype_name: str = flax.struct.field(pytree_node=False, default="float32")
  tile_rows: Optional[int] = flax.struct.field(pytree_node=False, default=None)

  in_ndim = 1

  @property
  def shape(self):
    return (2 * self.packed.shape[0], self.packed.shape[1])

  def block_absmax(self) -> jax.Array:
    """float32 (d_in / block_size, d_out)."""
    if isinstance(self.absmax, Int8Vector):
      return self.absmax.dequantize().reshape(self.shape[0] // self.block_size, self.shape[1])
    return self.absmax

  def dequantize_rows(self, start, rows, dtype):
    d_out = self.shape[1]
    packed = jax.lax.dynamic_slice_in_dim(self.packed, start // 2, rows // 2, axis=0)
    codes = jnp.stack([packed >> 4, packed & 0xF], axis=1).reshape(rows, d_out)
    levels = jnp.take(jnp.asarray(NF4_LEVELS, jnp.float32), codes, axis=0)
    absmax = jax.lax.dynamic_slice_in_dim(self.block_absmax(), start // self.block_size,
                                          rows // self.block_size, axis=0)
    blocks = levels.reshape(rows // self.block_size, self.block_size, d_out) * absmax[:, None, :]
    return blocks.reshape(rows, d_out).astype(dtype)


def nf4_codes(normalized: jax.Array) -> jax.Array:
  """Index of the nearest NF4 level of each value in [-1, 1] (a tie goes to the lower level)."""
  midpoints = jnp.asarray((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2, jnp.float32)
  return jnp.searchsorted(midpoints, normalized, side="left").astype(jnp.uint8)


def pack_nibbles(codes: jax.Array) -> jax.Array:
  """uint8 (2n, m) codes in [0, 16) -> (n, m): row 2i in the high nibble, row 2i + 1 in the low."""
  pairs = codes.reshape(codes.shape[0] // 2, 2, codes.shape[1])
  return (pairs[:, 0] << 4) | pairs[:, 1]


def quantize_nf4(w: jax.Array, *, block_size: int = NF4_BLOCK, double_quant: bool = False,
                 tile_rows: Optional[int] = None) -> NF4:
  """`NF4` of a float (d_in, d_out) kernel; d_in must be a multiple of `block_size` (even)."""
  d_in, d_out = w.shape
  w32 = w.astype(jnp.float32).reshape(d_in // block_size, block_size, d_out)
  absmax = jnp.max(jnp.abs(w32), axis=1)
  safe = jnp.where(absmax > 0, absmax, 1.0)[:, None, :]
  codes = nf4_codes(w32 / safe).reshape(d_in, d_out)
  scales = quantize_vector_int8(absmax.reshape(-1)) if double_quant else absmax
  return NF4(pack_nibbles(codes), scales, block_size, _dtype_name(w.dtype), tile_rows)


# ----------------------------------------------------------------------------------------------
# Quantizing a params tree; the frozen check.
# ----------------------------------------------------------------------------------------------

def is_quantized(x: Any) -> bool:
  """Whether `x` is a quantized weight (`Int8` or `NF4`)."""
  return isinstance(x, Quantized)


def _check_leaf(fmt: str, path: str, leaf: Any, in_ndim: int, block_size: int,
                tile_rows: Optional[int]):
  """Raises a ValueError naming the path unless `fmt` can quantize `leaf` with these options."""
  if structured.is_structured(leaf):
    raise ValueError(f"quantize: {path} is already a structured weight ({type(leaf).__name__}); "
                     "quantize the base params before adapting them")
  if not jnp.issubdtype(leaf.dtype, jnp.floating):
    raise ValueError(f"quantize: {path} has dtype {leaf.dtype}; only float kernels are quantized")
  shape = tuple(leaf.shape)
  if fmt == "nf4" and len(shape) != 2:
    raise ValueError(f"quantize: nf4 takes 2-D kernels (d_in, d_out); {path} has shape {shape}")
  if not 1 <= in_ndim < len(shape):
    raise ValueError(f"quantize: in_ndim={in_ndim} must be in [1, {len(shape) - 1}] for {path} "
                     f"of shape {shape}")
  d_in = math.prod(shape[:in_ndim])
  unit = 1
  if fmt == "nf4":
    unit = block_size
    if d_in % block_size:
      raise ValueError(f"quantize: nf4 needs the input size of {path} (shape {shape}) to be a "
                       f"multiple of block_size={block_size}; pass a block_size dividing "
                       f"{d_in} (an even one), or leave this kernel out of the targets")
  if tile_rows is not None and (tile_rows <= 0 or tile_rows % unit or d_in % tile_rows):
    raise ValueError(f"quantize: tile_rows={tile_rows} must be a positive divisor of the input "
                     f"size {d_in} of {path}" + (f" and a multiple of block_size={block_size}"
                                                 if fmt == "nf4" else ""))


# One compiled quantizer per kernel shape (a model's layers share a few), instead of the dozens of
# op-by-op dispatches of each eager call.
_jit_int8 = jax.jit(quantize_int8, static_argnames=("in_ndim", "tile_rows"))
_jit_nf4 = jax.jit(quantize_nf4, static_argnames=("block_size", "double_quant", "tile_rows"))


def check(params: Any, fmt: str, targets: targeting.Targets = r".*kernel", *,
          block_size: int = NF4_BLOCK, double_quant: bool = False, in_ndim: int = 1,
          tile_rows: Optional[int] = None) -> list[str]:
  """The paths `quantize` would quantize, after checking every one of them; nothing is computed,
  so `params` may hold shapes only (`jax.eval_shape`), and a run can refuse a bad setting before
  it builds anything.

  Arguments as in `quantize`.

  Raises:
    ValueError: an unknown format, bad options, or a target that the format cannot hold (named).
  """
  if fmt not in FORMATS:
    raise ValueError(f"quantize: fmt={fmt!r}; valid: {list(FORMATS)}")
  if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2 \
      or block_size % 2:
    raise ValueError(f"quantize: block_size must be an even int >= 2, got {block_size!r}")
  if fmt == "int8" and double_quant:
    raise ValueError("quantize: double_quant applies to nf4 only (int8 has one scale per channel)")
  leaves = dict(targeting.named_leaves(params))
  paths = targeting.resolve(params, targets)
  for path in paths:
    _check_leaf(fmt, path, leaves[path], in_ndim if fmt == "int8" else 1, block_size, tile_rows)
  return paths


def quantize(params: Any, fmt: str, targets: targeting.Targets = r".*kernel", *,
             block_size: int = NF4_BLOCK, double_quant: bool = False, in_ndim: int = 1,
             tile_rows: Optional[int] = None) -> Any:
  """Returns `params` with the targeted kernels replaced by quantized structured weights.

  Args:
    params: the params pytree (dense kernels).
    fmt: "int8" (per output channel) or "nf4" (block-wise 4-bit).
    targets: regex(es) over `/`-joined paths, or a callable `(path, leaf) -> bool`.
    block_size: nf4: input rows per absmax block (64, QLoRA's); even.
    double_quant: nf4: quantize the block absmaxes to int8 too (blocks of 256).
    in_ndim: int8: leading input axes of the targeted kernels (nf4 takes 2-D kernels).
    tile_rows: input rows dequantized at a time inside the products (None: whole kernels).

  Raises:
    ValueError: an unknown format, bad options, or a target that the format cannot hold (named).
  """
  paths = check(params, fmt, targets, block_size=block_size, double_quant=double_quant,
                in_ndim=in_ndim, tile_rows=tile_rows)    # every target, before any is quantized
  leaves = dict(targeting.named_leaves(params))
  out = {}
  for path in paths:
    leaf = leaves[path]
    if fmt == "int8":
      out[path] = _jit_int8(leaf, in_ndim=in_ndim, tile_rows=tile_rows)
    else:
      out[path] = _jit_nf4(leaf, block_size=block_size, double_quant=double_quant,
                           tile_rows=tile_rows)
  return tree_lib.replace_by_name(params, out, is_leaf=structured.is_structured, what="quantize")


def check_frozen(tree: Any, what: str = "trainable params") -> None:
  """Raises a ValueError naming every quantized weight in `tree` (a tree that is trained).

  Quantized weights are frozen: train an adapter on top of them instead.
  """
  named = tree_lib.flatten_with_names(tree, is_leaf=is_quantized)[0]
  paths = [path for path, leaf in named if is_quantized(leaf)]
  if paths:
    raise ValueError(f"{what} hold quantized weights {paths[:5]}: quantized weights are frozen "
                     "and cannot be trained; leave them out and train an adapter on top")

