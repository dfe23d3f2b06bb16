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
  * The adjoint solve's residual, iteration count and convergence flag are readable through an
    `AdjointDiagnostics` probe (``diagnostics=`` keyword) and checked according to
    ``AdjointConfig.on_nonconvergence``.
"""
from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp

from lowrank_jax.implicit._config import AdjointConfig, AdjointDiagnostics, SolveInfo
from lowrank_jax.implicit._linear_solve import linear_solve

PyTree = Any


def _as_config(solve, config) -> AdjointConfig:
  if config is None:
    config = AdjointConfig()
  if not isinstance(config, AdjointConfig):
    raise TypeError(f"config must be an AdjointConfig, got {type(config).__name__}")
  if solve is None:
    return config
  if isinstance(solve, str):
    return config.replace(method=solve)
  if callable(solve):
    return config
  raise TypeError(f"solve must be a method name, a callable or None, got {solve!r}")


def _raise_or_warn(policy: str, context: str):
  """Host callback that reports a failed adjoint solve."""

  def report(converged, residual, iterations, gap):
    if bool(jnp.all(converged)):
      return
    msg = (f"{context}: adjoint linear solve did not converge (relative residual "
           f"{float(jnp.max(residual)):.3e} after {int(jnp.max(iterations))} iterations")
    if float(jnp.max(gap)) != 0.0 or float(jnp.min(gap)) != 0.0:
      msg += f"; relative eigengap at the rank cut {float(jnp.min(gap)):.3e}"
    msg += ("). The returned cotangent is the best finite iterate (smallest residual) and may "
            "be inaccurate.")
    if policy == "raise":
      raise RuntimeError(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=2)

  return report


def report_nonconvergence(config: AdjointConfig, info: SolveInfo, context: str, gap=None,
                          converged=None):
  """Applies ``config.on_nonconvergence`` to a solve's diagnostics (inside traced code)."""
  if config.on_nonconvergence == "ignore":
    return
  converged = info.converged if converged is None else converged
  gap = jnp.zeros_like(info.residual) if gap is None else gap
  jax.debug.callback(_raise_or_warn(config.on_nonconvergence, context), converged,
                     info.residual, info.iterations, gap)


def diagnostics_cotangent(probe, info: SolveInfo, gap=None, converged=None):
  """The value written into an `AdjointDiagnostics` probe's cotangent."""
  if probe is None:
    return None
  converged = info.converged if converged is None else converged
  vals = AdjointDiagnostics(info.residual, info.iterations, converged,
                            jnp.zeros(()) if gap is None else gap)
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
    r = jax.tree.map(lambda bi, ai: bi - ai, b, matvec(u))
    rn = jnp.sqrt(sum(jnp.vdot(x, x).real for x in jax.tree.leaves(r)))
    bn = jnp.sqrt(sum(jnp.vdot(x, x).real for x in jax.tree.leaves(b)))
    rel = jnp.where(bn > 0, rn / jnp.where(bn > 0, bn, 1.0), rn)
    dtype = jax.tree.leaves(b)[0].dtype if jax.tree.leaves(b) else jnp.float32
    ok = rel <= 2 * config.resolved_tol(dtype)
    return u, SolveInfo(rel, jnp.asarray(-1, jnp.int32), ok)
  return linear_solve(matvec, b, config=config)


def custom_root(optimality_fn: Callable[..., PyTree], solve: str | Callable | None = None,
                config: AdjointConfig | None = None, has_aux: bool = False):
  """Decorator adding implicit differentiation to a root-finding solver.

  Args:
    optimality_fn: ``F(x, *args) -> pytree shaped like x``; zero at the solution.
    solve: the adjoint linear solver: a method name (``"cg"``, ``"gmres"``, ``"normal_cg"``,
      ``"neumann"``, ``"dense"``; overrides ``config.method``) or a callable
      ``solve(matvec, b) -> u`` or ``-> (u, SolveInfo)``. ``None`` uses ``config.method``.
      The operator handed to the solver is ``(dF/dx)^T``; CG needs it symmetric positive
      definite (true when ``F`` is the gradient of a strongly convex objective).
    config: an `AdjointConfig` with tolerances, ``maxiter``, ``ridge``, warm start and the
      non-convergence policy.
    has_aux: whether the solver returns ``(x, aux)``; ``aux`` is not differentiated.

  Returns:
    A decorator mapping ``solver(x0, *args)`` to a function with the same signature plus an
    optional keyword ``diagnostics`` (an `AdjointDiagnostics` probe).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> def grad_ridge(w, lam, x, y):      # F = gradient of 0.5|xw - y|^2 + 0.5 lam |w|^2
    ...   return x.T @ (x @ w - y) + lam * w
    >>> @custom_root(grad_ridge, solve="cg", config=AdjointConfig(tol=1e-6))
    ... def ridge(w0, lam, x, y):
    ...   return jnp.linalg.solve(x.T @ x + lam * jnp.eye(x.shape[1]), x.T @ y)
    >>> x, y = jnp.eye(3), jnp.ones(3)
    >>> float(jax.grad(lambda lam: ridge(jnp.zeros(3), lam, x, y).sum())(1.0))  # d/dl 3/(1+l)
    -0.75
  """
  config = _as_config(solve, config)
  solve_fn = solve if (callable(solve) and not isinstance(solve, str)) else None

  def decorator(solver: Callable[..., Any]):

    @jax.custom_vjp
    def _impl(x0, args, probe):
      del probe
      return solver(x0, *args)

    def _fwd(x0, args, probe):
      sol = solver(jax.lax.stop_gradient(x0), *jax.lax.stop_gradient(args))
      x = sol[0] if has_aux else sol
      return sol, (x0, x, args, probe)

    def _bwd(res, g):
      x0, x, args, probe = res
      gx = g[0] if has_aux else g
      _, vjp_x = jax.vjp(lambda z: optimality_fn(z, *args), x)
      matvec = lambda u: vjp_x(u)[0]
      b = jax.tree.map(lambda t: -t, gx)
      u, info = _solve_adjoint(matvec, b, solve_fn or config.method, config)
      report_nonconvergence(config, info, f"custom_root({getattr(solver, '__name__', 'solver')})")
      _, vjp_args = jax.vjp(lambda *a: optimality_fn(x, *a), *args)
      args_bar = vjp_args(u)
      x0_bar = jax.tree.map(jnp.zeros_like, x0)
      return x0_bar, tuple(args_bar), diagnostics_cotangent(probe, info)

    _impl.defvjp(_fwd, _bwd)

    @functools.wraps(solver)
    def wrapped(x0, *args, diagnostics: AdjointDiagnostics | None = None):
      _check_probe(diagnostics)
      return _impl(x0, tuple(args), diagnostics)

    return wrapped

  return decorator


def custom_fixed_point(fixed_point_fn: Callable[..., PyTree], solve: str | Callable | None = None,
                       config: AdjointConfig | None = None, has_aux: bool = False):
  """Decorator adding implicit differentiation to a fixed-point solver ``x* = T(x*, *args)``.

  This is `custom_root` with ``F(x, args) = x - T(x, args)``, so the backward solves
  ``(I - dT/dx)^T u = g`` and returns ``(dT/dargs)^T u``. When ``T`` is a contraction the
  Neumann series (``solve="neumann"``, ``neumann_alpha=1``) is the iteration
  ``u <- g + (dT/dx)^T u``, which converges at the forward rate; GMRES is the general choice
  (the operator is not symmetric in general). See `custom_root` for the contract.

  Args:
    fixed_point_fn: ``T(x, *args) -> pytree shaped like x``.
    solve: as in `custom_root`.
    config: an `AdjointConfig`; when neither ``solve`` nor ``config`` is given the method is
      ``"gmres"``.
    has_aux: whether the solver returns ``(x, aux)``.

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
  if solve is None and config is None:
    config = AdjointConfig(method="gmres")

  def optimality_fn(x, *args):
    return jax.tree.map(lambda a, b: a - b, x, fixed_point_fn(x, *args))

  return custom_root(optimality_fn, solve=solve, config=config, has_aux=has_aux)


def fixed_point_iteration(fixed_point_fn: Callable[..., PyTree], tol: float = 1e-10,
                          maxiter: int = 1000):
  """A plain forward solver ``x <- T(x, *args)`` run in a `lax.while_loop`.

  Stops when ``|T(x) - x| <= tol * (1 + |x|)`` or after ``maxiter`` steps. Not differentiable on
  its own (reverse mode cannot go through a while loop); wrap the solver it builds with
  `custom_fixed_point`.

  Args:
    fixed_point_fn: ``T(x, *args)``.
    tol: relative stopping tolerance.
    maxiter: iteration cap.

  Returns:
    ``solver(x0, *args) -> x``.

  Example:
    >>> import jax.numpy as jnp
    >>> solver = fixed_point_iteration(lambda x, a: jnp.cos(x) * a, tol=1e-6)
    >>> round(float(solver(jnp.asarray(0.0), 1.0)), 4)
    0.7391
  """
  if not maxiter >= 1:
    raise ValueError(f"maxiter must be >= 1, got {maxiter!r}")

  def norm(t):
    return jnp.sqrt(sum(jnp.vdot(a, a).real for a in jax.tree.leaves(t)))

  def solver(x0, *args):
    def cond(s):
      _, err, k = s
      return (err > 0) & (k < maxiter)

    def body(s):
      x, _, k = s
      x_new = fixed_point_fn(x, *args)
      diff = norm(jax.tree.map(lambda a, b: a - b, x_new, x))
      err = jnp.where(diff > tol * (1.0 + norm(x_new)), diff, 0.0)
      return x_new, err, k + 1

    x0 = jax.tree.map(jnp.asarray, fixed_point_fn(jax.tree.map(jnp.asarray, x0), *args))
    err0 = jnp.full((), jnp.inf, jnp.asarray(norm(x0)).dtype)
    x, _, _ = jax.lax.while_loop(cond, body, (x0, err0, 1))
    return x

  return solver
