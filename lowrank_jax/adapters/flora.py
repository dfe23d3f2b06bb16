"""FLoRA: low-rank core space for N-dimensional parameters (Si et al. 2024,
https://arxiv.org/abs/2405.14739), repo SJTU-DeepVisionLab/FLoRA.

FLoRA gives every N-dimensional kernel a Tucker-form update: a small core tensor G plus one factor
matrix per mode, ΔW = s · G ×₁ U₁ ×₂ U₂ … ×_N U_N, so a conv kernel keeps its spatial structure
instead of being flattened to a matrix. For a 2-D kernel this is ΔW = s·U_in G U_outᵀ (in PyTorch
layout: s·U_out Gᵀ U_inᵀ). Init follows the official code: G = 0 (ΔW = 0 at init) and
factors kaiming-normal with a = √3, i.e. U_i ~ N(0, 1/(2 r_i)). Trainable parameters:
Σ_i n_i·r_i + Π_i r_i. (The Subspace-Tuning NLP variant, ΔW = (α/r)·B G A, is the 2-D case with
`scale = alpha / r`; only its factor init differs.)

Layout: modes follow our kernel axes, e.g. a conv kernel (kh, kw, c_in, c_out) has
G (r_kh, r_kw, r_in, r_out), U_kh (kh, r_kh), …, U_out (c_out, r_out) — the official code's
(r_in, r_out, r_k1, r_k2) core in a different mode order (the update is the same tensor).

Factored products (never the full ΔW in the step):
  dense: x contracted mode by mode with the input factors (→ r_1…r_m), then the core, then the
    output factors — skinny products only;
  conv (N-D kernels with all-but-last input axes, groups = 1): a 1×1 projection c_in → r_in, a
    conv with the small "core-space" kernel G ×_spatial U_k (kh, kw, r_in, r_out) using the base
    layer's stride/padding/dilation, then r_out → c_out. This equals conv(x, ΔW) because the
    channel maps are pointwise and commute with zero padding;

  embed: rows of U_in, then the core and U_outᵀ.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence, Union

import flax.struct
import jax
import jax.numpy as jnp

from lowrank_jax import base as base_lib
from lowrank_jax import structured
from lowrank_jax import targeting
from lowrank_jax.adapters import _leafwise


class FLoRAState(NamedTuple):
  """Trainable per-leaf state: core G (r_1, …, r_N) and factors (U_1 (n_1, r_1), …)."""
  core: jax.Array
  factors: tuple


def tucker_product(core: jax.Array, factors: Sequence[jax.Array]) -> jax.Array:
  """G ×₁ U₁ ×₂ U₂ … ×_N U_N, shape (n_1, …, n_N)."""
  t = core
  for u in factors:
    t = jnp.tensordot(t, u, axes=([0], [1]))       # consumes the leading mode, appends n_i
  return t


def tucker_ranks(rank: Union[int, Sequence[int]], shape: tuple[int, ...], path: str):
  """Per-mode ranks of a kernel of `shape`: an int `rank` capped by each mode size, or one rank
  per mode checked to lie in [1, n_i] (ValueError naming `path` otherwise)."""
  if isinstance(rank, int):
    return tuple(min(rank, n) for n in shape)
  rank = tuple(rank)
  if len(rank) != len(shape):
    raise ValueError(f"flora: rank {rank} has {len(rank)} entries but {path} has {len(shape)} "
                     f"modes (shape {shape}); give one rank per mode or an int")
  for r, n in zip(rank, shape):
    if not 1 <= r <= n:
      raise ValueError(f"flora: rank {rank} for {path} (shape {shape}): each r_i must be in "
                       f"[1, n_i]")
  return rank


@flax.struct.dataclass
class Tucker(structured.Additive):
  """`base + scale · core ×₁ U₁ … ×_N U_N` (modes in kernel-axis order, first `in_ndim` inputs)."""
  base: Any
  core: jax.Array
  factors: tuple
  scale: float = flax.struct.field(pytree_node=False, default=1.0)
  in_ndim: int = flax.struct.field(pytree_node=False, default=1)

  def delta(self, dtype=jnp.float32) -> jax.Array:
    dt = structured.compute_dtype(dtype, self.core, self.scale, *self.factors)
    return tucker_product(self.core.astype(dt) * jnp.asarray(self.scale, dt),
                          [u.astype(dt) for u in self.factors])

  def _branch(self, x, m):
    """Factored x ⋅ ΔW contracting the last m axes of x with the first m modes."""
    lead = x.shape[:x.ndim - m]
    dt = x.dtype
    h = x.reshape((-1,) + x.shape[x.ndim - m:])
    for u in self.factors[:m]:
      h = jnp.tensordot(h, u.astype(dt), axes=([1], [0]))      # (T, rest…, r_1…r_i)
    core = (self.core * self.scale).astype(dt)
    h = jnp.tensordot(h, core, axes=(list(range(1, m + 1)), list(range(m))))
    for u in self.factors[m:]:
      h = jnp.tensordot(h, u.astype(dt), axes=([1], [1]))      # (T, rest…, n_j)
    return h.reshape(lead + self.shape[m:])

  def matmul(self, x, in_ndim: int = 1):
    if in_ndim != self.in_ndim:
      return super().matmul(x, in_ndim)
    y = structured.dense(x, self.base, in_ndim=in_ndim)
    return y + self._branch(x, in_ndim).astype(y.dtype)

  def conv(self, x, *, strides=1, padding="SAME", dilation=1, feature_group_count=1):
    n = self.ndim
    if feature_group_count != 1 or n < 3 or self.in_ndim != n - 1:
      return super().conv(x, strides=strides, padding=padding, dilation=dilation,
                          feature_group_count=feature_group_count)
    dt = x.dtype
    y = structured.conv(x, self.base, strides=strides, padding=padding, dilation=dilation)
    *u_sp, u_in, u_out = [u.astype(dt) for u in self.factors]
    # Core-space kernel: spatial modes expanded, channel modes kept at rank (kh, kw, r_in, r_out).
    k = (self.core * self.scale).astype(dt)
    for u in u_sp:
      k = jnp.tensordot(k, u, axes=([0], [1]))                   # (..., r_in, r_out, k_i)
    k = jnp.moveaxis(k, (0, 1), (-2, -1))                        # (k_1…k_s, r_in, r_out)
    h = x @ u_in                                                 # (N, *sp, r_in)
    h = structured.conv(h, k, strides=strides, padding=padding, dilation=dilation)
    return y + (h @ u_out.T).astype(y.dtype)

  def embed(self, ids):
    if self.ndim != 2 or self.in_ndim != 1:
      return super().embed(ids)
    y = structured.embed(ids, self.base)
    u_in, u_out = self.factors
    h = jnp.take(u_in, ids, axis=0) @ (self.core * self.scale)
    return y + (h @ u_out.T).astype(y.dtype)


@base_lib.records_hparams
def flora(rank: Union[int, Sequence[int]] = 8, targets: targeting.Targets = r".*kernel", *,
          scale: float = 1.0, kernel_axes: targeting.AxesSpec = None, dtype=jnp.float32):
  """FLoRA (Tucker) on the targeted kernels, N-D kernels kept N-D (see the module docstring).

  Args:
    rank: an int r (every mode gets r_i = min(r, n_i)) or one rank per kernel mode (all targets
      must then have that many modes), e.g. (2, 2, 16, 16) for a (3, 3, c_in, c_out) conv.
    targets: regex(es) over `/`-joined paths, or a callable `(path, leaf) -> bool`.
    scale: s in ΔW = s · G ×₁ U₁ … (layer default 1.0; the ConvNeXt example uses 4.0).
    kernel_axes: in/out axes for targets with more than 2 dims; conv kernels need "conv".
    dtype: adapter parameter dtype.

  Returns:
    An `Adapter`; trainable parameters Σ n_i·r_i + Π r_i per target.

  Raises:
    ValueError: bad rank / scale (here) or per-target ranks (at init).

  >>> import jax, jax.numpy as jnp, lowrank_jax as lj
  >>> from lowrank_jax.adapters.flora import flora
  >>> p = {'conv': {'kernel': jnp.ones((3, 3, 16, 32))}}
  >>> _, st = flora((2, 2, 4, 4), 'conv/kernel', kernel_axes='conv').init(jax.random.key(0), p)
  >>> lj.count_params(st) == 3*2 + 3*2 + 16*4 + 32*4 + 2*2*4*4
  True
  """
  if isinstance(rank, bool) or (isinstance(rank, int) and rank < 1):
    raise ValueError(f"flora: rank must be an int >= 1 or a tuple of per-mode ranks, got {rank!r}")
  if not isinstance(rank, int):
    try:
      rank = tuple(int(r) for r in rank)
    except TypeError:
      raise ValueError(f"flora: rank must be an int or a sequence of ints, got {rank!r}") from None
    if not rank or min(rank) < 1:
      raise ValueError(f"flora: every per-mode rank must be >= 1, got {rank!r}")
  if not isinstance(scale, (int, float)):
    raise ValueError(f"flora: scale must be a float, got {scale!r}")

  def init_leaf(key, info, w, stats):
    del w, stats
    ranks = tucker_ranks(rank, info.shape, info.path)
    keys = jax.random.split(key, len(ranks))
    factors = tuple(jax.random.normal(kk, (n, r), dtype) / math.sqrt(2.0 * r)
                    for kk, n, r in zip(keys, info.shape, ranks))
    return None, FLoRAState(jnp.zeros(ranks, dtype), factors), None

  def apply_leaf(path, base_leaf, t, f, rng):
    del f, rng
    _leafwise.check_state_shape("flora", path, base_leaf, tuple(u.shape[0] for u in t.factors))
    axes = targeting.kernel_axes(path, tuple(base_leaf.shape), kernel_axes)
    return Tucker(base_leaf, t.core, tuple(t.factors), float(scale), axes.in_ndim)

  return _leafwise.leafwise("flora", targets=targets, init_leaf=init_leaf, apply_leaf=apply_leaf,
                            kernel_axes=kernel_axes)


# ---------------------------------------------------------------------------------------------
# Method facts, read by `lowrank_jax.registry`.
# ---------------------------------------------------------------------------------------------

def _config_kwargs(rank, alpha, targets, total_steps):
  """`rank` is every Tucker mode's rank r (capped by the mode size); FLoRA has no alpha."""
  del alpha, total_steps
  return dict(rank=rank, targets=targets)


METHOD_FACTS = {"flora": base_lib.MethodFacts(flora, _config_kwargs)}
