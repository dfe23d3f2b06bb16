"""Learning to relax: choosing the SOR relaxation parameter across a sequence of linear systems.

Setting (Khodak, Chow, Balcan & Talwalkar, "Learning to Relax", ICLR 2024): systems
``A_t x = b_t`` arrive one after another; for each the learner picks a relaxation ``omega`` from a
fixed grid, runs SOR with it, and observes only the number of sweeps that run took (bandit
feedback). Two learners:

* `tsallis_inf_*`: the Tsallis-INF bandit (Zimmert & Seldin, JMLR 2021) with the 1/2-Tsallis
  entropy regulariser, competing with the best fixed grid point in hindsight. Choices made here:
  learning rate ``eta_t = eta_scale / sqrt(t)`` (``eta_scale = 2`` by default, the adversarial
  tuning) and the plain importance-weighted loss estimator.
* `square_cb_*`: a contextual bandit for a known scalar context per system (e.g. the diagonal shift
  ``c`` of ``A + c I``), competing with the instance-optimal choice. The paper's contextual method
  regresses the cost on Chebyshev polynomials of the context; here that is SquareCB's inverse-gap
  weighting (Foster & Rakhlin, ICML 2020) over per-arm online ridge regressions on Chebyshev
  features, with ``gamma_t = gamma_scale sqrt(K t)`` (this module's choices, not the paper's
  tuned constants).

Losses are iteration counts divided by the sweep budget, so they lie in [0, 1]. All learner
functions are pure (state in, state out, explicit PRNG keys) and jit/scan compatible. Run the
learners in float64 (``jax.enable_x64``) for long sequences: the importance-weighted cumulative
losses of Tsallis-INF grow like the number of rounds divided by the smallest probability played.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

_NEWTON_STEPS = 60


# ----------------------------------------------------------------------------------------------
# SOR on explicit matrices.
# ----------------------------------------------------------------------------------------------

class SORResult(NamedTuple):
  """Output of `sor_solve`.

  Attributes:
    x: the last iterate.
    iterations: number of SOR sweeps run (int32): the first sweep count at which the relative
      residual ``|b - A x| / |b|`` was at most ``tol``, or ``max_iter`` if that never happened.
    converged: whether the tolerance was reached within ``max_iter`` sweeps.
    residual: relative residual of ``x``.
  """
  x: jax.Array
  iterations: jax.Array
  converged: jax.Array
  residual: jax.Array


def _check_sor_args(a, b, omega, tol, max_iter):
  if a.ndim != 2 or a.shape[0] != a.shape[1]:
    raise ValueError(f"sor_solve: `a` must be a square matrix, got shape {a.shape}")
  if b.shape != a.shape[:1]:
    raise ValueError(f"sor_solve: `b` must have shape {a.shape[:1]} to match `a`, got {b.shape}")
  if isinstance(omega, (int, float)) and not 0.0 < omega < 2.0:
    raise ValueError(f"sor_solve: `omega` must lie in (0, 2) for SOR to converge, got {omega}")
  if not tol > 0:
    raise ValueError(f"sor_solve: `tol` must be positive, got {tol}")
  if not isinstance(max_iter, int) or max_iter < 1:
    raise ValueError(f"sor_solve: `max_iter` must be a positive int, got {max_iter!r}")


def sor_solve(a: jax.Array, b: jax.Array, omega, *, x0: jax.Array | None = None,
              tol: float = 1e-8, max_iter: int = 1000) -> SORResult:
  """Successive over-relaxation for ``a x = b`` with an explicit matrix, sweeping rows in order.

  One sweep updates ``x_i <- (1 - omega) x_i + omega (b_i - sum_{j<i} a_ij x_j^new
  - sum_{j>i} a_ij x_j^old) / a_ii`` for ``i = 0, ..., n-1``; it is computed as the lower-triangular
  solve ``(D + omega L) x^new = omega (b - U x) + (1 - omega) D x`` (D, L, U: the diagonal and the
  strictly lower/upper parts of ``a``). ``omega = 1`` is Gauss-Seidel. SOR converges for every
  ``omega`` in (0, 2) when ``a`` is symmetric positive definite; the diagonal must be nonzero.

  Args:
    a: (n, n) matrix.
    b: (n,) right-hand side.
    omega: relaxation parameter, a Python float or a traced scalar (so `jax.vmap` over a grid
      works; a Python float outside (0, 2) is rejected).
    x0: initial iterate, zeros by default.
    tol: relative-residual tolerance.
    max_iter: sweep budget.

  Returns:
    `SORResult`; ``iterations`` is the cost a tuner sees.

  Raises:
    ValueError: on a non-square ``a``, a mismatched ``b``, ``omega`` outside (0, 2), a
      non-positive ``tol`` or ``max_iter``.
  """
  a, b = jnp.asarray(a), jnp.asarray(b)
  _check_sor_args(a, b, omega, tol, max_iter)
  omega = jnp.asarray(omega, a.dtype)
  diag = jnp.diagonal(a)
  lower = jnp.diag(diag) + omega * jnp.tril(a, -1)
  upper = jnp.triu(a, 1)
  norm_b = jnp.maximum(jnp.linalg.norm(b), jnp.finfo(a.dtype).tiny)
  relative_residual = lambda x: jnp.linalg.norm(b - a @ x) / norm_b

  def sweep(state):
    k, x, _ = state
    rhs = omega * (b - upper @ x) + (1.0 - omega) * diag * x
    x = solve_triangular(lower, rhs, lower=True)
    return k + 1, x, relative_residual(x)

  x = jnp.zeros_like(b) if x0 is None else jnp.asarray(x0, b.dtype)
  init = (jnp.int32(0), x, relative_residual(x))
  k, x, res = jax.lax.while_loop(lambda s: (s[0] < max_iter) & (s[2] > tol), sweep, init)
  return SORResult(x, k, res <= tol, res)


def sor_iterations(a: jax.Array, b: jax.Array, omegas: jax.Array, *, tol: float = 1e-8,
                   max_iter: int = 1000) -> jax.Array:
  """SOR sweep counts of ``a x = b`` for every relaxation in ``omegas`` (a 1-D grid), from zero."""
  run = lambda w: sor_solve(a, b, w, tol=tol, max_iter=max_iter).iterations
  return jax.vmap(run)(jnp.asarray(omegas, jnp.asarray(a).dtype))


def young_omega(jacobi_radius) -> jax.Array:
  """Young's optimal SOR relaxation ``2 / (1 + sqrt(1 - rho^2))``.

  For a consistently ordered matrix whose Jacobi iteration matrix has spectral radius
  ``rho < 1``, e.g. the Poisson matrices (``rho = cos(pi h)``; after a diagonal shift ``c`` in 2-D,
  ``rho = 4 cos(pi h) / (4 + c)``).
  """
  rho = jnp.asarray(jacobi_radius)
  return 2.0 / (1.0 + jnp.sqrt(1.0 - rho ** 2))


def poisson_2d(m: int, dtype=jnp.float32) -> jax.Array:
  """The (m², m²) five-point Laplacian (4 on the diagonal, -1 for grid neighbours) of an m×m
  interior grid with Dirichlet boundary, rows in lexicographic order; mesh width ``1 / (m + 1)``.
  """
  if not isinstance(m, int) or m < 1:
    raise ValueError(f"poisson_2d: `m` must be a positive int, got {m!r}")
  t = 2.0 * jnp.eye(m, dtype=dtype) - jnp.eye(m, k=1, dtype=dtype) - jnp.eye(m, k=-1, dtype=dtype)
  eye = jnp.eye(m, dtype=dtype)
  return jnp.kron(t, eye) + jnp.kron(eye, t)


# ----------------------------------------------------------------------------------------------
# Tsallis-INF (non-contextual bandit).
# ----------------------------------------------------------------------------------------------

class TsallisINFState(NamedTuple):
  """Tsallis-INF state.

  Attributes:
    loss_estimates: (K,) cumulative importance-weighted loss estimates ``sum_s l_s 1[I_s = i] /
      p_s,i``.
    rounds: number of rounds played so far.
  """
  loss_estimates: jax.Array
  rounds: jax.Array


def tsallis_inf_init(num_arms: int, dtype=jnp.float32) -> TsallisINFState:
  """Initial state: zero loss estimates (the first distribution is uniform)."""
  if not isinstance(num_arms, int) or num_arms < 1:
    raise ValueError(f"tsallis_inf_init: `num_arms` must be a positive int, got {num_arms!r}")
  return TsallisINFState(jnp.zeros((num_arms,), dtype), jnp.int32(0))


def tsallis_inf_probabilities(state: TsallisINFState, eta_scale: float = 2.0) -> jax.Array:
  """The distribution Tsallis-INF plays in round ``t = rounds + 1``.

  FTRL with the regulariser ``-(4 / eta_t) sum_i sqrt(p_i)`` and ``eta_t = eta_scale / sqrt(t)``
  over the simplex has the solution ``p_i = 4 / (eta_t (L_i - x))^2`` with the normaliser
  ``x < min_i L_i - 2 / eta_t`` chosen so that the ``p_i`` sum to one. ``x`` is found by Newton's
  method started at ``min L - 2 / eta_t``, where the sum is at least one; the sum is convex and
  increasing in ``x``, so the iterates decrease monotonically to the root.
  """
  losses = state.loss_estimates
  eta = eta_scale / jnp.sqrt(state.rounds.astype(losses.dtype) + 1.0)
  gaps = losses - jnp.min(losses)
  total = lambda x: jnp.sum(4.0 / (eta * (gaps - x)) ** 2) - 1.0
  slope = lambda x: jnp.sum(8.0 / (eta ** 2 * (gaps - x) ** 3))
  newton = lambda _, x: x - total(x) / slope(x)
  x = jax.lax.fori_loop(0, _NEWTON_STEPS, newton, -2.0 / eta)
  p = 4.0 / (eta * (gaps - x)) ** 2
  return p / jnp.sum(p)


def tsallis_inf_sample(state: TsallisINFState, key: jax.Array,
                       eta_scale: float = 2.0) -> tuple[jax.Array, jax.Array]:
  """Draws an arm. Returns ``(arm, probabilities)``; pass both to `tsallis_inf_update`."""
  p = tsallis_inf_probabilities(state, eta_scale)
  return jax.random.choice(key, p.shape[0], p=p), p


def tsallis_inf_update(state: TsallisINFState, arm, loss, probabilities) -> TsallisINFState:
  """Adds the importance-weighted estimate ``loss / p_arm`` to the played arm's cumulative loss."""
  estimate = jnp.asarray(loss, state.loss_estimates.dtype) / probabilities[arm]
  return TsallisINFState(state.loss_estimates.at[arm].add(estimate), state.rounds + 1)


def tsallis_inf_play(losses: jax.Array, key: jax.Array,
                     eta_scale: float = 2.0) -> tuple[jax.Array, jax.Array]:
  """Runs Tsallis-INF on a (T, K) table of losses in [0, 1]; round t only reads ``losses[t, arm]``.

  The table is for evaluation (it also gives the best fixed arm in hindsight); an online user
  calls `tsallis_inf_sample` / `tsallis_inf_update` with the cost of the chosen arm only.

  Returns:
    ``(arms, probabilities)``: the (T,) arms played and the (T, K) distributions they came from.
  """
  losses = jnp.asarray(losses)
  if losses.ndim != 2:
    raise ValueError(f"tsallis_inf_play: `losses` must be (rounds, arms), got {losses.shape}")

  def round_(state, inputs):
    row, k = inputs
    arm, p = tsallis_inf_sample(state, k, eta_scale)
    return tsallis_inf_update(state, arm, row[arm], p), (arm, p)

  keys = jax.random.split(key, losses.shape[0])
  state = tsallis_inf_init(losses.shape[1], losses.dtype)
  return jax.lax.scan(round_, state, (losses, keys))[1]


# ----------------------------------------------------------------------------------------------
# SquareCB with Chebyshev-feature regression (contextual bandit over a scalar context).
# ----------------------------------------------------------------------------------------------

class SquareCBState(NamedTuple):
  """Per-arm ridge-regression statistics of the contextual learner.

  Attributes:
    gram: (K, d+1, d+1) ``ridge I + sum phi phi^T`` over the rounds each arm was played.
    moments: (K, d+1) ``sum loss * phi`` over the same rounds.
    rounds: number of rounds played so far.
  """
  gram: jax.Array
  moments: jax.Array
  rounds: jax.Array


def chebyshev_features(context, low: float, high: float, degree: int) -> jax.Array:
  """``(T_0(z), ..., T_degree(z))`` of the context mapped affinely from [low, high] to
  z in [-1, 1] (clipped), by the recurrence ``T_{k+1} = 2 z T_k - T_{k-1}``."""
  z = jnp.clip(2.0 * (jnp.asarray(context) - low) / (high - low) - 1.0, -1.0, 1.0)
  feats = [jnp.ones_like(z), z]
  for _ in range(degree - 1):
    feats.append(2.0 * z * feats[-1] - feats[-2])
  return jnp.stack(feats[:degree + 1], axis=-1)


def square_cb_init(num_arms: int, degree: int, ridge: float = 1.0,
                   dtype=jnp.float32) -> SquareCBState:
  """Initial state: every arm's regression is the ridge prior (predicts zero loss)."""
  if not isinstance(num_arms, int) or num_arms < 1:
    raise ValueError(f"square_cb_init: `num_arms` must be a positive int, got {num_arms!r}")
  if not isinstance(degree, int) or degree < 0:
    raise ValueError(f"square_cb_init: `degree` must be a non-negative int, got {degree!r}")
  if not ridge > 0:
    raise ValueError(f"square_cb_init: `ridge` must be positive, got {ridge}")
  eye = ridge * jnp.eye(degree + 1, dtype=dtype)
  return SquareCBState(jnp.broadcast_to(eye, (num_arms,) + eye.shape),
                       jnp.zeros((num_arms, degree + 1), dtype), jnp.int32(0))


def square_cb_predictions(state: SquareCBState, features: jax.Array) -> jax.Array:
  """(K,) predicted losses: each arm's ridge-regression fit evaluated at ``features``."""
  coef = jnp.linalg.solve(state.gram, state.moments[..., None])[..., 0]
  return coef @ features


def square_cb_probabilities(state: SquareCBState, features: jax.Array,
                            gamma_scale: float = 30.0) -> jax.Array:
  """Inverse-gap weighting of the predicted losses ``y``: with ``b = argmin y`` and
  ``gamma_t = gamma_scale sqrt(K t)`` (t = rounds + 1), ``p_i = 1 / (K + gamma_t (y_i - y_b))`` for
  ``i != b`` and ``p_b`` takes the rest. A larger ``gamma_scale`` explores less; the default suits
  losses whose gaps between good arms are around 0.01 (iteration counts divided by a budget a few
  times the typical count)."""
  y = square_cb_predictions(state, features)
  k = y.shape[0]
  gamma = gamma_scale * jnp.sqrt(k * (state.rounds.astype(y.dtype) + 1.0))
  best = jnp.argmin(y)
  p = 1.0 / (k + gamma * (y - y[best]))
  p = p.at[best].set(0.0)
  return p.at[best].set(1.0 - jnp.sum(p))


def square_cb_sample(state: SquareCBState, features: jax.Array, key: jax.Array,
                     gamma_scale: float = 30.0) -> tuple[jax.Array, jax.Array]:
  """Draws an arm for a context's ``features``. Returns ``(arm, probabilities)``."""
  p = square_cb_probabilities(state, features, gamma_scale)
  return jax.random.choice(key, p.shape[0], p=p), p


def square_cb_update(state: SquareCBState, features: jax.Array, arm, loss) -> SquareCBState:
  """Adds the observation ``(features, loss)`` to the played arm's regression."""
  loss = jnp.asarray(loss, state.moments.dtype)
  return SquareCBState(state.gram.at[arm].add(jnp.outer(features, features)),
                       state.moments.at[arm].add(loss * features), state.rounds + 1)


def square_cb_play(losses: jax.Array, contexts: jax.Array, key: jax.Array, *, low: float,
                   high: float, degree: int = 2, ridge: float = 1.0,
                   gamma_scale: float = 30.0) -> tuple[jax.Array, jax.Array]:
  """Runs the contextual learner on a (T, K) loss table with (T,) scalar contexts in
  [low, high]; round t only reads ``losses[t, arm]``.

  Returns:
    ``(arms, probabilities)`` as `tsallis_inf_play`.
  """
  losses, contexts = jnp.asarray(losses), jnp.asarray(contexts, jnp.asarray(losses).dtype)
  if losses.ndim != 2 or contexts.shape != losses.shape[:1]:
    raise ValueError("square_cb_play: `losses` must be (rounds, arms) and `contexts` (rounds,), "
                     f"got {losses.shape} and {contexts.shape}")
  if not high > low:
    raise ValueError(f"square_cb_play: need `high` > `low`, got low={low}, high={high}")

  def round_(state, inputs):
    row, context, k = inputs
    phi = chebyshev_features(context, low, high, degree)
    arm, p = square_cb_sample(state, phi, k, gamma_scale)
    return square_cb_update(state, phi, arm, row[arm]), (arm, p)

  keys = jax.random.split(key, losses.shape[0])
  state = square_cb_init(losses.shape[1], degree, ridge, losses.dtype)
  return jax.lax.scan(round_, state, (losses, contexts, keys))[1]


def omega_grid(num: int, low: float = 1.0, high: float = 1.95) -> jax.Array:
  """``num`` evenly spaced relaxations in [low, high] (inside (0, 2))."""
  if not isinstance(num, int) or num < 1:
    raise ValueError(f"omega_grid: `num` must be a positive int, got {num!r}")
  if not 0.0 < low <= high < 2.0:
    raise ValueError(f"omega_grid: need 0 < low <= high < 2, got low={low}, high={high}")
  return jnp.linspace(low, high, num)

