"""KronA (Edalati et al. 2022, https://arxiv.org/abs/2212.10650) and DiffuseKronA (Marjit et al.,
WACV 2025, https://arxiv.org/abs/2402.17412), repo IBM/DiffuseKronA.

KronA replaces LoRA's product B·A by a Kronecker product of two small factors, ΔW = s·(A ⊗ B), which
has full rank up to rank(A)·rank(B) with a1·a2 + b1·b2 parameters. It is applied with the vec trick
(A ⊗ B)·vec(X) = vec(B X Aᵀ): reshape the input and apply the two small factors, never forming ΔW.

Convention (one, tested against `jnp.kron`). In our (d_in, d_out) kernel layout (y = x @ W)::

    ΔW2 = s · jnp.kron(a, b),   a (a2, a1),  b (d_in / a2, d_out / a1),

so the input index is i·b_in + j and the output index p·b_out + q (row-major). In PyTorch's
(d_out, d_in) layout this is ΔW_pt = s·(A ⊗ B) with A = aᵀ ∈ R^{a1×a2} and B = bᵀ, i.e. the paper's
formula with a1 | d_out and a2 | d_in (DiffuseKronA's shapes). The official DiffuseKronA code
computes a column-shuffled variant (B ⊗ Âᵀ)·Π; its checkpoints are not interchangeable with this
convention. The factored product is::

    y = x @ W + s · einsum('tij,ip,jq->tpq', x.reshape(T, a2, b_in), a, b).reshape(T, d_out)

computed as two small matmuls (plus, depending on shapes, inner-axis swaps or the small block
matrix a ⊗ I_{b_out}; `kron_matmul` picks per layer). Trainable parameters: a1·a2 + (d_out/a1)(d_in/a2).

Factor shapes: explicit (`a1`, `a2`), or automatic: for each of d_out and d_in the most balanced
divisor pair (f, dim/f) with f the largest divisor <= √dim (peft LoKr's `factorization(dim, -1)`).
`diffusekrona()` fixes the DiffuseKronA defaults a1 = 64, a2 = 8.

Init (KronA's is UNCONFIRMED; we use DiffuseKronA's): a ~ N(0, (1/a1)²), b = 0, so ΔW = 0; the
scale s (`scale`) defaults to 1 (DiffuseKronA has no α). Embedding tables get a factored lookup; conv
kernels (matricized (kh·kw·c_in, c_out)) use the dense fallback for the conv product.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp

from lowrank_jax import base as base_lib
from lowrank_jax import structured
from lowrank_jax import targeting
from lowrank_jax.adapters import _leafwise

INITS = ("diffusekrona", "lokr")


class KronAState(NamedTuple):
  """Trainable per-leaf state: a (a2, a1), b (d_in/a2, d_out/a1); ΔW2 = s·kron(a, b)."""
  a: jax.Array
  b: jax.Array


def balanced_factor(dim: int) -> int:
  """Largest divisor f of dim with f <= √dim (so (f, dim/f) is the most balanced pair)."""
  f = int(math.isqrt(dim))
  while dim % f:
    f -= 1
  return f


def _divisors(n: int) -> list[int]:
  return [k for k in range(1, n + 1) if n % k == 0]


# ----------------------------------------------------------------------------------------------
# The factored product x2 @ kron(a, b), x2 (T, a_in·b_in), a (a_in, a_out), b (b_in, b_out).
#
# Per token, x is an (a_in, b_in) matrix X_t and y_t = aᵀ X_t b. The b contraction is over the
# minor axis (a plain matmul on x2 reshaped to (T·a_in, b_in)); the a contraction is over a middle
# axis, which row-major 2-D matmuls reach only through an inner-axis transpose ("swap"), or by
# expanding a to the block matrix a ⊗ I_m so the contraction becomes one dense matmul. On CPU a
# swap costs a full memory pass over its array, so we pick per layer (shapes are static) the kernel
# with the least estimated traffic:
#   "swap_out" (b first, then a):  swaps the (T, a_in, b_out) intermediate, and g / y (T·d_out);
#   "swap_in"  (a first, then b):  swaps x / dx (T·d_in; q, k, v share the swap of their common x)
#                                   and the (T, a_out, b_in) intermediate;
#   "expand"   (b first, then (a ⊗ I_{b_out})): no swap, 3·T·(a_in·b_out)·d_out extra MACs; it
#              wins when b_out is small (DiffuseKronA's a1 = 64 gives b_out = 6 on d_out = 384).
# Each has a hand-written backward of the same form (explicit contractions, no d_in×d_out array).
# In the whole MiniLM train step, other per-layer choices (swap_out for q/k/v and swap_in for the
# residual-side layers, or swap_in everywhere) and a swap-free per-token batched matmul all measured
# within the run-to-run noise (±3%) of "auto": XLA:CPU fuses each swap into its elementwise
# neighbours, so its in-step cost is set by what it fuses with more than by its size.
# ----------------------------------------------------------------------------------------------
KRON_IMPLS = ("auto", "swap_out", "swap_in", "expand")
_MACS_PER_SWAPPED_ELEMENT = 128   # a swap ~ one memory pass; measured ~135 MACs/element here


def _swap(h, t, m, n):
  """(t·m, n) rows viewed as (t, m, n) -> (t·n, m) (swap the two inner axes)."""
  return jnp.swapaxes(h.reshape(t, m, n), 1, 2).reshape(t * n, m)


def _expand(a, m):
  """a ⊗ I_m as an (a_in·m, a_out·m) matrix (contracting a over a middle axis of minor size m)."""
  a_in, a_out = a.shape
  return jnp.einsum("ip,qs->iqps", a, jnp.eye(m, dtype=a.dtype)).reshape(a_in * m, a_out * m)


@jax.custom_vjp
def _kron_swap_out(x2, a, b):
  return _kron_swap_out_fwd(x2, a, b)[0]


def _kron_swap_out_fwd(x2, a, b):
  t, (a_in, a_out), (b_in, b_out) = x2.shape[0], a.shape, b.shape
  ht = _swap(x2.reshape(t * a_in, b_in) @ b, t, a_in, b_out)       # (t·b_out, a_in)
  y = _swap(ht @ a, t, b_out, a_out)                                 # (t·a_out, b_out)
  return y.reshape(t, a_out * b_out), (x2, ht, a, b)


def _kron_swap_out_bwd(res, g):
  x2, ht, a, b = res
  t, (a_in, a_out), (b_in, b_out) = x2.shape[0], a.shape, b.shape
  gt = _swap(g.reshape(t * a_out, b_out), t, a_out, b_out)          # (t·b_out, a_out)
  dh = _swap(gt @ a.T, t, b_out, a_in)                               # (t·a_in, b_out)
  db = x2.reshape(t * a_in, b_in).T @ dh
  return (dh @ b.T).reshape(t, a_in * b_in), ht.T @ gt, db


@jax.custom_vjp
def _kron_swap_in(x2, a, b):
  return _kron_swap_in_fwd(x2, a, b)[0]


def _kron_swap_in_fwd(x2, a, b):
  t, (a_in, a_out), (b_in, b_out) = x2.shape[0], a.shape, b.shape
  xt = _swap(x2, t, a_in, b_in)                                      # (t·b_in, a_in)
  ut = _swap(xt @ a, t, b_in, a_out)                                 # (t·a_out, b_in)
  return (ut @ b).reshape(t, a_out * b_out), (xt, ut, a, b)


def _kron_swap_in_bwd(res, g):
  xt, ut, a, b = res
  (a_in, a_out), (b_in, b_out) = a.shape, b.shape
  t = xt.shape[0] // b_in
  g2 = g.reshape(t * a_out, b_out)
  du = _swap(g2 @ b.T, t, a_out, b_in)                               # (t·b_in, a_out)
  dx = _swap(du @ a.T, t, b_in, a_in).reshape(t, a_in * b_in)
  return dx, xt.T @ du, ut.T @ g2


@jax.custom_vjp
def _kron_expand(x2, a, b):
  return _kron_expand_fwd(x2, a, b)[0]


def _kron_expand_fwd(x2, a, b):
  t, (a_in, a_out), (b_in, b_out) = x2.shape[0], a.shape, b.shape
  h2 = (x2.reshape(t * a_in, b_in) @ b).reshape(t, a_in * b_out)
  return h2 @ _expand(a, b_out), (x2, h2, a, b)


def _kron_expand_bwd(res, g):
  x2, h2, a, b = res
  t, (a_in, a_out), (b_in, b_out) = x2.shape[0], a.shape, b.shape
  dh = (g @ _expand(a, b_out).T).reshape(t * a_in, b_out)
  m = (h2.T @ g).reshape(a_in, b_out, a_out, b_out)
  da = jnp.einsum("iqpq->ip", m)                      # the a ⊗ I_{b_out} blocks' traces
  db = x2.reshape(t * a_in, b_in).T @ dh
  return (dh @ b.T).reshape(t, a_in * b_in), da, db


_kron_swap_out.defvjp(_kron_swap_out_fwd, _kron_swap_out_bwd)
_kron_swap_in.defvjp(_kron_swap_in_fwd, _kron_swap_in_bwd)
_kron_expand.defvjp(_kron_expand_fwd, _kron_expand_bwd)
_KERNELS = {"swap_out": _kron_swap_out, "swap_in": _kron_swap_in, "expand": _kron_expand}


def kron_impl(a_shape: tuple[int, int], b_shape: tuple[int, int]) -> str:
  """The kernel "auto" picks for factors of these shapes (least estimated cost per token)."""
  (a_in, a_out), (b_in, b_out) = a_shape, b_shape
  d_in, d_out = a_in * b_in, a_out * b_out
  cost = {"swap_in": (2 * a_out * b_in + 2 * d_in) * _MACS_PER_SWAPPED_ELEMENT,
          "swap_out": (2 * a_in * b_out + 2 * d_out) * _MACS_PER_SWAPPED_ELEMENT,
          "expand": 3 * a_in * b_out * d_out}
  return min(cost, key=cost.get)      # ties keep this order: swap_in, swap_out, expand


def kron_matmul(x2: jax.Array, a: jax.Array, b: jax.Array, impl: str = "auto") -> jax.Array:
  """`x2 @ kron(a, b)` for x2 (T, a_in·b_in) with the vec trick; never a d_in×d_out array.

  `impl` is one of `KRON_IMPLS` (see the comment above); "auto" picks by `kron_impl`.
  """
  if impl not in KRON_IMPLS:
    raise ValueError(f"krona: unknown impl {impl!r}; valid: {KRON_IMPLS}")
  if impl == "auto":
    impl = kron_impl(a.shape, b.shape)
  return _KERNELS[impl](x2, a, b)


@flax.struct.dataclass
class Kron(structured.Additive):
  """`base + scale · kron(a, b)` on the matricized kernel (first `in_ndim` axes are inputs)."""
  base: Any
  a: jax.Array
  b: jax.Array
  scale: float = flax.struct.field(pytree_node=False, default=1.0)
  in_ndim: int = flax.struct.field(pytree_node=False, default=1)
  impl: str = flax.struct.field(pytree_node=False, default="auto")

  def delta(self, dtype=jnp.float32) -> jax.Array:
    dt = structured.compute_dtype(dtype, self.a, self.b, self.scale)
    d = jnp.kron(self.a.astype(dt), self.b.astype(dt)) * jnp.asarray(self.scale, dt)
    return d.reshape(self.shape)

  def matmul(self, x, in_ndim: int = 1):
    if in_ndim != self.in_ndim:
      return super().matmul(x, in_ndim)
    y = structured.dense(x, self.base, in_ndim=in_ndim)
    in_shape, out_shape = self.shape[:in_ndim], self.shape[in_ndim:]
    lead = x.shape[:x.ndim - in_ndim]
    x2 = x.reshape(-1, math.prod(in_shape))
    a = self.a.astype(x.dtype)
    b = (self.b * self.scale).astype(x.dtype)
    d = kron_matmul(x2, a, b, self.impl).reshape(lead + tuple(out_shape))
    return y + d.astype(y.dtype)

  def embed(self, ids):
    if self.in_ndim != 1:
      return super().embed(ids)
    y = structured.embed(ids, self.base)
    b_in = self.b.shape[0]
    ra = jnp.take(self.a, ids // b_in, axis=0)                       # (..., a1)
    rb = jnp.take(self.b, ids % b_in, axis=0) * self.scale           # (..., b_out)
    d = (ra[..., :, None] * rb[..., None, :]).reshape(ids.shape + (-1,))
    return y + d.astype(y.dtype)


@base_lib.records_hparams
def krona(a1: Optional[int] = None, a2: Optional[int] = None,
          targets: targeting.Targets = r".*kernel", *, scale: float = 1.0,
          init: str = "diffusekrona", kernel_axes: targeting.AxesSpec = None,
          impl: str = "auto", dtype=jnp.float32):
  """KronA / DiffuseKronA on the targeted kernels (see the module docstring for the convention).

  Args:
    a1: output factor of a (a1 must divide d_out of every target); None picks the balanced
      divisor of d_out per target.
    a2: input factor of a (a2 must divide d_in); None picks the balanced divisor of d_in.
    targets: regex(es) over `/`-joined paths, or a callable `(path, leaf) -> bool`.
    scale: s in ΔW = s·kron(a, b).
    init: "diffusekrona" (a ~ N(0, 1/a1²), b = 0) or "lokr" (a = 0, b kaiming-uniform, peft LoKr).
    kernel_axes: in/out axes for targets with more than 2 dims (see `targeting.kernel_axes`).
    impl: the factored-product kernel, one of `KRON_IMPLS`: "auto" (default: per layer, the one
      with the least estimated memory traffic, `kron_impl`), "swap_out", "swap_in" or "expand".
      All compute the same product; only speed differs.
    dtype: adapter parameter dtype.

  Returns:
    An `Adapter`; trainable parameters a1·a2 + (d_out/a1)(d_in/a2) per target.

  Raises:
    ValueError: bad a1 / a2 / scale / init / impl (here); a1 ∤ d_out or a2 ∤ d_in (at init, naming the
      path and the valid divisors).

  >>> import jax, jax.numpy as jnp, lowrank_jax as lj
  >>> from lowrank_jax.adapters.krona import krona
  >>> p = {'w': {'kernel': jnp.zeros((640, 640))}}
  >>> _, state = krona(64, 8, 'w/kernel').init(jax.random.key(0), p)
  >>> lj.count_params(state)
  1312
  """
  for nm, v in (("a1", a1), ("a2", a2)):
    _leafwise.check_int("krona", nm, v, allow_none=True)
  if not isinstance(scale, (int, float)):
    raise ValueError(f"krona: scale must be a float, got {scale!r}")
  if init not in INITS:
    raise ValueError(f"krona: unknown init {init!r}; valid: {INITS}")
  if impl not in KRON_IMPLS:
    raise ValueError(f"krona: unknown impl {impl!r}; valid: {KRON_IMPLS}")

  def init_leaf(key, info, w, stats):
    del w, stats
    f1 = balanced_factor(info.d_out) if a1 is None else a1
    f2 = balanced_factor(info.d_in) if a2 is None else a2
    if info.d_out % f1:
      raise ValueError(f"krona: a1={f1} does not divide d_out={info.d_out} of {info.path} "
                       f"(shape {info.shape}); valid a1: {_divisors(info.d_out)}")
    if info.d_in % f2:
      raise ValueError(f"krona: a2={f2} does not divide d_in={info.d_in} of {info.path} "
                       f"(shape {info.shape}); valid a2: {_divisors(info.d_in)}")
    b_shape = (info.d_in // f2, info.d_out // f1)
    ka, kb = jax.random.split(key)
    if init == "diffusekrona":
      a = jax.random.normal(ka, (f2, f1), dtype) / f1
      b = jnp.zeros(b_shape, dtype)
    else:
      a = jnp.zeros((f2, f1), dtype)
      bound = 1.0 / math.sqrt(b_shape[0])
      b = jax.random.uniform(kb, b_shape, dtype, -bound, bound)
    return None, KronAState(a, b), None

  def apply_leaf(path, base_leaf, t, f, rng):
    del f, rng
    axes = targeting.kernel_axes(path, tuple(base_leaf.shape), kernel_axes)
    _leafwise.check_state_shape("krona", path, base_leaf,
                                (t.a.shape[0] * t.b.shape[0], t.a.shape[1] * t.b.shape[1]),
                                in_ndim=axes.in_ndim)
    return Kron(base_leaf, t.a, t.b, float(scale), axes.in_ndim, impl)

  return _leafwise.leafwise("krona", targets=targets, init_leaf=init_leaf, apply_leaf=apply_leaf,
                            kernel_axes=kernel_axes)


@base_lib.records_hparams
def diffusekrona(a1: int = 64, a2: int = 8, targets: targeting.Targets = r".*kernel", **kwargs):
  """DiffuseKronA: `krona` with the official defaults a1 = 64, a2 = 8 and its init."""
  kwargs.setdefault("init", "diffusekrona")
  return krona(a1, a2, targets, **kwargs)


# ---------------------------------------------------------------------------------------------
# Method facts, read by `lowrank_jax.registry`.
# ---------------------------------------------------------------------------------------------

def _config_kwargs(rank, alpha, targets, total_steps):
  """KronA has no rank or alpha: the factor shapes come from each kernel; `rank` is ignored."""
  del rank, alpha, total_steps
  return dict(targets=targets)


METHOD_FACTS = {
    "krona": base_lib.MethodFacts(krona, _config_kwargs),
    "diffusekrona": base_lib.MethodFacts(diffusekrona, _config_kwargs),
}
