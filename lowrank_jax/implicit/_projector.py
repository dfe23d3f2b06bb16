"""Differentiable CorDA initialisation: the kept-subspace projector with a gap-only backward.

CorDA (Yang et al., NeurIPS 2024, arXiv:2406.05223) decomposes ``W_m C`` (``W_m`` the
(d_out, d_in) weight in the paper's ``y = W_m x`` layout, ``C`` the damped input covariance) by
SVD and keeps r components: the *largest* in instruction-previewed mode (IPA/IPM) or the *smallest*
in knowledge-preserved mode (KPA/KPM). The adapter's initial product is gauge-invariant:

    B0 A0 = U_r S_r V_r^T C^{-1} = (W_m C) P_r C^{-1},    P_r = V_r V_r^T,

where ``P_r`` is the spectral projector onto the kept eigenvectors of ``G = (W_m C)^T (W_m C)``.
Equivalently ``B0 A0 = U_r U_r^T W_m`` with ``U_r U_r^T`` the kept-subspace projector of the left
Gram matrix ``(W_m C)(W_m C)^T``. Only the smaller of the two Gram matrices is free of structural
zero eigenvalues: ``(W_m C)^T (W_m C)`` is (d_in, d_in) with rank at most ``min(d_in, d_out)``, so
for a wide layer (d_in > d_out) its smallest eigenvalues are d_in - d_out zeros that no singular
value of ``W_m C`` corresponds to. `corda_delta` therefore works in the smaller Gram matrix.

Differentiating ``P_r`` (never U or V) keeps the derivative gauge-invariant. With
``Q = I - P_r`` and ``Lambda = V^T G V`` the derivative ``dP = X V^T + V X^T`` solves the
Sylvester equation

    X Lambda - Q G Q X = Q dG V,

whose operator is self-adjoint and, up to the sign ``s`` (+1 largest, -1 smallest), positive
definite exactly when there is a gap at the rank cut. The backward pass therefore runs matrix-free
CG on ``s (Z Lambda - Q G Q Z) = 2 Q sym(Pbar) V`` and returns ``Gbar = s sym(Z V^T)``. Its
conditioning depends only on the gap between the kept and the discarded eigenvalues, not on gaps
inside the kept block, where `eigh` autodiff divides by ~0 and is silently wrong.

Kernel layout: this project stores dense kernels as (d_in, d_out) with ``y = x @ W``, i.e.
``W = W_m^T``. In that layout the right Gram matrix is ``C W W^T C`` with
``Delta W0 = C^{-1} P_r C W``, and the left one ``W^T C C W`` with ``Delta W0 = W P_r``
(see `corda_delta`).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax.implicit._config import AdjointConfig, AdjointDiagnostics, SolveInfo
from lowrank_jax.implicit._linear_solve import linear_solve
from lowrank_jax.implicit._root import diagnostics_cotangent, nan_unless, report_nonconvergence

_WHICH = ("largest", "smallest")
_MODES = {"ipa": "largest", "ipm": "largest", "kpa": "smallest", "kpm": "smallest"}

DEFAULT_PROJECTOR_CONFIG = AdjointConfig(method="cg", on_nonconvergence="raise")


class ProjectorInfo(NamedTuple):
  """Forward-pass diagnostics of `kept_subspace_projector`.

  Attributes:
    eigenvalues: eigenvalues of ``sym(G)`` in ascending order.
    gap: ``lambda_kept_min - lambda_rest_max`` (largest) or ``lambda_rest_min - lambda_kept_max``
      (smallest); ``inf`` when ``r == d``.
    relative_gap: ``gap / max|lambda|``; the backward CG's condition number is about
      ``1 / relative_gap``.
    well_separated: ``relative_gap > gap_tol``.
  """
  eigenvalues: jax.Array
  gap: jax.Array
  relative_gap: jax.Array
  well_separated: jax.Array


def _sym(a):
  return 0.5 * (a + a.T)


def _default_gap_tol(dtype) -> float:
  return float(np.sqrt(np.finfo(dtype).eps))


def _forward(g, r, which, gap_tol):
  gs = _sym(g)
  lam, vecs = jnp.linalg.eigh(gs)
  d = gs.shape[0]
  if which == "largest":
    v = vecs[:, d - r:]
    gap = lam[d - r] - lam[d - r - 1] if r < d else jnp.asarray(jnp.inf, lam.dtype)
  else:
    v = vecs[:, :r]
    gap = lam[r] - lam[r - 1] if r < d else jnp.asarray(jnp.inf, lam.dtype)
  scale = jnp.maximum(jnp.max(jnp.abs(lam)), jnp.finfo(lam.dtype).tiny)
  rel = gap / scale
  info = ProjectorInfo(lam, gap, rel, rel > gap_tol)
  return v @ v.T, v, info


def _projector_bwd_solve(gs, v, pbar, which, config):
  """Returns (Gbar, SolveInfo) for the cotangent `pbar` of P = V V^T (gap-only Sylvester solve)."""
  s = 1.0 if which == "largest" else -1.0
  lam_block = v.T @ gs @ v

  def proj_q(z):
    return z - v @ (v.T @ z)

  def op(z):
    z = proj_q(z)
    return proj_q(s * (z @ lam_block - gs @ z))

  rhs = proj_q(2.0 * _sym(pbar) @ v)
  z, info = linear_solve(op, rhs, config=config)
  z = proj_q(z)
  gbar = s * _sym(z @ v.T)
  return gbar, info


def kept_subspace_projector(g: jax.Array, r: int, which: str = "largest",
                            config: AdjointConfig | None = None, *, gap_tol: float | None = None,
                            return_info: bool = False,
                            diagnostics: AdjointDiagnostics | None = None):
  """Projector onto the span of the r largest (or smallest) eigenvectors of a symmetric matrix.

  Forward: `jnp.linalg.eigh` of ``(G + G^T) / 2``. Backward: matrix-free CG on the gap-only
  Sylvester equation (module docstring), so the derivative is correct when eigenvalues repeat
  *inside* the kept block (or inside the discarded block); it only needs a gap at the rank cut.

  Non-convergence is reported, never silently returned: the backward pass flags failure when the
  CG misses its tolerance *or* the relative gap at the cut is below ``gap_tol`` (there the
  subspace, hence P, is not differentiable). By default (``on_nonconvergence="raise"``) it raises
  a `RuntimeError` (a `JaxRuntimeError` under `jit`) naming the residual and the gap; with
  ``"warn"``/``"ignore"`` it returns the best finite CG iterate, with ``"nan"`` a NaN cotangent.
  The flag, residual, iterations and relative gap are also readable through an
  `AdjointDiagnostics` probe, and the forward gap via ``return_info=True``. The forward is a
  direct eigendecomposition: the probe's ``forward_residual`` is its relative residual
  ``|G V - V (V^T G V)| / max|lambda|``, for information (it is not subject to the policy).

  Args:
    g: (d, d) symmetric matrix (only its symmetric part is used).
    r: number of kept eigenvectors, ``1 <= r <= d`` (static).
    which: ``"largest"`` or ``"smallest"`` (static).
    config: `AdjointConfig` of the backward solve (method ``None``, i.e. CG, ``"cg"`` or
      ``"dense"``); default CG with ``on_nonconvergence="raise"``.
    gap_tol: relative gap below which the backward reports failure; default ``sqrt(eps)``.
    return_info: also return a `ProjectorInfo` (eigenvalues and gap).
    diagnostics: optional `AdjointDiagnostics` probe (see its docstring).

  Returns:
    P (d, d), or ``(P, ProjectorInfo)`` if ``return_info``.

  Raises:
    ValueError: bad shapes, ``r`` or ``which``.

  Example:
    >>> import jax.numpy as jnp
    >>> g = jnp.diag(jnp.array([3., 2., 1.]))
    >>> kept_subspace_projector(g, 2)
    Array([[1., 0., 0.],
           [0., 1., 0.],
           [0., 0., 0.]], dtype=float32)
  """
  g = jnp.asarray(g)
  if g.ndim != 2 or g.shape[0] != g.shape[1]:
    raise ValueError(f"kept_subspace_projector needs a square matrix, got shape {g.shape}")
  d = g.shape[0]
  if not isinstance(r, int) or not 1 <= r <= d:
    raise ValueError(f"r must be an int in [1, {d}], got {r!r}")
  if which not in _WHICH:
    raise ValueError(f"which={which!r}; valid: {_WHICH}")
  config = DEFAULT_PROJECTOR_CONFIG if config is None else config
  if not isinstance(config, AdjointConfig):
    raise TypeError(f"config must be an AdjointConfig, got {type(config).__name__}")
  config = config.resolve(symmetric=True)
  if config.method not in ("cg", "dense"):
    raise ValueError("the projector's adjoint is symmetric positive definite on its domain; "
                     f"use method 'cg' or 'dense', got {config.method!r}")
  if diagnostics is not None and not isinstance(diagnostics, AdjointDiagnostics):
    raise TypeError("diagnostics must be None or an AdjointDiagnostics")
  if not jnp.issubdtype(g.dtype, jnp.floating):
    g = g.astype(jnp.zeros(()).dtype)
  gap_tol = _default_gap_tol(g.dtype) if gap_tol is None else float(gap_tol)
  p, info = _projector(g, diagnostics, r, which, config, gap_tol)
  return (p, info) if return_info else p


def _projector_impl(g, probe, r, which, config, gap_tol):
  del probe
  p, _, info = _forward(g, r, which, gap_tol)
  return p, info


_projector = jax.custom_vjp(_projector_impl, nondiff_argnums=(2, 3, 4, 5))


def _projector_fwd(g, probe, r, which, config, gap_tol):
  p, v, info = _forward(g, r, which, gap_tol)
  return (p, info), (_sym(g), v, info, probe)


def _projector_bwd(r, which, config, gap_tol, res, cts):
  gs, v, info, probe = res
  pbar = cts[0]
  forward = _eigen_residual(gs, v, info.eigenvalues, config)
  if r == gs.shape[0]:  # P = I: constant.
    trivial = SolveInfo(jnp.zeros((), gs.dtype), jnp.asarray(0, jnp.int32), jnp.asarray(True))
    return jnp.zeros_like(gs), diagnostics_cotangent(
        probe, trivial, gap=jnp.asarray(jnp.inf, gs.dtype), converged=True, forward=forward)
  gbar, solve_info = _projector_bwd_solve(gs, v, pbar, which, config)
  ok = solve_info.converged & info.well_separated
  report_nonconvergence(config, solve_info, f"kept_subspace_projector(r={r}, which={which!r})",
                        gap=info.relative_gap, converged=ok)
  return nan_unless(config, ok, gbar), diagnostics_cotangent(
      probe, solve_info, gap=info.relative_gap, converged=ok, forward=forward)


def _eigen_residual(gs, v, eigenvalues, config):
  """Relative residual of the kept eigenvectors, ``|G V - V (V^T G V)| / max|lambda|``."""
  gv = gs @ v
  scale = jnp.maximum(jnp.max(jnp.abs(eigenvalues)), jnp.finfo(gs.dtype).tiny)
  rel = jnp.linalg.norm(gv - v @ (v.T @ gv)) / scale
  ok = rel <= config.resolved_forward_tol(gs.dtype)
  return SolveInfo(rel, jnp.asarray(-1, jnp.int32), ok)


_projector.defvjp(_projector_fwd, _projector_bwd)


def damped_covariance(c: jax.Array, damping) -> jax.Array:
  """``C + damping * mean(diag C) * I`` (CorDA's damping, scaled to the covariance's size).

  Example:
    >>> import jax.numpy as jnp
    >>> damped_covariance(jnp.diag(jnp.array([1., 3.])), 0.5)
    Array([[2., 0.],
           [0., 4.]], dtype=float32)
  """
  c = jnp.asarray(c)
  return c + damping * jnp.mean(jnp.diag(c)) * jnp.eye(c.shape[0], dtype=c.dtype)


def corda_delta(w: jax.Array, c: jax.Array, r: int, mode: str = "ipa", damping=0.0,
                config: AdjointConfig | None = None, *, gap_tol: float | None = None,
                diagnostics: AdjointDiagnostics | None = None) -> jax.Array:
  """CorDA's initial adapter product ``Delta W0``, differentiable in ``w``, ``c`` and ``damping``.

  Layout: ``w`` is a (d_in, d_out) kernel (``y = x @ w``, flax convention) and ``c`` the
  (d_in, d_in) input covariance (e.g. ``X^T X / N``). With ``C~ = C + damping mean(diag C) I``,
  ``W_m = w^T`` and the thin SVD ``W_m C~ = U S V^T`` (``min(d_in, d_out)`` singular values),

      Delta W0 = (U_r S_r V_r^T C~^{-1})^T,

  the transpose of the paper's ``B0 A0``, with the r largest (IPA) or r smallest (KPA) singular
  values. It is computed from the smaller Gram matrix of ``W_m C~``, so that KPA never picks the
  structural zero eigenvalues of the larger one:

  * ``d_in <= d_out``: ``P_r`` the kept-subspace projector of ``C~ w w^T C~`` (d_in, d_in) and
    ``Delta W0 = C~^{-1} P_r C~ w``;
  * ``d_in > d_out``: ``P_r`` the kept-subspace projector of ``w^T C~ C~ w`` (d_out, d_out) and
    ``Delta W0 = w P_r``.

  The adapter is initialised so that ``scale * B0 A0 = Delta W0`` and the frozen residual is
  ``w - Delta W0``. Gradients flow through `kept_subspace_projector` (gap-only CG backward) and,
  for ``d_in <= d_out``, a dense solve with ``C~``; a covariance mix
  ``(1 - beta) C_task + beta C_knowledge`` or per-sample weights are differentiable through ``c``.

  Args:
    w: (d_in, d_out) kernel.
    c: (d_in, d_in) symmetric positive semi-definite covariance.
    r: rank (static), ``1 <= r <= min(d_in, d_out)`` (the number of singular values).
    mode: ``"ipa"`` (keep the r largest components; alias ``"ipm"``) or ``"kpa"`` (keep the r
      smallest; alias ``"kpm"``).
    damping: relative damping ``delta`` (scalar, may be traced).
    config: backward CG settings (see `kept_subspace_projector`).
    gap_tol: see `kept_subspace_projector`.
    diagnostics: optional `AdjointDiagnostics` probe for the projector's backward.

  Returns:
    ``Delta W0`` with the shape of ``w``.

  Raises:
    ValueError: for bad shapes, rank or mode.

  Example:
    >>> import jax.numpy as jnp
    >>> w = jnp.array([[2., 0.], [0., 1.], [0., 0.]])           # d_in=3, d_out=2
    >>> corda_delta(w, jnp.eye(3), r=1, mode="kpa")
    Array([[0., 0.],
           [0., 1.],
           [0., 0.]], dtype=float32)
  """
  w = jnp.asarray(w)
  c = jnp.asarray(c)
  if w.ndim != 2:
    raise ValueError(f"corda_delta needs a 2-D (d_in, d_out) kernel, got shape {w.shape}")
  d_in, d_out = w.shape
  if c.shape != (d_in, d_in):
    raise ValueError(f"covariance shape {c.shape} does not match kernel d_in={d_in} "
                     "(kernels are (d_in, d_out), y = x @ w)")
  if not isinstance(r, int) or not 1 <= r <= min(d_in, d_out):
    raise ValueError(f"r must be an int in [1, min(d_in, d_out)] = [1, {min(d_in, d_out)}] "
                     f"(the number of singular values of a ({d_in}, {d_out}) kernel), got {r!r}")
  key = mode.lower() if isinstance(mode, str) else mode
  if key not in _MODES:
    raise ValueError(f"mode={mode!r}; valid: 'ipa' (largest; alias 'ipm'), 'kpa' (smallest; "
                     "alias 'kpm')")
  ct = damped_covariance(c, damping)
  ctw = ct @ w
  if d_in > d_out:
    p = kept_subspace_projector(ctw.T @ ctw, r, _MODES[key], config, gap_tol=gap_tol,
                                diagnostics=diagnostics)
    return w @ p
  p = kept_subspace_projector(ctw @ ctw.T, r, _MODES[key], config, gap_tol=gap_tol,
                              diagnostics=diagnostics)
  return jnp.linalg.solve(ct, p @ ctw)
