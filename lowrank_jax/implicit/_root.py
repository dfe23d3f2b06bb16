"""`custom_root` / `custom_fixed_point`: implicit differentiation of solver outputs.

Blondel et al., "Efficient and Modular Implicit Differentiation" (NeurIPS 2022,
arXiv:2105.15183). The user states an optimality condition ``F(x, *args) = 0`` satisfied by the
solver's output ``x*``; the solver itself is never differentiated (it runs under `stop_gradient`
and may contain any `lax.while_loop`). By the implicit function theorem, for a cotangent ``g`` on
``x*`` the backward pass solves the transposed system

    (d F / d x)^T u = -g        (matrix-free: u -> VJP of x -> F(x, args) at x*)

and returns ``(d F / d args)^T u`` (one VJP of ``args -> F(x*, args)``). Memory is O(|x|) however
many iterations the solver ran.

Contract and limits:
  * Differentiable inputs are the explicit positional ``args`` (any pytrees). ``F`` and the solver
    must not close over traced arrays you differentiate with respect to (you would get an
    `UnexpectedTracerError`); pass them as ``args`` or use `jax.closure_convert`.
  * The initial guess ``x0`` gets a zero cotangent; an ``aux`` output (``has_aux=True``) is
    treated as non-differentiable.
  * Built on `jax.custom_vjp`: reverse mode (`grad`, `vjp`, `jacrev`) composes with `jit` and
    `vmap`, but **forward mode (`jvp`, `jacfwd`) is blocked** ("can't apply forward-mode autodiff
    (jvp) to a custom_vjp function"), and so is grad-of-grad through the backward's while loop.
  * The solver is not trusted: the forward pass evaluates ``F(x*, args)`` once and the backward
    pass measures the adjoint residual. Both are checked according to
    ``AdjointConfig.on_nonconvergence`` (warn, raise, NaN or ignore) and are readable, with the
    iteration counts, through an `AdjointDiagnostics` probe (``diagnostics=`` keyword).
  * The adjoint method, unless given, follows the caller's ``symmetric`` declaration: CG for a
    symmetric positive definite ``dF/dx`` (e.g. ``F`` a gradient), GMRES otherwise.
"""
from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from optax.tree_utils import tree_norm

from lowrank_jax.implicit._config import AdjointConfig, AdjointDiagnostics, SolveInfo
from lowrank_jax.implicit._linear_solve import linear_solve

PyTree = Any


def _as_config(solve, config, symmetric: bool) -> AdjointConfig:
  if config is None:
    config = AdjointConfig()
  if not isinstance(config, AdjointConfig):
    raise TypeError(f"config must be an AdjointConfig, got {type(config).__name__}")
  if isinstance(solve, str):
    config = config.replace(method=solve)
  elif solve is not None and not callable(solve):
    raise TypeError(f"solve must be a method name, a callable or None, got {solve!r}")
  return config.resolve(symmetric)


def _emit(policy: str, msg: str):
  if policy == "raise":
    raise RuntimeError(msg)
  warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _adjoint_reporter(policy: str, context: str):
  """Host callback that reports a failed adjoint solve."""

  def report(converged, residual, iterations, gap):
    if bool(np.all(converged)):
      return
    msg = (f"{context}: adjoint linear solve did not converge (relative residual "
           f"{float(np.max(residual)):.3e} after {int(np.max(iterations))} iterations")
    if float(np.max(gap)) != 0.0 or float(np.min(gap)) != 0.0:
      msg += f"; relative eigengap at the rank cut {float(np.min(gap)):.3e}"
    msg += ("). The returned cotangent is the best finite iterate (smallest residual) and may "
            "be inaccurate.")
    _emit(policy, msg)

  return report


def _forward_reporter(policy: str, context: str):
  """Host callback that reports a forward solution that is not a root."""

  def report(converged, residual, threshold, iterations):
    if bool(np.all(converged)):
      return
    iters = int(np.max(iterations))
    ran = f"after {iters} solver iterations" if iters >= 0 else "solver iterations not reported"
    _emit(policy, (
        f"{context}: the forward solver's output is not a root of the optimality condition: "
        f"|F(x*, args)| / (1 + |x*|) = {float(np.max(residual)):.3e} > "
        f"{float(np.min(threshold)):.3e} ({ran}). The implicit gradient assumes F(x*, args) = 0 "
        "and its error grows with |F(x*, args)|: solve more tightly, or loosen "
        "AdjointConfig.forward_tol / forward_atol."))

  return report


def _reports_on_host(config: AdjointConfig) -> bool:
  return config.on_nonconvergence in ("warn", "raise")


def report_nonconvergence(config: AdjointConfig, info: SolveInfo, context: str, gap=None,
                          converged=None):
  """Applies ``config.on_nonconvergence`` to an adjoint solve's diagnostics (in traced code).

  Only the host-side policies act here (``"warn"``, ``"raise"``); ``"nan"`` is applied to the
  cotangent with `nan_unless`.
  """
  if not _reports_on_host(config):
    return
  converged = info.converged if converged is None else converged
  gap = jnp.zeros_like(info.residual) if gap is None else gap
  jax.debug.callback(_adjoint_reporter(config.on_nonconvergence, context), converged,
                     info.residual, info.iterations, gap)


def nan_unless(config: AdjointConfig, ok, tree):
  """``tree`` with its floating leaves set to NaN where ``ok`` is False, under policy "nan"."""
  if config.on_nonconvergence != "nan":
    return tree

  def poison(a):
    a = jnp.asarray(a)
    if not jnp.issubdtype(a.dtype, jnp.inexact):
      return a
    return jnp.where(ok, a, jnp.asarray(jnp.nan, a.dtype))

  return jax.tree.map(poison, tree)


def check_forward(config: AdjointConfig, fx: PyTree, x: PyTree, iterations=None):
  """Checks that ``x`` is a root: ``|F(x)| <= max(forward_tol (1 + |x|), forward_atol)``.

  Args:
    config: supplies ``forward_tol`` and ``forward_atol``.
    fx: ``F(x, args)``.
    x: the forward solution.
    iterations: the forward solver's iteration count, if it reported one.

  Returns:
    ``(info, threshold)``: a `SolveInfo` with ``residual = |F(x)| / (1 + |x|)`` (Euclidean norms
    over the pytrees), the iterations (-1 when unknown) and whether the check (and finiteness)
    holds; and the threshold on that residual.
  """
  leaves = [jnp.asarray(a) for a in jax.tree.leaves(x)]
  dtype = jnp.result_type(*leaves) if leaves else jnp.zeros(()).dtype
  if not jnp.issubdtype(dtype, jnp.inexact):
    dtype = jnp.zeros(()).dtype
  fnorm = jnp.asarray(tree_norm(fx), dtype)
  scale = 1.0 + jnp.asarray(tree_norm(x), dtype)
  threshold = jnp.maximum(config.resolved_forward_tol(dtype) * scale, config.forward_atol)
  ok = jnp.isfinite(fnorm) & jnp.isfinite(scale) & (fnorm <= threshold)
  iterations = jnp.asarray(-1 if iterations is None else iterations, jnp.int32)
  return SolveInfo(fnorm / scale, iterations, ok), threshold / scale


def report_forward(config: AdjointConfig, info: SolveInfo, threshold, context: str):
  """Applies the host-side policies (``"warn"``, ``"raise"``) to a forward check."""
  if _reports_on_host(config):
    jax.debug.callback(_forward_reporter(config.on_nonconvergence, context), info.converged,
                       info.residual, threshold, info.iterations)


def diagnostics_cotangent(probe, info: SolveInfo, gap=None, converged=None,
                          forward: SolveInfo | None = None):
  """The value written into an `AdjointDiagnostics` probe's cotangent."""
  if probe is None:
    return None
  converged = info.converged if converged is None else converged
  if forward is None:
    forward = SolveInfo(jnp.zeros(()), jnp.asarray(-1), jnp.asarray(True))
  vals = AdjointDiagnostics(info.residual, info.iterations, converged,
                            jnp.zeros(()) if gap is None else gap, *forward)
  return jax.tree.map(lambda p, v: jnp.broadcast_to(jnp.asarray(v, p.dtype), jnp.shape(p)),
                      probe, vals)


def _check_probe(diagnostics):
  if diagnostics is not None and not isinstance(diagnostics, AdjointDiagnostics):
    raise TypeError("diagnostics must be None or an AdjointDiagnostics "
                    f"(use AdjointDiagnostics.zeros()), got {type(diagnostics).__name__}")


def _solve_adjoint(matvec, b, solve, config):
  if callable(solve) and not isinstance(solve, str):
    if config.ridge:
      plain = matvec
      matvec = lambda v: jax.tree.map(lambda a, x: a + config.ridge * x, plain(v), v)
    out = solve(matvec, b)
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], SolveInfo):
      return out
    # A plain solver without diagnostics: measure the residual ourselves.
    u = out
    rn = tree_norm(jax.tree.map(lambda bi, ai: bi - ai, b, matvec(u)))
    bn = tree_norm(b)
    rel = jnp.where(bn > 0, rn / jnp.where(bn > 0, bn, 1.0), rn)
    dtype = jax.tree.leaves(b)[0].dtype if jax.tree.leaves(b) else jnp.float32
    ok = rel <= 2 * config.resolved_tol(dtype)
    return u, SolveInfo(rel, jnp.asarray(-1, jnp.int32), ok)
  return linear_solve(matvec, b, config=config)


def custom_root(optimality_fn: Callable[..., PyTree], solve: str | Callable | None = None,
                config: AdjointConfig | None = None, has_aux: bool = False, *,
                symmetric: bool = False):
  """Decorator adding implicit differentiation to a root-finding solver.

  The forward pass checks the solver's output: it evaluates ``F(x*, *args)`` once and applies
  ``config.on_nonconvergence`` when ``|F(x*)| > max(forward_tol (1 + |x*|), forward_atol)``
  (see `AdjointConfig`), because the implicit gradient is only as accurate as ``x*`` is a root.
  The backward pass applies the same policy to the adjoint solve.

  Args:
    optimality_fn: ``F(x, *args) -> pytree shaped like x``; zero at the solution.
    solve: the adjoint linear solver: a method name (``"cg"``, ``"gmres"``, ``"normal_cg"``,
      ``"neumann"``, ``"dense"``; overrides ``config.method``) or a callable
      ``solve(matvec, b) -> u`` or ``-> (u, SolveInfo)``. ``None`` uses ``config.method``.
      The operator handed to the solver is ``(dF/dx)^T``.
    config: an `AdjointConfig` with tolerances (adjoint and forward), ``maxiter``, ``ridge``,
      warm start and the non-convergence policy.
    has_aux: whether the solver returns ``(x, aux)``; ``aux`` is not differentiated. If ``aux``
      is a `SolveInfo` (as returned by `linear_solve` or by
      ``fixed_point_iteration(..., return_info=True)``), its iteration count is reported as
      ``forward_iterations`` in the diagnostics.
    symmetric: the caller's declaration that ``dF/dx`` is symmetric positive definite (true when
      ``F`` is the gradient of a strongly convex objective: the operator is its Hessian). It only
      decides the adjoint method when neither ``solve`` nor ``config.method`` does: CG if True,
      GMRES (valid for any non-singular system) if False.

  Returns:
    A decorator mapping ``solver(x0, *args)`` to a function with the same signature plus an
    optional keyword ``diagnostics`` (an `AdjointDiagnostics` probe).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> def grad_ridge(w, lam, x, y):      # F = gradient of 0.5|xw - y|^2 + 0.5 lam |w|^2
    ...   return x.T @ (x @ w - y) + lam * w
    >>> @custom_root(grad_ridge, config=AdjointConfig(tol=1e-6), symmetric=True)   # CG
    ... def ridge(w0, lam, x, y):
    ...   return jnp.linalg.solve(x.T @ x + lam * jnp.eye(x.shape[1]), x.T @ y)
    >>> x, y = jnp.eye(3), jnp.ones(3)
    >>> float(jax.grad(lambda lam: ridge(jnp.zeros(3), lam, x, y).sum())(1.0))  # d/dl 3/(1+l)
    -0.75
  """
  config = _as_config(solve, config, symmetric)
  solve_fn = solve if (callable(solve) and not isinstance(solve, str)) else None

  def decorator(solver: Callable[..., Any]):
    context = f"custom_root({getattr(solver, '__name__', 'solver')})"

    def solve_and_check(x0, args):
      """Runs the solver and checks its output; returns (output, unpoisoned x*, forward info)."""
      sol = solver(x0, *args)
      x = sol[0] if has_aux else sol
      iterations = sol[1].iterations if has_aux and isinstance(sol[1], SolveInfo) else None
      fwd, threshold = check_forward(config, optimality_fn(x, *args), x, iterations)
      report_forward(config, fwd, threshold, context)
      x_out = nan_unless(config, fwd.converged, x)
      return ((x_out, sol[1]) if has_aux else x_out), x, fwd

    @jax.custom_vjp
    def _impl(x0, args, probe):
      del probe
      return solve_and_check(x0, args)[0]

    def _fwd(x0, args, probe):
      sol, x, fwd = solve_and_check(jax.lax.stop_gradient(x0), jax.lax.stop_gradient(args))
      return sol, (x0, x, args, probe, fwd)

    def _bwd(res, g):
      x0, x, args, probe, fwd = res
      gx = g[0] if has_aux else g
      _, vjp_x = jax.vjp(lambda z: optimality_fn(z, *args), x)
      matvec = lambda u: vjp_x(u)[0]
      b = jax.tree.map(lambda t: -t, gx)
      u, info = _solve_adjoint(matvec, b, solve_fn or config.method, config)
      report_nonconvergence(config, info, context)
      _, vjp_args = jax.vjp(lambda *a: optimality_fn(x, *a), *args)
      args_bar = nan_unless(config, info.converged & fwd.converged, tuple(vjp_args(u)))
      x0_bar = jax.tree.map(jnp.zeros_like, x0)
      return x0_bar, args_bar, diagnostics_cotangent(probe, info, forward=fwd)

    _impl.defvjp(_fwd, _bwd)

    @functools.wraps(solver)
    def wrapped(x0, *args, diagnostics: AdjointDiagnostics | None = None):
      _check_probe(diagnostics)
      return _impl(x0, tuple(args), diagnostics)

    return wrapped

  return decorator


def custom_fixed_point(fixed_point_fn: Callable[..., PyTree], solve: str | Callable | None = None,
                       config: AdjointConfig | None = None, has_aux: bool = False, *,
                       symmetric: bool = False):
  """Decorator adding implicit differentiation to a fixed-point solver ``x* = T(x*, *args)``.

  This is `custom_root` with ``F(x, args) = x - T(x, args)``, so the forward check is
  ``|x* - T(x*)| <= forward_tol (1 + |x*|)`` and the backward solves ``(I - dT/dx)^T u = g`` and
  returns ``(dT/dargs)^T u``. The operator is not symmetric in general, so unless ``symmetric``
  is declared the default adjoint method is GMRES. When ``T`` is a contraction the Neumann
  series (``solve="neumann"``, ``neumann_alpha=1``) is the iteration ``u <- g + (dT/dx)^T u``,
  which converges at the forward rate. See `custom_root` for the contract.

  Args:
    fixed_point_fn: ``T(x, *args) -> pytree shaped like x``.
    solve: as in `custom_root`.
    config: an `AdjointConfig`; its ``method`` (if set) or ``solve`` picks the adjoint method.
    has_aux: whether the solver returns ``(x, aux)`` (see `custom_root`).
    symmetric: whether ``I - dT/dx`` is symmetric positive definite (e.g. the gradient-descent
      map ``T(x) = x - eta grad f(x)``, where it is ``eta`` times the Hessian): CG instead of
      GMRES when no method is given.

  Returns:
    A decorator, as `custom_root`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> T = lambda x, theta: 0.5 * x + theta        # x* = 2 theta
    >>> @custom_fixed_point(T)
    ... def solver(x0, theta):
    ...   return fixed_point_iteration(T, tol=1e-7, maxiter=100)(x0, theta)
    >>> round(float(jax.grad(lambda t: solver(0.0, t))(1.0)), 5)
    2.0
  """

  def optimality_fn(x, *args):
    return jax.tree.map(lambda a, b: a - b, x, fixed_point_fn(x, *args))

  return custom_root(optimality_fn, solve=solve, config=config, has_aux=has_aux,
                     symmetric=symmetric)


def fixed_point_iteration(fixed_point_fn: Callable[..., PyTree], tol: float = 1e-10,
                          maxiter: int = 1000, return_info: bool = False):
  """A plain forward solver ``x <- T(x, *args)`` run in a `lax.while_loop`.

  Stops when ``|T(x) - x| <= tol * (1 + |T(x)|)`` or after ``maxiter`` steps. Not differentiable
  on its own (reverse mode cannot go through a while loop); wrap the solver it builds with
  `custom_fixed_point`.

  Args:
    fixed_point_fn: ``T(x, *args)``.
    tol: relative stopping tolerance.
    maxiter: iteration cap.
    return_info: also return a `SolveInfo`: ``residual`` is the last step's
      ``|T(x) - x| / (1 + |T(x)|)``, ``iterations`` the number of applications of ``T`` and
      ``converged`` whether the tolerance was met. Pass ``has_aux=True`` to `custom_fixed_point`
      to have the iteration count reported in its diagnostics.

  Returns:
    ``solver(x0, *args) -> x`` (or ``-> (x, SolveInfo)`` with ``return_info``).

  Raises:
    ValueError: if ``maxiter < 1``.

  Example:
    >>> import jax.numpy as jnp
    >>> solver = fixed_point_iteration(lambda x, a: jnp.cos(x) * a, tol=1e-6)
    >>> round(float(solver(jnp.asarray(0.0), 1.0)), 4)
    0.7391
  """
  if not maxiter >= 1:
    raise ValueError(f"maxiter must be >= 1, got {maxiter!r}")

  def solver(x0, *args):
    def cond(s):
      _, rel, k = s
      return (rel > tol) & (k < maxiter)

    def body(s):
      x, _, k = s
      x_new = fixed_point_fn(x, *args)
      step = tree_norm(jax.tree.map(lambda a, b: a - b, x_new, x))
      return x_new, step / (1.0 + tree_norm(x_new)), k + 1

    x0 = jax.tree.map(jnp.asarray, fixed_point_fn(jax.tree.map(jnp.asarray, x0), *args))
    rel0 = jnp.full((), jnp.inf, jnp.asarray(tree_norm(x0)).dtype)
    x, rel, k = jax.lax.while_loop(cond, body, (x0, rel0, jnp.asarray(1, jnp.int32)))
    if not return_info:
      return x
    return x, SolveInfo(rel, k, rel <= tol)

  return solver
