"""Gradient checks for implicit functions (shipped so that downstream tests can use them).

`check_implicit_grad` compares ``jax.grad(fn)`` against central finite differences along random
directions (and/or coordinates) and, optionally, against a reference gradient such as long
unrolled differentiation. It runs in float64 by default, inside the `jax.enable_x64` context
manager, so it never flips the global flag. Remember that finite differences ignore
`stop_gradient`: the function under test must compute its value exactly (e.g. re-solve the inner
problem to a tight tolerance) for the comparison to be meaningful.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

PyTree = Any


class GradCheckResult(NamedTuple):
  """What `check_implicit_grad` measured.

  Attributes:
    grad: the gradient of ``fn`` at ``theta`` (a pytree like ``theta``).
    fd_directional: list of ``(autodiff, finite_difference)`` directional derivatives.
    fd_max_error: max over directions of ``|ad - fd| / (atol + rtol |fd|)`` as an absolute
      error, i.e. ``max |ad - fd|``.
    reference_max_error: ``max |grad - reference|`` over entries (``nan`` if no reference).
    passed: whether every comparison met ``|a - b| <= atol + rtol |b|``.
  """
  grad: PyTree
  fd_directional: list
  fd_max_error: float
  reference_max_error: float
  passed: bool


def _to_x64(tree):
  def cast(x):
    x = np.asarray(x)
    return jnp.asarray(x, jnp.float64) if np.issubdtype(x.dtype, np.floating) else jnp.asarray(x)
  return jax.tree.map(cast, tree)


def check_implicit_grad(fn: Callable[[PyTree], jax.Array], theta: PyTree, *,
                        against: Sequence[str] = ("fd",),
                        reference: Callable | PyTree | None = None,
                        eps: float = 1e-6, rtol: float = 1e-6, atol: float = 1e-8,
                        num_directions: int = 3, coordinates: bool = False, seed: int = 0,
                        x64: bool = True, jit: bool = True,
                        raise_on_failure: bool = True) -> GradCheckResult:
  """Checks the reverse-mode gradient of a scalar function built on implicit differentiation.

  Args:
    fn: ``theta -> scalar``. It is differentiated with `jax.grad`; finite differences call it on
      perturbed ``theta``, so its forward pass must be accurate (solve the inner problem tightly).
    theta: the point (any pytree of float arrays).
    against: any of ``"fd"`` (central finite differences) and ``"reference"``.
    reference: for ``"reference"``: either a callable ``theta -> scalar`` differentiated by plain
      autodiff (e.g. long unrolling under `jax.checkpoint`) or a gradient pytree.
    eps: finite-difference step (along unit-norm directions).
    rtol: relative tolerance.
    atol: absolute tolerance.
    num_directions: random unit directions for ``"fd"``.
    coordinates: also check every coordinate direction (small problems only).
    seed: numpy seed for the directions.
    x64: run in float64 (via the `jax.enable_x64` context manager; the global flag is restored).
    jit: compile ``fn`` and its gradient once (all finite-difference points share shapes).
    raise_on_failure: raise `AssertionError` (with the measured errors) on failure.

  Returns:
    A `GradCheckResult`.

  Raises:
    ValueError: unknown ``against`` entry, or ``"reference"`` requested without ``reference``.
    AssertionError: if a comparison fails and ``raise_on_failure``.

  Example:
    >>> import jax.numpy as jnp
    >>> res = check_implicit_grad(lambda t: jnp.sum(jnp.sin(t) ** 2), jnp.arange(3.0))
    >>> res.passed
    True
  """
  for a in against:
    if a not in ("fd", "reference"):
      raise ValueError(f"against entries must be 'fd' or 'reference', got {a!r}")
  if "reference" in against and reference is None:
    raise ValueError("against includes 'reference' but no reference was given")
  ctx = jax.enable_x64(True) if x64 else contextlib.nullcontext()
  with ctx:
    theta = _to_x64(theta) if x64 else theta
    flat, unravel = ravel_pytree(theta)
    f_eval = jax.jit(fn) if jit else fn
    grad = (jax.jit(jax.grad(fn)) if jit else jax.grad(fn))(theta)
    gflat = np.asarray(ravel_pytree(grad)[0])
    rng = np.random.default_rng(seed)
    dirs = []
    if "fd" in against:
      for _ in range(num_directions):
        v = rng.normal(size=flat.shape)
        dirs.append(v / max(np.linalg.norm(v), 1e-300))
      if coordinates:
        dirs.extend(np.eye(flat.size))
    pairs = []
    passed = True
    fd_err = 0.0
    for v in dirs:
      vj = jnp.asarray(v, flat.dtype)
      fp = float(f_eval(unravel(flat + eps * vj)))
      fm = float(f_eval(unravel(flat - eps * vj)))
      fd = (fp - fm) / (2 * eps)
      ad = float(np.dot(gflat, v))
      pairs.append((ad, fd))
      fd_err = max(fd_err, abs(ad - fd))
      passed &= abs(ad - fd) <= atol + rtol * abs(fd)
    ref_err = float("nan")
    if "reference" in against:
      if callable(reference):
        ref = jax.grad(reference)(theta)
      else:
        ref = reference
      rflat = np.asarray(ravel_pytree(ref)[0])
      if rflat.shape != gflat.shape:
        raise ValueError(f"reference gradient has {rflat.size} entries, expected {gflat.size}")
      ref_err = float(np.max(np.abs(gflat - rflat))) if gflat.size else 0.0
      passed &= bool(np.all(np.abs(gflat - rflat) <= atol + rtol * np.abs(rflat)))
    result = GradCheckResult(grad, pairs, fd_err, ref_err, bool(passed))
  if raise_on_failure and not result.passed:
    raise AssertionError(
        f"implicit gradient check failed: max |ad - fd| = {fd_err:.3e} over {len(pairs)} "
        f"directions {pairs[:4]}; max |grad - reference| = {ref_err:.3e} "
        f"(rtol={rtol}, atol={atol})")
  return result
