"""LoLDU (Shi et al. 2024, https://arxiv.org/abs/2410.13618), repo SKDDJ/LoLDU.

LoLDU factors the *pretrained* weight with an LU decomposition with partial pivoting, rewritten as
P·L·D·U (L unit lower-trapezoidal, D diagonal, U unit upper-trapezoidal). The first r elimination
steps (partial-pivoting order, not the r largest D_i) give a frozen rank-r basis P·L_r and U_r; only
the r diagonal entries z (init z₀ = D_r) are trained. The frozen residual is
W_res = W − σ·P L_r diag(z₀) U_r and the effective weight W' = W_res + σ·P L_r diag(z) U_r, so
W' = W at init; σ = alpha / r (the official `from_linear` uses alpha = 1, so σ = 1/r). The adapter
has r trainable parameters per layer (r + 1 with `train_sigma=True`).

Orientation and layout. As the official code, the LU is taken of the PyTorch-layout weight
W_pt = W2ᵀ (d_out × d_in), where W2 is our kernel matricized to (d_in, d_out): W_pt[perm] = L·U₀,
i.e. W_pt = P L U₀ with P[perm[i], i] = 1. `perm` is stored as an int32 index vector (never a dense
P) and P·L_r is formed in-step by a scatter of L_r's rows (d_out × r). In our (d_in, d_out) layout
ΔW2 = σ·U_rᵀ diag(z) (P L_r)ᵀ, and the factored product is::

    x @ W_res + ((x @ U_rᵀ) * σz) @ (P L_r)ᵀ

(three skinny products, hand-written backward; no d_in×d_out array). The LU runs in fp32.

Choices the paper leaves open: σ is frozen by default, as the official code's trainable filter
does (`train_sigma=True` makes it trainable: r + 1 parameters per layer); other `init` values than
"lu" are offered as in the code, but where the code builds the residual with D_r and then
re-initializes z (so W' ≠ W at init), we build it with the same z₀, so W' = W at init for every
init. Any kernel can be targeted (dense, embedding, conv with `kernel_axes`), through its
(d_in, d_out) matricization.
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

INITS = ("lu", "uniform", "s_uniform", "normal", "s_normal", "constant", "ones", "zeros")


class LoLDUState(NamedTuple):
  """Trainable per-leaf state: z (r,) and, with `train_sigma=True`, the scalar sigma."""
  z: jax.Array
  sigma: Optional[jax.Array] = None


class LoLDUFrozen(NamedTuple):
  """Frozen per-leaf buffers: ut = U_rᵀ `(*in, r)`, l = L_r (d_out, r), perm (d_out,) int32."""
  ut: jax.Array
  l: jax.Array
  perm: jax.Array


def pivoted_ldu(w_pt: jax.Array):
  """Partial-pivoting LU of a (m, n) matrix rewritten as LDU, in fp32.

  Returns `(perm, l, d, u)` with `w_pt[perm] = l @ diag(d) @ u`, i.e. `w_pt = P l diag(d) u` with
  `P[perm[i], i] = 1`; l (m, k) unit lower-trapezoidal, d (k,), u (k, n) unit upper-trapezoidal,
  k = min(m, n). Zero pivots leave the corresponding row of u as the row of U₀ (d = 0 there).
  """
  w_pt = jnp.asarray(w_pt, jnp.float32)
  m, n = w_pt.shape
  k = min(m, n)
  lu, _, perm = jax.lax.linalg.lu(w_pt)
  l = jnp.tril(lu[:, :k], -1) + jnp.eye(m, k, dtype=jnp.float32)
  u0 = jnp.triu(lu[:k, :])
  d = jnp.diagonal(u0)
  u = u0 / jnp.where(d == 0, 1.0, d)[:, None]
  return perm.astype(jnp.int32), l, d, u


def permute_rows(l: jax.Array, perm: jax.Array) -> jax.Array:
  """P @ l for the permutation with P[perm[i], i] = 1, as a scatter (no dense P)."""
  return jnp.zeros_like(l).at[perm].set(l)


@flax.struct.dataclass
class LoLDUWeight(structured.DiagLowRank):
  """`base + sigma · U_rᵀ diag(z) (P L_r)ᵀ` in the (d_in, d_out) layout (base = W_res)."""
  base: Any
  z: jax.Array
  ut: jax.Array
  l: jax.Array
  perm: jax.Array
  sigma: Any = 1.0

  def _factors(self):
    r = self.z.shape[0]
    out_shape = tuple(self.base.shape[self.ut.ndim - 1:])
    b = permute_rows(self.l, self.perm).T.reshape((r,) + out_shape)
    return self.ut, self.z * self.sigma, b


def _init_z(key, method: str, d_r: jax.Array) -> jax.Array:
  r = d_r.shape[0]
  mean, std = jnp.mean(d_r), jnp.std(d_r)
  if method == "lu":
    return d_r
  if method == "uniform":
    half = jnp.abs(mean) / 2
    return jax.random.uniform(key, (r,), jnp.float32, -1.0, 1.0) * half
  if method == "s_uniform":
    return jax.random.uniform(key, (r,), jnp.float32, -1.0, 1.0)
  if method == "normal":
    return mean + std * jax.random.normal(key, (r,), jnp.float32)
  if method == "s_normal":
    return jax.random.normal(key, (r,), jnp.float32)
  if method == "constant":
    return jnp.full((r,), mean, jnp.float32)
  if method == "ones":
    return jnp.ones((r,), jnp.float32)
  return jnp.zeros((r,), jnp.float32)


@base_lib.records_hparams
def loldu(rank: int = 4, alpha: float = 1.0, targets: targeting.Targets = r".*kernel", *,
          init: str = "lu", train_sigma: bool = False, kernel_axes: targeting.AxesSpec = None,
          dtype=jnp.float32):
  """LoLDU on the targeted kernels (see the module docstring).

  Args:
    rank: number r of leading pivots kept (1 <= r <= min(d_in, d_out)); class default 4.
    alpha: σ = alpha / r (official default alpha = 1).
    targets: regex(es) over `/`-joined paths, or a callable `(path, leaf) -> bool`.
    init: z₀: "lu" (z₀ = D_r, the default) or one of the code's other options "uniform",
      "s_uniform", "normal", "s_normal", "constant", "ones", "zeros". The residual always uses z₀.
    train_sigma: also train σ (one scalar per layer).
    kernel_axes: in/out axes for targets with more than 2 dims (see `targeting.kernel_axes`).
    dtype: dtype of z and of the frozen L_r / U_r buffers.

  Returns:
    An `Adapter`. Trainable parameters: r per target (+1 with `train_sigma`).

  Raises:
    ValueError: bad rank / alpha / init (here), targets or rank too large (at init).

  >>> import jax, jax.numpy as jnp, lowrank_jax as lj
  >>> from lowrank_jax.adapters.loldu import loldu
  >>> p = {'w': {'kernel': jax.random.normal(jax.random.key(0), (6, 4))}}
  >>> base, state = loldu(3, targets='w/kernel').init(jax.random.key(1), p)
  >>> lj.count_params(state), state.frozen['w']['kernel'].perm.dtype
  (3, dtype('int32'))
  """
  _leafwise.check_int("loldu", "rank", rank)
  if not (isinstance(alpha, (int, float)) and alpha > 0):
    raise ValueError(f"loldu: alpha must be a float > 0, got {alpha!r}")
  if init not in INITS:
    raise ValueError(f"loldu: unknown init {init!r}; valid: {INITS}")
  sigma0 = float(alpha) / rank

  def init_leaf(key, info, w, stats):
    del stats
    _leafwise.check_rank("loldu", info, rank)
    _leafwise.check_finite_weight("loldu", info, w)
    w2 = w.reshape(info.d_in, info.d_out).astype(jnp.float32)
    perm, l, d, u = pivoted_ldu(w2.T)
    l_r, u_r = l[:, :rank], u[:rank]
    z0 = _init_z(key, init, d[:rank])
    delta = sigma0 * ((u_r.T * z0) @ permute_rows(l_r, perm).T)     # (d_in, d_out)
    resid = (w2 - delta).reshape(info.shape).astype(info.dtype)
    ut = u_r.T.reshape(info.in_shape + (rank,)).astype(dtype)
    sigma = jnp.asarray(sigma0, dtype) if train_sigma else None
    return resid, LoLDUState(z0.astype(dtype), sigma), LoLDUFrozen(ut, l_r.astype(dtype), perm)

  def apply_leaf(path, base_leaf, t, f, rng):
    del rng
    if f is None:
      raise ValueError(f"loldu: no frozen buffers for {path}; mismatched state/params trees")
    n_in = f.ut.ndim - 1
    _leafwise.check_state_shape("loldu", path, base_leaf,
                                (math.prod(f.ut.shape[:-1]), f.l.shape[0]), in_ndim=n_in)
    sigma = t.sigma if train_sigma else sigma0
    return LoLDUWeight(base_leaf, t.z, f.ut, f.l, f.perm, sigma)

  return _leafwise.leafwise("loldu", targets=targets, init_leaf=init_leaf, apply_leaf=apply_leaf,
                            kernel_axes=kernel_axes)


# ---------------------------------------------------------------------------------------------
# Method facts, read by `lowrank_jax.registry`.
# ---------------------------------------------------------------------------------------------

def _config_kwargs(rank, alpha, targets, total_steps):
  """`rank` is the number r of pivots kept; alpha is LoLDU's own (default 1) and not set here."""
  del alpha, total_steps
  return dict(rank=rank, targets=targets)


METHOD_FACTS = {"loldu": base_lib.MethodFacts(loldu, _config_kwargs, residual_init=True)}
