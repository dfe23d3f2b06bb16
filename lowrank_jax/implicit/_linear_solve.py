"""Matrix-free linear solvers on pytrees, with diagnostics.

Each solver takes a linear operator ``matvec`` (pytree -> pytree of the same structure), a
right-hand side ``b`` and an initial guess, and returns ``(x, SolveInfo)``. Pytrees are flattened
with `jax.flatten_util.ravel_pytree`; all loops are `lax.while_loop`/`fori_loop`, so the solvers
work under `jit` and `vmap` (a batched predicate runs until every batch member stops). They are
not reverse-differentiable themselves: they are meant to run inside a `custom_vjp` backward.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree

from lowrank_jax.implicit._config import AdjointConfig, SolveInfo

PyTree = Any


def _dot(a, b):
  return jnp.vdot(a, b).real


def _finish(matvec, b, x, iters, thresh, bnorm):
  res = jnp.linalg.norm(b - matvec(x))
  safe = jnp.where(bnorm > 0, bnorm, 1.0)
  rel = jnp.where(bnorm > 0, res / safe, res)
  finite = jnp.all(jnp.isfinite(x))
  converged = (res <= 2.0 * thresh) & finite
  return SolveInfo(rel, jnp.asarray(iters, jnp.int32), converged)


def _cg(matvec, b, x0, thresh, maxiter):
  """Conjugate gradients; stops on tolerance, maxiter, or breakdown (p^T A p <= 0 / non-finite).

  Returns the iterate with the smallest (recursive) residual seen: on an ill-conditioned or
  indefinite system that has lost orthogonality, this is the best partial answer, never a blow-up.
  """
  r0 = b - matvec(x0)
  rr0 = _dot(r0, r0)

  def cond(s):
    _, _, _, rr, k, broken, _, _ = s
    return (jnp.sqrt(rr) > thresh) & (k < maxiter) & ~broken

  def body(s):
    x, r, p, rr, k, _, best, best_rr = s
    ap = matvec(p)
    pap = _dot(p, ap)
    bad = ~(pap > 0) | ~jnp.isfinite(pap)
    alpha = jnp.where(bad, 0.0, rr / jnp.where(bad, 1.0, pap))
    x = x + alpha * p
    r = r - alpha * ap
    rr_new = _dot(r, r)
    bad = bad | ~jnp.isfinite(rr_new)
    beta = rr_new / jnp.where(rr > 0, rr, 1.0)
    p = r + beta * p
    rr_new = jnp.where(bad, rr, rr_new)
    better = ~bad & (rr_new < best_rr)
    best = jnp.where(better, x, best)
    best_rr = jnp.where(better, rr_new, best_rr)
    return x, r, p, rr_new, k + 1, bad, best, best_rr

  init = (x0, r0, r0, rr0, jnp.asarray(0, jnp.int32), jnp.asarray(False), x0, rr0)
  _, _, _, _, k, _, best, _ = lax.while_loop(cond, body, init)
  return best, k


def _neumann(matvec, b, x0, thresh, maxiter, alpha):
  """Richardson iteration u <- u + alpha (b - A u): the truncated Neumann series when u0 = 0.

  Returns the iterate with the smallest residual seen, so a diverging series (alpha too large, or
  an indefinite operator) degrades to its best partial sum instead of blowing up.
  """
  r0 = b - matvec(x0)
  n0 = jnp.linalg.norm(r0)

  def cond(s):
    _, r, k, _, _ = s
    return (jnp.linalg.norm(r) > thresh) & (k < maxiter) & jnp.all(jnp.isfinite(r))

  def body(s):
    x, r, k, best, best_n = s
    x_new = x + alpha * r
    r_new = b - matvec(x_new)
    n_new = jnp.linalg.norm(r_new)
    ok = jnp.isfinite(n_new)
    better = ok & (n_new < best_n)
    best = jnp.where(better, x_new, best)
    best_n = jnp.where(better, n_new, best_n)
    return (jnp.where(ok, x_new, x), jnp.where(ok, r_new, jnp.full_like(r, jnp.nan)), k + 1,
            best, best_n)

  _, _, k, best, _ = lax.while_loop(cond, body, (x0, r0, jnp.asarray(0, jnp.int32), x0, n0))
  return best, k


def _gmres(matvec, b, x0, thresh, maxiter, restart):
  """Restarted GMRES(m) with classical Gram-Schmidt applied twice, least squares by SVD."""
  n = b.shape[0]
  m = int(min(restart, n))
  dtype = b.dtype

  def cycle(x):
    r = b - matvec(x)
    beta = jnp.linalg.norm(r)
    v0 = r / jnp.where(beta > 0, beta, 1.0)
    vs = jnp.zeros((m + 1, n), dtype).at[0].set(v0)
    h = jnp.zeros((m + 1, m), dtype)

    def arnoldi(j, carry):
      vs, h = carry
      w = matvec(vs[j])
      mask = (jnp.arange(m + 1) <= j).astype(dtype)
      c1 = (vs @ w) * mask
      w = w - c1 @ vs
      c2 = (vs @ w) * mask
      w = w - c2 @ vs
      hn = jnp.linalg.norm(w)
      ok = hn > 1e-300
      vs = vs.at[j + 1].set(jnp.where(ok, w / jnp.where(ok, hn, 1.0), 0.0))
      h = h.at[:, j].set((c1 + c2).at[j + 1].set(hn))
      return vs, h

    vs, h = lax.fori_loop(0, m, arnoldi, (vs, h))
    e1 = jnp.zeros((m + 1,), dtype).at[0].set(beta)
    y = jnp.linalg.lstsq(h, e1)[0]
    x_new = x + y @ vs[:m]
    return jnp.where(jnp.all(jnp.isfinite(x_new)), x_new, x)

  def cond(s):
    _, res, k = s
    return (res > thresh) & (k < maxiter)

  def body(s):
    x, _, k = s
    x = cycle(x)
    return x, jnp.linalg.norm(b - matvec(x)), k + m

  res0 = jnp.linalg.norm(b - matvec(x0))
  x, _, k = lax.while_loop(cond, body, (x0, res0, jnp.asarray(0, jnp.int32)))
  return x, k


def _dense(matvec, b):
  n = b.shape[0]
  a = jax.vmap(matvec)(jnp.eye(n, dtype=b.dtype)).T
  return jnp.linalg.lstsq(a, b)[0]


def linear_solve(matvec: Callable[[PyTree], PyTree], b: PyTree, x0: PyTree | None = None,
                 config: AdjointConfig | None = None, method: str | None = None, *,
                 symmetric: bool = False):
  """Solves ``A x = b`` for a matrix-free linear operator on pytrees.

  Args:
    matvec: the linear map ``x -> A x`` (same pytree structure in and out).
    b: right-hand side pytree.
    x0: initial guess; defaults to ``b`` if ``config.warm_start`` else zeros.
    config: an `AdjointConfig` (method, tolerances, maxiter, ridge, ...).
    method: overrides ``config.method``.
    symmetric: whether ``A`` is symmetric positive definite; decides the method when neither
      ``method`` nor ``config.method`` does (CG if True, GMRES if False).

  Returns:
    ``(x, info)`` with ``x`` shaped like ``b`` and ``info`` a `SolveInfo`. Non-convergence is
    reported in ``info``, never raised here; ``x`` is a finite iterate (CG and Neumann return
    the one with the smallest residual seen).

  Raises:
    ValueError: for an unknown method.

  Example:
    >>> import jax.numpy as jnp
    >>> a = jnp.array([[4., 1.], [1., 3.]])
    >>> x, info = linear_solve(lambda v: a @ v, jnp.array([1., 2.]),
    ...                        config=AdjointConfig(tol=1e-6), symmetric=True)   # CG
    >>> bool(info.converged), jnp.allclose(a @ x, jnp.array([1., 2.]), atol=1e-5)
    (True, Array(True, dtype=bool))
  """
  config = config or AdjointConfig()
  if method is not None:
    config = config.replace(method=method)
  config = config.resolve(symmetric)
  if config.neumann_alpha_grid is not None:
    raise ValueError("linear_solve: AdjointConfig.neumann_alpha_grid is learned across a "
                     "sequence of solves (bilevel.tune_hyperparameters); for one solve set "
                     "neumann_alpha instead")
  flat_b, unravel = ravel_pytree(b)
  if flat_b.size == 0:
    z = jnp.zeros((), flat_b.dtype)
    return b, SolveInfo(z, jnp.asarray(0, jnp.int32), jnp.asarray(True))
  dtype = flat_b.dtype
  ridge = config.ridge

  def mv(v):
    out = ravel_pytree(matvec(unravel(v)))[0].astype(dtype)
    return out + ridge * v if ridge else out

  if x0 is None:
    flat_x0 = flat_b if config.warm_start else jnp.zeros_like(flat_b)
  else:
    flat_x0 = ravel_pytree(x0)[0].astype(dtype)

  bnorm = jnp.linalg.norm(flat_b)
  thresh = jnp.maximum(config.resolved_tol(dtype) * bnorm, config.atol)
  method = config.method
  if method == "cg":
    x, k = _cg(mv, flat_b, flat_x0, thresh, config.maxiter)
  elif method == "neumann":
    x, k = _neumann(mv, flat_b, flat_x0, thresh, config.maxiter, config.neumann_alpha)
  elif method == "gmres":
    x, k = _gmres(mv, flat_b, flat_x0, thresh, config.maxiter, config.restart)
  elif method == "normal_cg":
    mv_t = jax.linear_transpose(mv, flat_b)
    normal = lambda v: mv_t(mv(v))[0]
    rhs = mv_t(flat_b)[0]
    # The normal system's tolerance is scaled so that the original residual is what is reported.
    nthresh = jnp.maximum(config.resolved_tol(dtype) * jnp.linalg.norm(rhs), config.atol)
    x, k = _cg(normal, rhs, flat_x0, nthresh, config.maxiter)
  elif method == "dense":
    x, k = _dense(mv, flat_b), 1
  else:  # AdjointConfig validates, but `method=` may bypass it.
    raise ValueError(f"unknown linear solve method {method!r}")
  info = _finish(mv, flat_b, x, k, thresh, bnorm)
  return unravel(x), info
