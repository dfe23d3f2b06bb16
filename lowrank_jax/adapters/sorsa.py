"""SORSA (Cao et al. 2024, https://arxiv.org/abs/2409.00055), repo Gunale0926/SORSA.

SORSA is a PiSSA-style principal-SVD adapter kept in explicit U, Σ, V form. The SVD of the
pretrained weight (fp32) splits it into a trainable principal part W_p = U_p diag(S_p) V_pᵀ (top r
triplets) and a frozen residual W_r = W − s·W_p; the effective weight is W' = W_r + s·U_p diag(S_p)
V_pᵀ, so W' = W at init. An orthonormality regularizer keeps the singular vectors orthonormal so
that scaling moves into S_p: L_reg is the mean, over all 2n adapted matrices of the n targets, of
‖U_pᵀU_p − I‖_F and ‖V_pᵀV_p − I‖_F (Frobenius norms, *not* squared), as the official `calc_ortho`
(sum of the norms divided by the number of matrices). PiSSA (`lowrank_jax.pissa`) is its
comparator.

Layout. Our kernels are stored (d_in, d_out) (y = x @ W), i.e. Wᵀ in PyTorch's (d_out, d_in) layout.
With the paper's U_p (d_out, r), S_p (r,), V_p (d_in, r) we store::

  a = V_p          (*in_shape, r)   (the official `sorsa_A`ᵀ)
  s = S_p          (r,)
  b = U_pᵀ         (r, *out_shape)  (the official `sorsa_B`ᵀ)

and ΔW = scale · a diag(s) b. The factored product is x@W_r + scale·((x@a)·s)@b with a
hand-written backward of skinny contractions (`structured.DiagLowRank`), never a d_in×d_out array.

How γ enters. The official trainer back-propagates `(gamma / learning_rate)·L_reg` after clipping
the task gradient, where `learning_rate` is the run's configured (peak) learning rate η_base, not
the scheduled one; with γ = 4e-4 (the official default and scripts, lr 3e-5 there). Under SGD this
is the paper's update θ ← θ − η_t∇L_task − (η_t/η_base)·γ∇L_reg: the regularizer moves by γ at
the peak learning rate whatever η_base is. `adapter.penalty(state)` returns (γ/η_base)·L_reg with
`base_lr=η_base`, the official recipe; pass the learning rate the run uses. Without `base_lr` the
weight is γ itself (η_base = 1), which is not the official recipe unless the run's learning rate
is 1. Gradient clipping order is the trainer's business (here the penalty is clipped with the task
gradient). The norm uses a safe square root: its gradient is 0 (not NaN) where U_pᵀU_p = I
exactly.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp

from lowrank_jax import base as base_lib
from lowrank_jax import structured
from lowrank_jax import targeting
from lowrank_jax.adapters import _leafwise
from lowrank_jax.adapters import _lowrank

DEFAULT_GAMMA = 4e-4


# ----------------------------------------------------------------------------------------------
# SORSA.
# ----------------------------------------------------------------------------------------------

class SORSAState(NamedTuple):
  """Trainable per-leaf state: a = V_p `(*in_shape, r)`, s = S_p (r,), b = U_pᵀ `(r, *out)`."""
  a: jax.Array
  s: jax.Array
  b: jax.Array


@flax.struct.dataclass
class SORSAWeight(structured.DiagLowRank):
  """`base + scale · a diag(s) b` (base is the frozen residual W_r)."""
  base: Any
  a: jax.Array
  s: jax.Array
  b: jax.Array
  scale: float = flax.struct.field(pytree_node=False, default=1.0)

  def _factors(self):
    return self.a, self.s * self.scale, self.b


def orthonormal_regularizer(a: jax.Array, b: jax.Array) -> jax.Array:
  """(‖aᵀa − I‖_F + ‖b bᵀ − I‖_F) / 2 for a `(*in, r)` = V_p and b `(r, *out)` = U_pᵀ (not squared).

  The mean over the module's two matrices; its mean over modules is the official average over
  all adapted matrices.
  """
  ra, rb = _lowrank.orth_residuals(a, b)
  return 0.5 * (ra + rb)


@base_lib.records_hparams
def sorsa(rank: int = 8, alpha: Optional[float] = None, targets: targeting.Targets = r".*kernel",
          *, gamma: float = DEFAULT_GAMMA, base_lr: Optional[float] = None,
          kernel_axes: targeting.AxesSpec = None, dtype=jnp.float32):
  """SORSA on the targeted kernels (see the module docstring for layout and γ).

  Args:
    rank: number r of principal singular triplets made trainable (1 <= r <= min(d_in, d_out)).
    alpha: if given, scale s = alpha / r; None gives s = 1 (the official scripts).
    targets: regex(es) over `/`-joined paths, or a callable `(path, leaf) -> bool`.
    gamma: orthonormal-regularizer strength γ >= 0 (official default 4e-4).
    base_lr: the run's configured (peak) learning rate η_base; `penalty` returns (γ/η_base)·L_reg,
      the official trainer's weight. None gives γ·L_reg (η_base = 1, not the official recipe).
    kernel_axes: in/out axes for targets with more than 2 dims (see `targeting.kernel_axes`).
    dtype: adapter parameter dtype (fp32 by default).

  Returns:
    An `Adapter` whose `penalty` is the weighted orthonormal regularizer averaged over targets.
    Trainable parameters: r·(d_in + d_out + 1) per target.

  Raises:
    ValueError: bad rank / alpha / gamma / base_lr (here) or targets / rank too large (at init).

  >>> import jax, jax.numpy as jnp, lowrank_jax as lj
  >>> from lowrank_jax.adapters.sorsa import sorsa
  >>> p = {'w': {'kernel': jax.random.normal(jax.random.key(0), (6, 4))}}
  >>> base, state = sorsa(2, targets='w/kernel').init(jax.random.key(1), p)
  >>> lj.count_params(state)
  22
  """
  _leafwise.check_int("sorsa", "rank", rank)
  if alpha is not None and not alpha > 0:
    raise ValueError(f"sorsa: alpha must be > 0 or None, got {alpha!r}")
  if not (isinstance(gamma, (int, float)) and gamma >= 0):
    raise ValueError(f"sorsa: gamma must be a float >= 0, got {gamma!r}")
  if base_lr is not None and not base_lr > 0:
    raise ValueError(f"sorsa: base_lr must be > 0 or None, got {base_lr!r}")
  scale = 1.0 if alpha is None else float(alpha) / rank
  weight = float(gamma) / (float(base_lr) if base_lr is not None else 1.0)

  def init_leaf(key, info, w, stats):
    del key, stats
    _leafwise.check_rank("sorsa", info, rank)
    _leafwise.check_finite_weight("sorsa", info, w)
    dt = structured.compute_dtype(w)          # float32, or float64 for a float64 base
    w2 = w.reshape(info.d_in, info.d_out).astype(dt)
    u, sv, vt = jnp.linalg.svd(w2, full_matrices=False)   # w2 = u diag(sv) vt
    # The residual subtracts the factors as stored (in `dtype`), so W' = W exactly at init.
    a, s, b = (x.astype(dtype) for x in (u[:, :rank], sv[:rank], vt[:rank]))
    principal = (a.astype(dt) * s.astype(dt)) @ b.astype(dt)
    resid = (w2 - scale * principal).reshape(info.shape).astype(info.dtype)
    return resid, SORSAState(a.reshape(info.in_shape + (rank,)), s,
                             b.reshape((rank,) + info.out_shape)), None

  def apply_leaf(path, base_leaf, t, f, rng):
    del f, rng
    _leafwise.check_state_shape("sorsa", path, base_leaf, _lowrank.factors_shape(t))
    return SORSAWeight(base_leaf, t.a, t.s, t.b, scale)

  def penalty_leaf(t, f):
    del f
    return weight * orthonormal_regularizer(t.a, t.b)

  return _leafwise.leafwise("sorsa", targets=targets, init_leaf=init_leaf, apply_leaf=apply_leaf,
                            penalty_leaf=penalty_leaf if weight > 0 else None,
                            kernel_axes=kernel_axes)


# ---------------------------------------------------------------------------------------------
# Method facts, read by `lowrank_jax.registry`.
# ---------------------------------------------------------------------------------------------

def _config_kwargs(rank, alpha, targets, total_steps):
  """`rank` is the number r of trainable singular triplets; alpha defaults to r, SORSA's own
  scale 1."""
  del total_steps
  return dict(rank=rank, alpha=float(rank if alpha is None else alpha), targets=targets)


METHOD_FACTS = {"sorsa": base_lib.MethodFacts(sorsa, _config_kwargs, residual_init=True)}
