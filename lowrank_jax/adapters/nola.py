"""NOLA (Koohpayegani et al., ICLR 2024, https://arxiv.org/abs/2310.02556), repo UCDvision/NOLA.

NOLA re-parameterizes LoRA's two factors as linear combinations of frozen pseudo-random bases
generated from a seed, A = Σ_{i≤k} α_i A_i and B = Σ_{j≤l} β_j B_j, and trains only the mixing
coefficients: k + l parameters per adapted matrix, independent of its shape and of the rank. The
adapter state holds the coefficients and one uint32 seed per target; the bases are regenerated from
the seed inside every step (forward, and again in the backward through a custom VJP, so they are
never kept as residuals), then the small A (d_in, r) and B (r, d_out) feed the LoRA rank-r branch
(`lowrank_jax._kernels.lowrank_branch`): no d_in×d_out array and no stored basis tensor.

Variants (`variant`):
  "lm" (primary; the official GPT-2/LLaMA `NOLALinear`): A = A₀ + (1/√k)·Σ α_i A_i with A_i ~
    U(−1, 1) and A₀ a frozen kaiming-uniform (U(±1/√d_in)) matrix, B = (1/√l)·Σ β_j B_j with
    B_j ~ U(−1, 1); α = β = 0 at init, so ΔW = 0; y = x W + (alpha/r)·x A B. Unlike the official
    code, which saves A₀ in its state dict, A₀ is regenerated from the seed too, so the state
    is coefficients + seed only.
  "vit" (the official ViT `NOLA2`): A = Σ α_i A_i, B = Σ β_j B_j with kaiming-uniform(a=√5) bases
    (our choice of fan-in: U(±1/√d_in) for A_i, U(±1/√r) for B_j), α_i = 1/k and β_j = 1/l at
    init, scale 1/r (alpha = 1). ΔW ≠ 0 at init.

Layout: A is (d_in, r) and B (r, d_out) in our (d_in, d_out) kernel layout (the official
PyTorch-layout A (r, d_in) and B (d_out, r) transposed). `shared_bases=True` gives every target
the same seed, so targets of equal shape share their bases (the NOLA2 behaviour); by default each
target's seed is derived from its path.

Basis generator (`generator`): "hash" (default) is a counter-based integer hash (a 32-bit
avalanche mixer of (seed, stream, element index)) in plain jnp, generated and contracted a
cache-sized chunk of bases at a time inside a `lax.scan` (forward Σ α_i A_i and backward ⟨A_i, dA⟩
alike), so no whole basis bank is ever materialized; "threefry" uses `jax.random` (bit-identical across backends too, but about
an order of magnitude slower on CPU, where basis generation dominates NOLA's step). Both are
deterministic functions of the stored seed. Embedding tables and conv kernels use the LoRA
factored lookup / conv through their (d_in, d_out) matricization.
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp

from lowrank_jax import _kernels
from lowrank_jax import base as base_lib
from lowrank_jax import structured
from lowrank_jax import targeting
from lowrank_jax import tree as tree_lib
from lowrank_jax.adapters import _leafwise

VARIANTS = ("lm", "vit")
GENERATORS = ("hash", "threefry")
_STREAM_A0, _STREAM_A, _STREAM_B = 0, 1, 2


class NOLAState(NamedTuple):
  """Trainable per-leaf state: alpha (k,) and beta (l,) mixing coefficients."""
  alpha: jax.Array
  beta: jax.Array


class NOLASeed(NamedTuple):
  """Frozen per-leaf state: the uint32 seed the bases are regenerated from."""
  seed: jax.Array


# ----------------------------------------------------------------------------------------------
# Bases.
# ----------------------------------------------------------------------------------------------

def _mix32(x):
  """A 32-bit avalanche mixer (xorshift-multiply, "lowbias32"); a bijection of uint32."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def _hash_uniform(seed: jax.Array, stream: int, start, count: int) -> jax.Array:
  """U(−1, 1) fp32 values of the hash stream (seed, stream) at element indices start..start+count."""
  key32 = _mix32(_mix32(seed) ^ jnp.uint32((0x9E3779B9 * (stream + 1)) & 0xFFFFFFFF))
  idx = jax.lax.iota(jnp.uint32, count) + jnp.asarray(start, jnp.uint32)
  bits = _mix32(idx * jnp.uint32(0x9E3779B1) + key32)
  # 23 random mantissa bits -> [1, 2) -> [-1, 1).
  u = jax.lax.bitcast_convert_type((bits >> 9) | jnp.uint32(0x3F800000), jnp.float32)
  return u * 2.0 - 3.0


def basis_bank(seed: jax.Array, stream: int, n: int, shape: tuple[int, ...],
               generator: str = "hash") -> jax.Array:
  """`n` bases of `shape`, i.i.d. U(−1, 1) in fp32, a deterministic function of (seed, stream)."""
  seed = jnp.asarray(seed, jnp.uint32)
  if generator == "threefry":
    key = jax.random.fold_in(jax.random.key(seed), stream)
    return jax.random.uniform(key, (n,) + tuple(shape), jnp.float32, -1.0, 1.0)
  return _hash_uniform(seed, stream, 0, n * math.prod(shape)).reshape((n,) + tuple(shape))


# Bases per chunk in the hash path: a chunk of about this many elements stays in the core's cache.
# Materializing the whole (n, size) bank and then contracting it costs ~5x more on CPU in a whole
# model (every bank is tens of MB of memory traffic); a scan over chunks reuses one small buffer.
_CHUNK_ELEMS = 1 << 17


def _chunks(n: int, size: int) -> tuple[int, int]:
  """(bases per chunk, number of full chunks) for a bank of n bases of `size` elements."""
  per = max(1, min(n, _CHUNK_ELEMS // max(size, 1)))
  return per, n // per


def _hash_contract(coeffs, seed, stream: int, size: int):
  """Σ_i coeffs[i] · basis_i (flat, fp32 or wider), chunk by chunk over the bases."""
  n = coeffs.shape[0]
  per, full = _chunks(n, size)

  def chunk(start, c):
    bank = _hash_uniform(seed, stream, start * size, c.shape[0] * size).reshape(-1, size)
    return c @ bank.astype(c.dtype)

  def body(acc, xs):
    i, c = xs
    return acc + chunk(i * per, c), None

  acc, _ = jax.lax.scan(body, jnp.zeros((size,), coeffs.dtype),
                        (jnp.arange(full, dtype=jnp.uint32), coeffs[:full * per].reshape(full, per)))
  if full * per < n:
    acc = acc + chunk(full * per, coeffs[full * per:])
  return acc


def _hash_project(g, seed, stream: int, n: int):
  """⟨basis_i, g⟩ for i < n (g flat), chunk by chunk over the bases."""
  size = g.shape[0]
  per, full = _chunks(n, size)

  def chunk(start, count):
    return _hash_uniform(seed, stream, start * size, count * size).reshape(count, size).astype(
        g.dtype) @ g

  _, d = jax.lax.scan(lambda _, i: (None, chunk(i * per, per)), None,
                      jnp.arange(full, dtype=jnp.uint32))
  d = d.reshape(full * per)
  if full * per < n:
    d = jnp.concatenate([d, chunk(full * per, n - full * per)])
  return d


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def combine(coeffs: jax.Array, seed: jax.Array, stream: int, shape: tuple[int, ...],
            generator: str) -> jax.Array:
  """Σ_i coeffs[i] · basis_i (fp32, `shape`); the backward regenerates the bases from the seed."""
  dt = jnp.promote_types(coeffs.dtype, jnp.float32)
  seed = jnp.asarray(seed, jnp.uint32)
  if generator == "hash":
    return _hash_contract(coeffs.astype(dt), seed, stream, math.prod(shape)).reshape(shape)
  bank = basis_bank(seed, stream, coeffs.shape[0], shape, generator).astype(dt)
  return jnp.tensordot(coeffs.astype(dt), bank, axes=1)


def _combine_fwd(coeffs, seed, stream, shape, generator):
  return combine(coeffs, seed, stream, shape, generator), (seed, coeffs)


def _combine_bwd(stream, shape, generator, res, g):
  seed, coeffs = res
  n = coeffs.shape[0]
  dt = jnp.promote_types(coeffs.dtype, jnp.float32)
  seed = jnp.asarray(seed, jnp.uint32)
  if generator == "hash":
    d = _hash_project(g.reshape(-1).astype(dt), seed, stream, n)
  else:
    bank = basis_bank(seed, stream, n, shape, generator).astype(dt)
    d = bank.reshape(n, -1) @ g.reshape(-1).astype(dt)
  return d.astype(coeffs.dtype), None


combine.defvjp(_combine_fwd, _combine_bwd)


def nola_factors(alpha, beta, seed, d_in: int, d_out: int, rank: int, variant: str = "lm",
                 generator: str = "hash"):
  """The (d_in, r) and (r, d_out) factors A, B from coefficients and seed (fp32)."""
  k, l = alpha.shape[0], beta.shape[0]
  if variant == "lm":
    dt = jnp.promote_types(alpha.dtype, jnp.float32)
    a0 = basis_bank(seed, _STREAM_A0, 1, (d_in, rank), generator)[0].astype(dt) / math.sqrt(d_in)
    a = a0 + combine(alpha / math.sqrt(k), seed, _STREAM_A, (d_in, rank), generator)
    b = combine(beta / math.sqrt(l), seed, _STREAM_B, (rank, d_out), generator)
  else:
    a = combine(alpha / math.sqrt(d_in), seed, _STREAM_A, (d_in, rank), generator)
    b = combine(beta / math.sqrt(rank), seed, _STREAM_B, (rank, d_out), generator)
  return a, b


@flax.struct.dataclass
class NOLAWeight(structured.Additive):
  """`base + scale · A B` with A, B rebuilt from (alpha, beta, seed) on every use."""
  base: Any
  alpha: jax.Array
  beta: jax.Array
  seed: jax.Array
  rank: int = flax.struct.field(pytree_node=False, default=1)
  scale: float = flax.struct.field(pytree_node=False, default=1.0)
  in_ndim: int = flax.struct.field(pytree_node=False, default=1)
  variant: str = flax.struct.field(pytree_node=False, default="lm")
  generator: str = flax.struct.field(pytree_node=False, default="hash")

  def lowrank(self) -> structured.LowRank:
    """The equivalent `LowRank(base, A, B, scale)` (A, B regenerated)."""
    in_shape, out_shape = self.shape[:self.in_ndim], self.shape[self.in_ndim:]
    a, b = nola_factors(self.alpha, self.beta, self.seed, math.prod(in_shape),
                        math.prod(out_shape), self.rank, self.variant, self.generator)
    return structured.LowRank(self.base, a.reshape(in_shape + (self.rank,)),
                              b.reshape((self.rank,) + out_shape), self.scale)

  def delta(self, dtype=jnp.float32) -> jax.Array:
    return self.lowrank().delta(dtype)

  def matmul(self, x, in_ndim: int = 1):
    if in_ndim != self.in_ndim:
      return super().matmul(x, in_ndim)
    lr = self.lowrank()
    y = structured.dense(x, self.base, in_ndim=in_ndim)
    return y + _kernels.lowrank_branch(x, lr.a, lr.b, self.scale).astype(y.dtype)

  def conv(self, x, **kw):
    return self.lowrank().conv(x, **kw)

  def embed(self, ids):
    return self.lowrank().embed(ids)


@base_lib.records_hparams
def nola(k: int = 512, l: int = 512, rank: int = 8, alpha: Optional[float] = None,
         targets: targeting.Targets = r".*kernel", *, variant: str = "lm",
         shared_bases: bool = False, seed: Optional[int] = None, generator: str = "hash",
         kernel_axes: targeting.AxesSpec = None, dtype=jnp.float32):
  """NOLA on the targeted kernels (see the module docstring).

  Args:
    k: number of A bases (GPT-2/LLaMA default 512).
    l: number of B bases.
    rank: LoRA rank r of A (d_in, r) and B (r, d_out).
    alpha: scale numerator, s = alpha / r; None gives alpha = r ("lm", s = 1) or 1 ("vit", 1/r).
    targets: regex(es) over `/`-joined paths, or a callable `(path, leaf) -> bool`.
    variant: "lm" (A₀ + bases, zero init, identity at init) or "vit" (NOLA2, not identity).
    shared_bases: one seed for all targets (equal-shaped targets share bases).
    seed: base seed (int in [0, 2**32)); None derives it from the init key.
    generator: "hash" (fast fused integer hash, default) or "threefry" (`jax.random`).
    kernel_axes: in/out axes for targets with more than 2 dims (see `targeting.kernel_axes`).
    dtype: coefficient dtype.

  Returns:
    An `Adapter`; trainable parameters k + l per target.

  Raises:
    ValueError: bad k / l / rank / alpha / variant / seed / generator (here), or targets / rank
      too large (at init).

  >>> import jax, jax.numpy as jnp, lowrank_jax as lj
  >>> from lowrank_jax.adapters.nola import nola
  >>> p = {'w': {'kernel': jnp.ones((16, 8))}}
  >>> _, state = nola(32, 16, 4, targets='w/kernel').init(jax.random.key(0), p)
  >>> lj.count_params(state), state.frozen['w']['kernel'].seed.dtype
  (48, dtype('uint32'))
  """
  for nm, v in (("k", k), ("l", l), ("rank", rank)):
    _leafwise.check_int("nola", nm, v)
  if variant not in VARIANTS:
    raise ValueError(f"nola: unknown variant {variant!r}; valid: {VARIANTS}")
  if generator not in GENERATORS:
    raise ValueError(f"nola: unknown generator {generator!r}; valid: {GENERATORS}")
  if alpha is not None and not alpha > 0:
    raise ValueError(f"nola: alpha must be > 0 or None, got {alpha!r}")
  if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                           or not 0 <= seed < 2 ** 32):
    raise ValueError(f"nola: seed must be None or an int in [0, 2**32), got {seed!r}")
  alpha_num = (float(rank) if variant == "lm" else 1.0) if alpha is None else float(alpha)
  scale = alpha_num / rank

  def leaf_seed(key, path):
    if shared_bases:
      if seed is not None:
        return jnp.uint32(seed)
      return jax.random.bits(key, (), jnp.uint32)
    if seed is not None:
      return _mix32(jnp.uint32(seed) ^ jnp.uint32(tree_lib.stable_hash(path)))
    return jax.random.bits(tree_lib.derive_key(key, path), (), jnp.uint32)

  def init(key, params, stats=None):
    # Seeds come from the adapter-level key (shared) or the per-path key; wrap the leafwise init
    # so that the shared seed is one draw for the whole model.
    return inner(key).init(key, params, stats)

  def inner(top_key):
    def init_leaf(key, info, w, stats):
      del w, stats, key
      _leafwise.check_rank("nola", info, rank)
      if max(k, l) * max(info.d_in, info.d_out) * rank >= 2 ** 32:
        raise ValueError(f"nola: k*d*rank must be < 2**32 for {info.path}; reduce k/l or rank")
      if variant == "lm":
        a0, b0 = jnp.zeros((k,), dtype), jnp.zeros((l,), dtype)
      else:
        a0, b0 = jnp.full((k,), 1.0 / k, dtype), jnp.full((l,), 1.0 / l, dtype)
      return None, NOLAState(a0, b0), NOLASeed(leaf_seed(top_key, info.path))
    return _leafwise.leafwise("nola", targets=targets, init_leaf=init_leaf,
                              apply_leaf=apply_leaf, kernel_axes=kernel_axes)

  def apply_leaf(path, base_leaf, t, f, rng):
    del rng
    if f is None:
      raise ValueError(f"nola: no seed for {path}; mismatched state/params trees")
    axes = targeting.kernel_axes(path, tuple(base_leaf.shape), kernel_axes)
    return NOLAWeight(base_leaf, t.alpha, t.beta, f.seed, rank, scale, axes.in_ndim, variant,
                      generator)

  adapter = inner(jax.random.key(0))
  return adapter._replace(init=init)


# ---------------------------------------------------------------------------------------------
# Method facts, read by `lowrank_jax.registry`.
# ---------------------------------------------------------------------------------------------

def _config_kwargs(rank, alpha, targets, total_steps):
  """`rank` is the rank r of the generated factors, with k = l = 16·r random bases each; alpha
  defaults to 2·r (scale 2)."""
  del total_steps
  return dict(k=16 * rank, l=16 * rank, rank=rank,
              alpha=float(2 * rank if alpha is None else alpha), targets=targets)


METHOD_FACTS = {"nola": base_lib.MethodFacts(nola, _config_kwargs)}
