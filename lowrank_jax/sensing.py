"""Low-rank matrix sensing by gradient descent on factored parameterisations.

Xiong, Ding & Du, "How Over-Parameterization Slows Down Gradient Descent in Matrix Sensing"
(ICLR 2024, arXiv 2310.01769). A rank-r PSD target M* (n × n) is observed through m linear
measurements y_i = ⟨A_i, M*⟩ with Gaussian A_i, and fitted by gradient descent on

    L(M) = (1 / 2m) Σ_i (⟨A_i, M⟩ − y_i)²

through a factored M with k ≥ r columns per factor, from a small random init of scale α:

* symmetric, M = X Xᵀ (X: n × k). With k = r the error falls linearly (exp(−Ω(T))); with k > r
  the paper proves the lower bound ‖X_T X_Tᵀ − M*‖²_F ≥ Ω(1/T²): the spare directions of X decay
  like x ← x − cηx³, i.e. polynomially.
* asymmetric, M = F Gᵀ, F₀ of scale α and G₀ of scale α/3 (the imbalance is part of the method).
  Over-parameterised, the error falls linearly at a rate that scales with α²: the imbalance
  FᵀF − GᵀG is conserved by gradient flow, so F's spare columns stay at scale ~α and shrink G's
  spurious part by about (1 − ηα²) per step.
* the paper's one-step fix changes one step near the optimum so that the imbalance is amplified
  while F Gᵀ stays fixed, which removes the α dependence. The paper's exact update is not
  reproduced here; `rebalance` is this module's variant: F ← F R, G ← G R⁻ᵀ with
  R = c·(FᵀF)^(-1/2), which leaves F Gᵀ unchanged and gives all of F's singular values the value c
  (c = 1 by default).

The error metric is ‖M − M*‖²_F. Everything is pure jnp (run it in float64, `jax_enable_x64`, to
follow the error down to 1e-20); each run is one `lax.scan` that records the error before every
step.

>>> import jax
>>> from lowrank_jax import sensing
>>> problem = sensing.make_problem(jax.random.key(0), n=6, rank=2, num_measurements=80)
>>> problem.a.shape, problem.y.shape, float(sensing.error(problem, problem.target))
((80, 6, 6), (80,), 0.0)
>>> x0 = sensing.small_init(jax.random.key(1), n=6, k=2, alpha=0.1)   # then, e.g.:
>>> # errors = sensing.run_symmetric(problem, x0, eta=0.1, steps=300)   # (301,) errors
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np


class SensingProblem(NamedTuple):
  """A matrix-sensing instance.

  Attributes:
    a: the measurement matrices A_i, shape (m, n, n).
    y: the measurements y_i = ⟨A_i, M*⟩, shape (m,).
    target: the PSD target M*, shape (n, n).
  """
  a: jax.Array
  y: jax.Array
  target: jax.Array


def _check_positive_int(name: str, value) -> None:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
    raise ValueError(f"sensing: {name} must be a positive int, got {value!r}")


def _check_positive(name: str, value) -> None:
  if not isinstance(value, (int, float, np.floating)) or isinstance(value, bool) or value <= 0:
    raise ValueError(f"sensing: {name} must be a positive number, got {value!r}")


def make_problem(key: jax.Array, n: int = 50, rank: int = 3, num_measurements: int = 1500,
                 singular_values: Optional[Sequence[float]] = None,
                 dtype=jnp.float32) -> SensingProblem:
  """A rank-`rank` PSD target M* = U diag(σ) Uᵀ (U: random orthonormal n × rank) observed through
  `num_measurements` Gaussian matrices with N(0, 1) entries.

  Args:
    key: PRNG key.
    n: matrix size.
    rank: the target's rank r (1 <= r <= n).
    num_measurements: m.
    singular_values: σ, `rank` positive values; default evenly spaced from 1 down to 0.5
      (1, 0.75, 0.5 for rank 3).
    dtype: dtype of the arrays.

  Raises:
    ValueError: a size that is not a positive int, rank > n, or singular values of the wrong
      count or sign.
  """
  for name, value in (("n", n), ("rank", rank), ("num_measurements", num_measurements)):
    _check_positive_int(name, value)
  if rank > n:
    raise ValueError(f"sensing: rank must be <= n = {n}, got {rank}")
  if singular_values is None:
    singular_values = np.linspace(1.0, 0.5, rank) if rank > 1 else np.ones(1)
  sigma = jnp.asarray(singular_values, dtype)
  if sigma.shape != (rank,) or not bool(jnp.all(sigma > 0)):
    raise ValueError(f"sensing: singular_values must be {rank} positive values, "
                     f"got {list(np.asarray(singular_values))}")
  k_u, k_a = jax.random.split(key)
  u, _ = jnp.linalg.qr(jax.random.normal(k_u, (n, rank), dtype))
  target = (u * sigma) @ u.T
  a = jax.random.normal(k_a, (num_measurements, n, n), dtype)
  return SensingProblem(a, measure(a, target), target)


def measure(a: jax.Array, m: jax.Array) -> jax.Array:
  """The measurements ⟨A_i, M⟩ = Σ_jk A_ijk M_jk, shape (m,)."""
  return a.reshape(a.shape[0], -1) @ m.reshape(-1)


def loss_gradient(problem: SensingProblem, m: jax.Array) -> jax.Array:
  """∇L(M) = (1/m) Σ_i (⟨A_i, M⟩ − y_i) A_i, shape (n, n)."""
  a = problem.a.reshape(problem.a.shape[0], -1)
  residual = a @ m.reshape(-1) - problem.y
  return (a.T @ residual).reshape(m.shape) / a.shape[0]


def error(problem: SensingProblem, m: jax.Array) -> jax.Array:
  """‖M − M*‖²_F."""
  return jnp.sum((m - problem.target) ** 2)


def small_init(key: jax.Array, n: int, k: int, alpha: float, dtype=jnp.float32) -> jax.Array:
  """An n × k factor with N(0, α²/n) entries, so that its columns have norm about α."""
  _check_positive_int("n", n)
  _check_positive_int("k", k)
  _check_positive("alpha", alpha)
  return alpha / np.sqrt(n) * jax.random.normal(key, (n, k), dtype)


def asymmetric_init(key: jax.Array, n: int, k: int, alpha: float,
                    dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
  """(F₀, G₀): `small_init` factors of scales α and α/3 (the paper's imbalanced init)."""
  k_f, k_g = jax.random.split(key)
  return small_init(k_f, n, k, alpha, dtype), small_init(k_g, n, k, alpha / 3, dtype)


def _check_run(eta, steps) -> None:
  _check_positive("eta", eta)
  _check_positive_int("steps", steps)


def run_symmetric(problem: SensingProblem, x0: jax.Array, eta: float, steps: int) -> jax.Array:
  """Gradient descent on L(X Xᵀ): X ← X − η (∇L + ∇Lᵀ) X.

  Returns:
    ‖X_t X_tᵀ − M*‖²_F for t = 0, …, steps, shape (steps + 1,).

  Raises:
    ValueError: eta not positive or steps not a positive int.
  """
  _check_run(eta, steps)
  return _run_symmetric(problem, x0, eta, steps)


@functools.partial(jax.jit, static_argnames="steps")
def _run_symmetric(problem, x0, eta, steps):
  def step(x, _):
    m = x @ x.T
    grad = loss_gradient(problem, m)
    return x - eta * (grad + grad.T) @ x, error(problem, m)

  x, errors = jax.lax.scan(step, x0, None, length=steps)
  return jnp.append(errors, error(problem, x @ x.T))


def rebalance(f: jax.Array, g: jax.Array, scale: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """(F R, G R⁻ᵀ) with R = c·(FᵀF)^(-1/2), c = `scale`: F Gᵀ is unchanged and every singular
  value of F R is c (needs F of full column rank)."""
  evals, evecs = jnp.linalg.eigh(f.T @ f)
  r = scale * (evecs * evals ** -0.5) @ evecs.T            # c (FᵀF)^(-1/2), symmetric
  r_inv_t = (evecs * evals ** 0.5) @ evecs.T / scale       # R⁻ᵀ = R⁻¹ = (FᵀF)^(1/2) / c
  return f @ r, g @ r_inv_t


def run_asymmetric(problem: SensingProblem, f0: jax.Array, g0: jax.Array, eta: float,
                   steps: int, rebalance_below: Optional[float] = None,
                   rebalance_scale: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Gradient descent on L(F Gᵀ): F ← F − η ∇L G, G ← G − η ∇Lᵀ F (simultaneous).

  Args:
    problem: the instance.
    f0: initial F (n × k).
    g0: initial G (n × k).
    eta: step size.
    steps: number of steps.
    rebalance_below: None for plain GD; else `rebalance` is applied once, before the first step
      whose error is below this value.
    rebalance_scale: c of `rebalance`.

  Returns:
    (errors, rebalanced_at): ‖F_t G_tᵀ − M*‖²_F for t = 0, …, steps, shape (steps + 1,), and the
    step before which the rebalancing ran (-1 if it did not).

  Raises:
    ValueError: eta, steps, rebalance_below or rebalance_scale out of range.
  """
  _check_run(eta, steps)
  if rebalance_below is not None:
    _check_positive("rebalance_below", rebalance_below)
  _check_positive("rebalance_scale", rebalance_scale)
  threshold = -1.0 if rebalance_below is None else rebalance_below
  return _run_asymmetric(problem, f0, g0, eta, steps, threshold, rebalance_scale)


@functools.partial(jax.jit, static_argnames="steps")
def _run_asymmetric(problem, f0, g0, eta, steps, threshold, scale):
  def step(carry, t):
    f, g, at = carry
    err = error(problem, f @ g.T)
    now = (at < 0) & (err < threshold)
    f, g = jax.lax.cond(now, lambda fg: rebalance(*fg, scale), lambda fg: fg, (f, g))
    at = jnp.where(now, t, at)
    grad = loss_gradient(problem, f @ g.T)
    return (f - eta * grad @ g, g - eta * grad.T @ f, at), err

  (f, g, at), errors = jax.lax.scan(step, (f0, g0, jnp.asarray(-1)), jnp.arange(steps))
  return jnp.append(errors, error(problem, f @ g.T)), at


def run_symmetric_batch(problem: SensingProblem, x0s: jax.Array, eta: float,
                        steps: int) -> jax.Array:
  """`run_symmetric` for a batch of inits x0s (B, n, k) on one problem, in one vectorised scan
  (the measurement matrices are read once per step for the whole batch).

  Returns:
    errors, shape (B, steps + 1).
  """
  _check_run(eta, steps)
  return jax.vmap(lambda x0: _run_symmetric(problem, x0, eta, steps))(x0s)


def run_asymmetric_batch(problem: SensingProblem, f0s: jax.Array, g0s: jax.Array, eta: float,
                         steps: int, rebalance_below: Sequence[Optional[float]],
                         rebalance_scale: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """`run_asymmetric` for a batch of inits f0s, g0s (B, n, k) on one problem, in one vectorised
  scan; `rebalance_below` has one entry (None or a threshold) per run.

  Returns:
    (errors (B, steps + 1), rebalanced_at (B,)).
  """
  _check_run(eta, steps)
  if len(rebalance_below) != len(f0s):
    raise ValueError(f"sensing: rebalance_below needs one entry per run ({len(f0s)}), got "
                     f"{len(rebalance_below)}")
  for value in rebalance_below:
    if value is not None:
      _check_positive("rebalance_below", value)
  _check_positive("rebalance_scale", rebalance_scale)
  thresholds = jnp.asarray([-1.0 if v is None else v for v in rebalance_below], f0s.dtype)
  run = lambda f0, g0, threshold: _run_asymmetric(problem, f0, g0, eta, steps, threshold,
                                                  rebalance_scale)
  return jax.vmap(run)(f0s, g0s, thresholds)


def loglog_slope(steps, errors) -> float:
  """Least-squares slope of log(error) against log(step): −2 for an error ∝ 1/T²."""
  steps, errors = np.asarray(steps, np.float64), np.asarray(errors, np.float64)
  return float(np.polyfit(np.log(steps), np.log(errors), 1)[0])


def linear_rate(steps, errors) -> float:
  """The rate ρ of an error ∝ exp(−ρ T): minus the least-squares slope of log(error) against
  the step."""
  steps, errors = np.asarray(steps, np.float64), np.asarray(errors, np.float64)
  return float(-np.polyfit(steps, np.log(errors), 1)[0])
