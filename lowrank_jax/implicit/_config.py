"""Static settings and diagnostics shared by the implicit-differentiation solvers.

Everything here is either a frozen, hashable dataclass (safe to close over or to pass as a
`nondiff_argnums` entry of `jax.custom_vjp`) or a NamedTuple of arrays (a pytree).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

METHODS = ("cg", "gmres", "normal_cg", "neumann", "dense")
POLICIES = ("ignore", "warn", "raise", "nan")
CONTEXTS = ("log_hyperparams",)


@dataclasses.dataclass(frozen=True)
class AdjointConfig:
  """How the backward (adjoint) linear system is solved, and how a failed solve is reported.

  All fields are static Python values: the config is hashable and never traced, so it can be
  closed over by a `jax.custom_vjp` rule (a traced value in ``nondiff_argnums`` is an error).

  Attributes:
    method: ``None`` (the default) lets the problem decide (see `resolve`): ``"cg"`` when the
      adjoint operator is declared symmetric positive definite (``symmetric=True`` of
      `custom_root` / `linear_solve`; always so for Hessians of an inner loss and for the CorDA
      projector), ``"gmres"`` otherwise. Or one of ``"cg"`` (symmetric positive definite
      systems, e.g. Hessians), ``"gmres"`` (restarted GMRES, general square systems),
      ``"normal_cg"`` (CG on the normal equations, general but squares the condition number),
      ``"neumann"`` (Richardson / Neumann series ``u <- u + alpha (b - A u)``; converges when the
      spectrum of ``alpha A`` lies in the unit disc around 1) and ``"dense"`` (materialises the
      matrix with ``vmap``; small problems only).
    tol: relative tolerance on the residual, ``|b - A u| <= max(tol |b|, atol)``. ``None`` picks
      ``1e-10`` for float64 and ``1e-5`` for lower precision (decided from the right-hand side).
    atol: absolute tolerance floor.
    maxiter: maximum number of iterations (matrix-vector products for CG/Neumann, Arnoldi steps
      for GMRES). Ignored by ``"dense"``.
    ridge: Tikhonov term ``ridge * I`` added to the operator. Default 0: a positive ridge biases
      the hypergradient; use it only to rescue singular systems (e.g. the exact zero Hessian
      eigenvalues of LoRA's ``BA = (BQ)(Q^{-1}A)`` gauge).
    neumann_alpha: step size of the Neumann series; needs ``0 < alpha < 2 / lambda_max``.
    neumann_alpha_grid: candidate Neumann step sizes, learned online across a *sequence* of
      adjoint solves (Khodak et al.'s Learning to Relax): `lowrank_jax.bilevel.tune_hyperparameters`
      plays one ``alpha`` of the grid per outer step with the Tsallis-INF bandit (or the
      contextual SquareCB learner, see ``neumann_alpha_context``), pays that
      solve's iteration count divided by ``maxiter`` (a diverging or stalled ``alpha`` costs 1),
      and shifts its probabilities to the cheapest step size; the tolerance is the same for every
      arm, so the hypergradient accuracy is too. Needs ``method="neumann"``; a single solve
      (`linear_solve`, `ift_hypergradient`) refuses it, as there is nothing to learn from one.
    neumann_alpha_context: makes the step-size learner *contextual*: ``None`` (the default) plays
      Tsallis-INF, which competes with the best single grid point over the whole sequence; set,
      the learner plays SquareCB (`lowrank_jax.implicit.relax.square_cb_sample`: inverse-gap
      weighting over per-arm ridge regressions on degree-2 Chebyshev features of a scalar
      context), which competes with the best grid point *for each context*. Use it when the best
      step size drifts with the hyperparameters, as the best Neumann step ``~ 2 / (lambda_min +
      lambda_max)`` of a weight-decay Hessian ``H_0 + lam I`` does with ``lam`` (the analogue of
      Learning to Relax's diagonal shift ``A + c I``). The context is computed before each solve
      from the current (constrained) hyperparameters ``lam``: ``"log_hyperparams"`` is the mean of
      ``log |x|`` over all entries of ``lam``; or pass a callable ``lam -> scalar`` (hashable,
      traceable by `jnp`). Needs ``neumann_alpha_grid`` and ``neumann_alpha_context_range``.
    neumann_alpha_context_range: ``(low, high)``: the context range mapped onto the Chebyshev
      interval [-1, 1]; contexts outside are clipped to it (the learner then treats them as the
      end points). For ``"log_hyperparams"``, the log of the hyperparameters' range (e.g. the
      bounds of an `interval` constraint).
    learner_seed: seed of the learner's arm draws when ``neumann_alpha_grid`` is set.
    restart: Krylov dimension per GMRES cycle.
    warm_start: if True, the iterative solve starts from the right-hand side instead of zero
      (exact when the operator is the identity; the natural start for fixed points of
      contractions). Explicit warm starts across calls are available in `lowrank_jax.bilevel`.
    forward_tol: relative tolerance of the check that the forward solver's output ``x*`` is a
      root of the optimality condition ``F`` (`custom_root`, `custom_fixed_point`): the check
      passes when ``|F(x*, args)| <= max(forward_tol (1 + |x*|), forward_atol)`` (Euclidean norms
      over the pytree; for a fixed point ``F = x - T(x)``, the stopping rule of
      `fixed_point_iteration`). The implicit gradient assumes ``F(x*) = 0``; its error grows
      like ``|F(x*)|``. ``None`` picks ``sqrt(eps)`` of the solution's dtype (``1.5e-8`` for
      float64, ``3.5e-4`` for float32).
    forward_atol: absolute floor of the forward check.
    on_nonconvergence: what happens when the forward solver's output fails the check above
      (checked in the forward pass) or the adjoint solve misses its tolerance (checked in the
      backward pass): ``"ignore"``; ``"warn"`` (a `RuntimeWarning` emitted from inside the
      computation via `jax.debug.callback`); ``"raise"`` (a `RuntimeError` raised from the
      callback; under `jit` it surfaces as a `JaxRuntimeError` carrying the message); or
      ``"nan"`` (no host callback: a failed forward check makes the returned solution NaN, and
      a failed forward check or adjoint solve makes the returned cotangents NaN, which
      e.g. `optax.apply_if_finite` then skips). With ``"ignore"``, ``"warn"`` and ``"raise"`` the
      solution is the solver's output and the cotangent is the best finite adjoint iterate
      (smallest residual seen), never NaN.

  Example:
    >>> cfg = AdjointConfig(method="cg", tol=1e-12, maxiter=200)
    >>> hash(cfg) == hash(AdjointConfig(method="cg", tol=1e-12, maxiter=200))
    True
  """
  method: str | None = None
  tol: float | None = None
  atol: float = 0.0
  maxiter: int = 1000
  ridge: float = 0.0
  neumann_alpha: float = 1.0
  restart: int = 20
  warm_start: bool = False
  forward_tol: float | None = None
  forward_atol: float = 0.0
  on_nonconvergence: str = "warn"
  neumann_alpha_grid: tuple[float, ...] | None = None
  neumann_alpha_context: str | Callable | None = None
  neumann_alpha_context_range: tuple[float, float] | None = None
  learner_seed: int = 0

  def __post_init__(self):
    if self.method is not None and self.method not in METHODS:
      raise ValueError(f"AdjointConfig.method={self.method!r}; valid: None (decided by the "
                       f"problem's symmetry) or one of {METHODS}")
    if self.on_nonconvergence not in POLICIES:
      raise ValueError(
          f"AdjointConfig.on_nonconvergence={self.on_nonconvergence!r}; valid: {POLICIES}")
    if self.tol is not None and not self.tol >= 0:
      raise ValueError(f"AdjointConfig.tol must be >= 0 or None, got {self.tol!r}")
    if not self.atol >= 0:
      raise ValueError(f"AdjointConfig.atol must be >= 0, got {self.atol!r}")
    if not isinstance(self.maxiter, int) or self.maxiter < 1:
      raise ValueError(f"AdjointConfig.maxiter must be a positive int, got {self.maxiter!r}")
    if not isinstance(self.restart, int) or self.restart < 1:
      raise ValueError(f"AdjointConfig.restart must be a positive int, got {self.restart!r}")
    if not self.ridge >= 0:
      raise ValueError(f"AdjointConfig.ridge must be >= 0, got {self.ridge!r}")
    if not self.neumann_alpha > 0:
      raise ValueError(f"AdjointConfig.neumann_alpha must be > 0, got {self.neumann_alpha!r}")
    if self.neumann_alpha_grid is not None:
      grid = self.neumann_alpha_grid
      if (not isinstance(grid, tuple) or len(grid) < 2
          or not all(isinstance(a, (int, float)) and a > 0 for a in grid)):
        raise ValueError(f"AdjointConfig.neumann_alpha_grid must be a tuple of at least two "
                         f"positive step sizes, got {grid!r}")
      if self.method != "neumann":
        raise ValueError(f"AdjointConfig.neumann_alpha_grid is learned for method='neumann'; "
                         f"got method={self.method!r}")
    self._check_context()
    if not isinstance(self.learner_seed, int):
      raise ValueError(f"AdjointConfig.learner_seed must be an int, got {self.learner_seed!r}")
    if self.forward_tol is not None and not self.forward_tol >= 0:
      raise ValueError(
          f"AdjointConfig.forward_tol must be >= 0 or None, got {self.forward_tol!r}")
    if not self.forward_atol >= 0:
      raise ValueError(f"AdjointConfig.forward_atol must be >= 0, got {self.forward_atol!r}")

  def _check_context(self):
    context, bounds = self.neumann_alpha_context, self.neumann_alpha_context_range
    if context is not None:
      if not (context in CONTEXTS or callable(context)):
        raise ValueError(f"AdjointConfig.neumann_alpha_context={context!r}; valid: None "
                         f"(no context), one of {CONTEXTS}, or a callable lam -> scalar")
      if self.neumann_alpha_grid is None:
        raise ValueError("AdjointConfig.neumann_alpha_context chooses among the step sizes of "
                         "neumann_alpha_grid; set neumann_alpha_grid too")
      if bounds is None:
        raise ValueError("AdjointConfig.neumann_alpha_context needs neumann_alpha_context_range="
                         "(low, high), the context range of its Chebyshev features")
    elif bounds is not None:
      raise ValueError("AdjointConfig.neumann_alpha_context_range is only used with "
                       "neumann_alpha_context; set both or neither")
    if bounds is not None and (
        not isinstance(bounds, tuple) or len(bounds) != 2
        or not all(isinstance(b, (int, float)) and math.isfinite(b) for b in bounds)
        or not bounds[0] < bounds[1]):
      raise ValueError(f"AdjointConfig.neumann_alpha_context_range must be a tuple (low, high) "
                       f"of finite numbers with low < high, got {bounds!r}")

  def replace(self, **changes) -> "AdjointConfig":
    """Returns a copy with some fields changed (validated again)."""
    return dataclasses.replace(self, **changes)

  def resolve(self, symmetric: bool) -> "AdjointConfig":
    """This config with ``method`` decided: kept if set, else CG if `symmetric`, else GMRES.

    Args:
      symmetric: whether the adjoint operator is symmetric positive definite (CG's requirement).

    Example:
      >>> AdjointConfig().resolve(symmetric=False).method
      'gmres'
      >>> AdjointConfig(method="neumann").resolve(symmetric=True).method
      'neumann'
    """
    if self.method is not None:
      return self
    return self.replace(method="cg" if symmetric else "gmres")

  def resolved_tol(self, dtype) -> float:
    """The relative tolerance used for arrays of `dtype`."""
    if self.tol is not None:
      return float(self.tol)
    return 1e-10 if jnp.finfo(dtype).bits >= 64 else 1e-5

  def resolved_forward_tol(self, dtype) -> float:
    """The relative tolerance of the forward-solution check for arrays of `dtype`."""
    if self.forward_tol is not None:
      return float(self.forward_tol)
    return float(jnp.finfo(dtype).eps) ** 0.5


class SolveInfo(NamedTuple):
  """Diagnostics of one linear solve (a pytree of scalars).

  Attributes:
    residual: relative residual ``|b - A u| / |b|`` of the returned solution (0 when b = 0),
      computed with one extra matrix-vector product.
    iterations: number of iterations run (int32; -1 when unknown).
    converged: whether ``|b - A u| <= 2 max(tol |b|, atol)`` holds (the factor 2 allows for the
      drift between recursive and true residuals).
  """
  residual: jax.Array
  iterations: jax.Array
  converged: jax.Array


class AdjointDiagnostics(NamedTuple):
  """A diagnostics *probe*: pass it in, differentiate with respect to it, read the adjoint solve.

  A `jax.custom_vjp` backward pass cannot return extra outputs, so the implicit functions accept an
  optional ``diagnostics=`` argument of this type. Its "gradient" is not a derivative: the
  backward rule writes the forward solution's and the adjoint solve's diagnostics into it. Pass
  `AdjointDiagnostics.zeros()` and include it in the `argnums` of `jax.grad`:

    >>> # g_theta, diag = jax.grad(loss, argnums=(0, 1))(theta, AdjointDiagnostics.zeros())
    >>> AdjointDiagnostics.zeros().converged
    Array(0., dtype=float32)

  All fields are floating point (an integer input would get a ``float0`` cotangent). If the
  implicit function is called several times in one loss (or under `vmap` with an unbatched
  probe) the values are summed; use one probe per call (batched under `vmap`).

  Attributes:
    residual: relative residual of the adjoint solve.
    iterations: iterations the adjoint solve used.
    converged: 1.0 if the solve met its tolerance (and, for the subspace projector, the gap at the
      rank cut is above ``gap_tol``), else 0.0.
    gap: for `kept_subspace_projector`, the relative eigengap at the rank cut; 0 elsewhere.
    forward_residual: ``|F(x*, args)| / (1 + |x*|)`` of the forward solution (for the
      projector: ``|G V - V (V^T G V)| / max|lambda(G)|`` of the kept eigenvectors ``V``).
    forward_iterations: iterations the forward solver reported (through a `SolveInfo` aux, see
      `custom_root`); -1 when it reported none.
    forward_converged: 1.0 if the forward solution passed the check described under
      ``AdjointConfig.forward_tol``, else 0.0.
  """
  residual: jax.Array
  iterations: jax.Array
  converged: jax.Array
  gap: jax.Array
  forward_residual: jax.Array
  forward_iterations: jax.Array
  forward_converged: jax.Array

  @classmethod
  def zeros(cls, dtype=None) -> "AdjointDiagnostics":
    """A fresh probe (scalars of `dtype`, default: the default float dtype)."""
    dtype = dtype or jnp.zeros(()).dtype
    return cls(*(jnp.zeros((), dtype) for _ in cls._fields))
