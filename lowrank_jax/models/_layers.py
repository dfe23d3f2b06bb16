"""Shared building blocks of the pure-function models (private).

Every product with a weight goes through `lowrank_jax.ops`, so structured weights (LoRA & co.) run
factored. Biases and norm parameters are plain arrays.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from lowrank_jax import ops
from lowrank_jax import quant
from lowrank_jax.structured import dropout, no_dropout

Params = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Initialisers (return nested dicts of arrays).
# ---------------------------------------------------------------------------------------------

def dense_init(key, d_in: int, d_out: int, *, bias: bool = True, std: float | None = None,
               dtype=jnp.float32) -> Params:
  """Kernel (d_in, d_out) ~ N(0, std^2) (default lecun-normal), zero bias."""
  std = 1.0 / math.sqrt(d_in) if std is None else std
  p = {"kernel": (std * jax.random.normal(key, (d_in, d_out), jnp.float32)).astype(dtype)}
  if bias:
    p["bias"] = jnp.zeros((d_out,), dtype)
  return p


def conv_init(key, kernel_size: tuple[int, ...], c_in: int, c_out: int, *, bias: bool = True,
              dtype=jnp.float32) -> Params:
  """Kernel (*kernel_size, c_in, c_out), He-normal; zero bias."""
  fan_in = math.prod(kernel_size) * c_in
  shape = (*kernel_size, c_in, c_out)
  p = {"kernel": (math.sqrt(2.0 / fan_in) * jax.random.normal(key, shape, jnp.float32)).astype(dtype)}
  if bias:
    p["bias"] = jnp.zeros((c_out,), dtype)
  return p


def embed_init(key, num: int, dim: int, *, std: float = 0.02, dtype=jnp.float32) -> Params:
  return {"embedding": (std * jax.random.normal(key, (num, dim), jnp.float32)).astype(dtype)}


def layer_norm_init(dim: int, dtype=jnp.float32) -> Params:
  return {"scale": jnp.ones((dim,), dtype), "bias": jnp.zeros((dim,), dtype)}


def rms_norm_init(dim: int, dtype=jnp.float32) -> Params:
  return {"scale": jnp.ones((dim,), dtype)}


# ---------------------------------------------------------------------------------------------
# Apply functions.
# ---------------------------------------------------------------------------------------------

def dense(p: Params, x: jax.Array) -> jax.Array:
  """`x @ kernel (+ bias)` through `ops.dense`."""
  y = ops.dense(x, p["kernel"])
  if "bias" in p:
    y = y + p["bias"]
  return y


def conv(p: Params, x: jax.Array, **kwargs) -> jax.Array:
  y = ops.conv(x, p["kernel"], **kwargs)
  if "bias" in p:
    y = y + p["bias"]
  return y


def layer_norm(p: Params, x: jax.Array, eps: float) -> jax.Array:
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
  y = (xf - mean) * jax.lax.rsqrt(var + eps)
  return (y * p["scale"] + p["bias"]).astype(x.dtype)


def rms_norm(p: Params, x: jax.Array, eps: float) -> jax.Array:
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
  return (y * p["scale"]).astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, *,
              dropout_rate: float = 0.0, rng=None, deterministic: bool = True,
              scale: float | None = None) -> jax.Array:
  """Softmax attention over (B, T, H, D) heads, with inverted dropout on the probabilities.

  Without dropout (deterministic, or rate 0) this is `jax.nn.dot_product_attention` (XLA picks its
  kernel); with dropout it is the same formula written out, softmax(q·kᵀ/√D + mask) with a
  Bernoulli(1 − rate) keep-mask on the (B, H, T, S) probabilities, as in BERT's
  `attention_probs_dropout_prob`. `mask` is boolean, broadcastable to (B, H, T, S), True = attend.
  `scale` (None: 1/√D) replaces 1/√D; with it, or with a value head size other than q's (a
  compressed model), the written-out formula runs.
  """
  default = scale is None and v.shape[-1] == q.shape[-1]
  if default and (deterministic or no_dropout(dropout_rate)):
    return jax.nn.dot_product_attention(q, k, v, mask=mask)
  logits = jnp.einsum("bthd,bshd->bhts", q, k).astype(jnp.float32)
  logits = logits / math.sqrt(q.shape[-1]) if scale is None else logits * scale
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = dropout(jax.nn.softmax(logits, axis=-1), dropout_rate, rng, deterministic)
  return jnp.einsum("bhts,bshd->bthd", probs.astype(v.dtype), v)


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def cast_floats(params: Any, dtype) -> Any:
  """`params` with every float array (the leaves of structured weights included) in `dtype`;
  quantized weights dequantize to it. Inside a step the casts of trainable params are
  differentiated, so their gradients and optimizer state keep the params' own dtype."""
  dtype = jnp.dtype(dtype)

  def cast(x):
    if quant.is_quantized(x):
      return x.astype(dtype)
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating):
      return x.astype(dtype)
    return x
  return jax.tree.map(cast, params, is_leaf=quant.is_quantized)


@jax.custom_jvp
def materialized_cotangent(x: jax.Array) -> jax.Array:
  """The identity, whose backward writes the cotangent of `x` to memory once.

  Put on the residual stream between blocks. Why: XLA:CPU drops optimization barriers and fuses a
  cheap element-wise producer into every consumer that can take it. When nothing reduces the
  residual stream's cotangent over tokens (LoRA: frozen biases and norms; full fine-tuning has the
  bias and norm gradients), each block's cotangent (norm backward plus residual adds) stays an
  unmaterialized expression that every later consumer fusion recomputes from the matmul outputs of
  all blocks above it: work that grows with depth squared (MiniLM, LoRA on all linear layers:
  fusions of ~480 element-wise ops). A token-axis reduction of the cotangent is not fusible on
  CPU, so with it the cotangent is computed once per block.

  The rule is a linear JVP, `t + 0 * colsum(t)` (the column sum over every axis but the features,
  in float32, broadcast back), so forward mode (`jax.jvp`, `jax.jacfwd`) works and reverse mode is
  its transpose, `g + 0 * colsum(g)`: XLA does not fold a float product with zero (it would be
  wrong for inf and NaN), so the reduction stays in the backward. The returned cotangent equals
  the incoming one for finite values (a -0.0 may come back as +0.0); a non-finite value in a
  feature column, already a failed step, makes that column NaN. The forward is `x` itself.
  """
  return x


@materialized_cotangent.defjvp
def _materialized_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  colsum = jnp.sum(t.astype(jnp.float32), axis=tuple(range(t.ndim - 1)))
  return x, t + (jnp.zeros((), jnp.float32) * colsum).astype(t.dtype)


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
  """(B, T, H*D) -> (B, T, H, D)."""
  b, t, d = x.shape
  return x.reshape(b, t, num_heads, d // num_heads)


def merge_heads(x: jax.Array) -> jax.Array:
  b, t, h, d = x.shape
  return x.reshape(b, t, h * d)


def key_padding_mask(attention_mask: jax.Array | None) -> jax.Array | None:
  """(B, S) {0,1} -> boolean (B, 1, 1, S) for `jax.nn.dot_product_attention`."""
  if attention_mask is None:
    return None
  return attention_mask.astype(bool)[:, None, None, :]


def fold(rng, *data: int):
  """`fold_in` chain that passes `None` through (deterministic mode)."""
  if rng is None:
    return None
  for d in data:
    rng = jax.random.fold_in(rng, d)
  return rng


def check_choice(field: str, value: Any, valid) -> None:
  if value not in valid:
    raise ValueError(f"{field}={value!r} is not valid; valid values: {sorted(valid)}")
