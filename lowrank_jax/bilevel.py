"""Bilevel hyperparameter tuning: IFT hypergradients, truncated unrolling, and a tuning loop.

Problem: ``lam* = argmin_lam L_V(w*(lam), lam)`` with ``w*(lam) = argmin_w L_T(w, lam)``.

* `ift_hypergradient` (Lorraine, Vicol & Duvenaud, AISTATS 2020; Blondel et al. 2022): at an
  (approximate) inner solution ``w``,
  ``dL_V/dlam = d_lam L_V - (d_w d_lam L_T)^T H^{-1} d_w L_V`` with ``H = d_w^2 L_T``. The system
  ``H u = d_w L_V`` is solved matrix-free with Hessian-vector products (forward-over-reverse):
  CG by default; ``method="neumann"`` gives Lorraine's truncated Neumann series
  ``H^{-1} ~ alpha sum_j (I - alpha H)^j``. It returns the adjoint ``u`` for warm starts and the
  inner gradient norm, which makes an unconverged inner solve visible (the hypergradient error is
  `O(|grad L_T|)` + O(adjoint residual)).
* `unrolled_hypergradient`: differentiate K inner steps (truncated to the last ``truncate`` steps,
  Shaban et al. 2019) with `jax.checkpoint` per step. The correctness reference for the IFT path
  and the only route to hyperparameters that do not enter ``L_T`` (learning rate, init).
* `tune_hyperparameters`: alternate warm-started inner training (any optax optimizer) and outer
  steps on unconstrained hyperparameters ``phi`` with ``lam = constraint(phi)`` (`positive`,
  `interval`, `real`), so hyperparameters always stay in their valid ranges.

Caveats: the IFT needs ``L_T`` to depend on ``lam`` (an init-only hyperparameter has zero IFT
hypergradient; CorDA's damping acts through the frozen residual ``W - Delta W0``) and ``H``
non-singular on the relevant subspace (LoRA's ``BA = (BQ)(Q^{-1}A)`` gauge gives exact zero
eigenvalues; CG with ``ridge=0`` handles a consistent singular system, a positive ridge biases the
result).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax.tree_utils import tree_norm

from lowrank_jax.implicit import AdjointConfig, custom_root, linear_solve
from lowrank_jax.implicit import relax

PyTree = Any

__all__ = [
    "Constraint",
    "HypergradInfo",
    "TuneResult",
    "constrain",
    "ift_hypergradient",
    "interval",
    "make_argmin",
    "positive",
    "real",
    "tune_hyperparameters",
    "unconstrain",
    "unrolled_hypergradient",
]


# ----------------------------------------------------------------------------------------------
# Hypergradients.
# ----------------------------------------------------------------------------------------------


class HypergradInfo(NamedTuple):
  """Diagnostics of `ift_hypergradient`.

  Attributes:
    u: the adjoint ``H^{-1} d_w L_V`` (pytree like ``w``); pass it back as ``u0`` to warm-start
      the next outer step.
    residual: relative residual of the adjoint solve.
    iterations: adjoint iterations (Hessian-vector products for CG/Neumann).
    converged: whether the adjoint solve met its tolerance.
    inner_grad_norm: ``|d_w L_T(w, lam)|``: how far ``w`` is from a stationary point.
  """
  u: PyTree
  residual: jax.Array
  iterations: jax.Array
  converged: jax.Array
  inner_grad_norm: jax.Array


def ift_hypergradient(inner_loss: Callable, outer_loss: Callable, w: PyTree, lam: PyTree, *,
                      inner_args: Sequence = (), outer_args: Sequence = (),
                      config: AdjointConfig | None = None, u0: PyTree | None = None):
  """Implicit-function-theorem hypergradient of ``L_V(w*(lam), lam)`` at an inner solution ``w``.

  Args:
    inner_loss: ``L_T(w, lam, *inner_args) -> scalar`` (training objective, regularisers
      included).
    outer_loss: ``L_V(w, lam, *outer_args) -> scalar`` (validation objective; may ignore lam).
    w: the inner solution (approximately stationary for ``L_T``).
    lam: hyperparameters (any pytree of floats).
    inner_args: extra (traceable) arguments of ``inner_loss``, e.g. a training batch.
    outer_args: extra arguments of ``outer_loss``.
    config: `AdjointConfig` of the solve ``H u = d_w L_V``: CG unless ``config.method`` says
      otherwise (``H`` is symmetric);
      ``method="neumann", neumann_alpha=a, maxiter=i, tol=0.`` is Lorraine et al.'s i-term
      Neumann approximation (needs ``0 < a < 2 / lambda_max(H)``).
    u0: warm start for the adjoint (e.g. ``info.u`` of the previous outer step).

  Returns:
    ``(hypergrad, HypergradInfo)`` with ``hypergrad`` shaped like ``lam``.

  Example:
    >>> import jax.numpy as jnp
    >>> inner = lambda w, lam: 0.5 * jnp.sum((w - 1.0) ** 2) + 0.5 * lam * jnp.sum(w ** 2)
    >>> outer = lambda w, lam: jnp.sum(w)                     # w* = 1 / (1 + lam)
    >>> lam = 1.0; w = jnp.full(3, 1.0 / (1.0 + lam))
    >>> g, info = ift_hypergradient(inner, outer, w, lam, config=AdjointConfig(tol=1e-6))
    >>> round(float(g), 4)                                     # -3 / (1 + lam)^2
    -0.75
  """
  config = config or AdjointConfig()
  inner_args, outer_args = tuple(inner_args), tuple(outer_args)
  gw_out, glam_out = jax.grad(outer_loss, argnums=(0, 1))(w, lam, *outer_args)
  grad_w = lambda w_, lam_: jax.grad(inner_loss)(w_, lam_, *inner_args)

  # Linearise once: the primal part of the Hessian-vector product (forward pass, and anything
  # that depends only on lam, e.g. a CorDA residual) is computed once, not once per iteration.
  inner_g, hvp = jax.linearize(lambda w_: grad_w(w_, lam), w)
  u, info = linear_solve(hvp, gw_out, x0=u0, config=config, symmetric=True)
  _, vjp_lam = jax.vjp(lambda l: grad_w(w, l), lam)
  (cross,) = vjp_lam(u)
  hyper = jax.tree.map(lambda a, b: a - b, glam_out, cross)
  return hyper, HypergradInfo(u, info.residual, info.iterations, info.converged,
                              tree_norm(inner_g))


def make_argmin(inner_loss: Callable, solver: Callable, config: AdjointConfig | None = None):
  """Wraps an inner solver so that ``w*(lam)`` is differentiable by the IFT (via `custom_root`).

  The optimality condition is ``d_w L_T(w, lam, *args) = 0``; the adjoint operator is the Hessian
  (symmetric), so the adjoint method is CG unless ``config.method`` says otherwise. The forward
  check of `custom_root` applies: ``|d_w L_T(w*)| <= forward_tol (1 + |w*|)`` or the
  non-convergence policy acts.

  Args:
    inner_loss: ``L_T(w, lam, *args)``.
    solver: ``solver(w0, lam, *args) -> w`` (any loop; it runs under `stop_gradient`).
    config: `AdjointConfig` for the backward solve.

  Returns:
    ``argmin(w0, lam, *args, diagnostics=None) -> w*``, differentiable with respect to ``lam``
    and ``args`` in reverse mode.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> inner = lambda w, lam: 0.5 * jnp.sum((w - 1.0) ** 2) + 0.5 * lam * jnp.sum(w ** 2)
    >>> argmin = make_argmin(inner, lambda w0, lam: jnp.ones_like(w0) / (1 + lam),
    ...                      AdjointConfig(tol=1e-6))
    >>> round(float(jax.grad(lambda l: argmin(jnp.zeros(3), l).sum())(1.0)), 4)
    -0.75
  """
  optimality = jax.grad(inner_loss)
  return custom_root(optimality, config=config, symmetric=True)(solver)


def unrolled_hypergradient(inner_step: Callable, outer_loss: Callable, w0: PyTree, lam: PyTree,
                           num_steps: int, *, truncate: int | None = None,
                           inner_args: Sequence = (), outer_args: Sequence = (),
                           checkpoint: bool = True):
  """Hypergradient by differentiating ``num_steps`` inner updates (truncated backprop).

  The first ``num_steps - truncate`` steps run without differentiation (their output is
  `stop_gradient`-ed); the last ``truncate`` steps are differentiated through a `lax.scan`, each
  step wrapped in `jax.checkpoint` (memory `O(|state|)` per step saved, recomputed in the
  backward). Exact for the steps actually run; biased towards short horizons when truncated.

  Args:
    inner_step: ``step(state, lam, *inner_args) -> state`` (e.g. one gradient step; ``state``
      may hold parameters and optimizer state).
    outer_loss: ``L_V(state, lam, *outer_args) -> scalar``.
    w0: initial state.
    lam: hyperparameters.
    num_steps: total inner steps K (static).
    truncate: number of trailing steps to differentiate (default: all).
    inner_args: extra arguments of ``inner_step``.
    outer_args: extra arguments of ``outer_loss``.
    checkpoint: wrap each differentiated step in `jax.checkpoint`.

  Returns:
    ``(outer_value, hypergrad, final_state)``.

  Raises:
    ValueError: for a negative ``num_steps`` or ``truncate`` outside ``[0, num_steps]``.

  Example:
    >>> import jax.numpy as jnp
    >>> step = lambda w, lam: w - 0.5 * ((w - 1.0) + lam * w)
    >>> val, g, w = unrolled_hypergradient(step, lambda w, lam: jnp.sum(w), jnp.zeros(3), 1.0, 60)
    >>> round(float(g), 4)
    -0.75
  """
  if not isinstance(num_steps, int) or num_steps < 0:
    raise ValueError(f"num_steps must be a non-negative int, got {num_steps!r}")
  truncate = num_steps if truncate is None else truncate
  if not isinstance(truncate, int) or not 0 <= truncate <= num_steps:
    raise ValueError(f"truncate must be an int in [0, {num_steps}], got {truncate!r}")
  inner_args, outer_args = tuple(inner_args), tuple(outer_args)

  def run(state, lam_, n, diff):
    step = lambda s, _: (inner_step(s, lam_, *inner_args), None)
    if diff and checkpoint:
      step = jax.checkpoint(step)
    if n == 0:
      return state
    return jax.lax.scan(step, state, None, length=n)[0]

  warm = jax.lax.stop_gradient(run(w0, jax.lax.stop_gradient(lam), num_steps - truncate, False))

  def objective(lam_):
    state = run(warm, lam_, truncate, True)
    return outer_loss(state, lam_, *outer_args), state

  (val, state), g = jax.value_and_grad(objective, has_aux=True)(lam)
  return val, g, state


# ----------------------------------------------------------------------------------------------
# Constraints: hyperparameters live in their valid ranges by construction.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Constraint:
  """A bijection from unconstrained reals to a hyperparameter's valid range (a pytree leaf).

  Attributes:
    name: ``"real"``, ``"positive"`` or ``"interval"``.
    low: lower bound (interval only).
    high: upper bound (interval only).
  """
  name: str
  low: float = 0.0
  high: float = 1.0

  def forward(self, z):
    """Unconstrained -> constrained."""
    if self.name == "real":
      return z
    if self.name == "positive":
      return jnp.exp(z)
    return self.low + (self.high - self.low) * jax.nn.sigmoid(z)

  def inverse(self, x):
    """Constrained -> unconstrained. Raises ValueError for values outside the range."""
    x_np = np.asarray(x)
    if self.name == "real":
      return jnp.asarray(x)
    if self.name == "positive":
      if np.any(x_np <= 0):
        raise ValueError(f"positive() hyperparameter must be > 0, got {x_np}")
      return jnp.log(jnp.asarray(x))
    if np.any(x_np <= self.low) or np.any(x_np >= self.high):
      raise ValueError(f"interval({self.low}, {self.high}) hyperparameter must lie strictly "
                       f"inside, got {x_np}")
    t = (jnp.asarray(x) - self.low) / (self.high - self.low)
    return jnp.log(t) - jnp.log1p(-t)


def real() -> Constraint:
  """No constraint (identity)."""
  return Constraint("real")


def positive() -> Constraint:
  """``lam = exp(phi)``: the outer optimizer works on the log (e.g. log-weight-decay)."""
  return Constraint("positive")


def interval(low: float, high: float) -> Constraint:
  """``lam = low + (high - low) sigmoid(phi)``, e.g. a covariance mix in (0, 1).

  Raises:
    ValueError: if ``low >= high``.
  """
  if not low < high:
    raise ValueError(f"interval needs low < high, got ({low}, {high})")
  return Constraint("interval", float(low), float(high))


def _is_constraint(x):
  return isinstance(x, Constraint)


def _check_constraints(constraints, tree):
  if constraints is None:
    return jax.tree.map(lambda _: real(), tree)
  if isinstance(constraints, Constraint):
    return jax.tree.map(lambda _: constraints, tree)
  cs = jax.tree.structure(constraints, is_leaf=_is_constraint)
  ts = jax.tree.structure(tree)
  if cs != ts:
    raise ValueError(f"constraints structure {cs} does not match hyperparameters {ts}")
  for c in jax.tree.leaves(constraints, is_leaf=_is_constraint):
    if not isinstance(c, Constraint):
      raise TypeError(f"constraint leaves must be Constraint, got {type(c).__name__}")
  return constraints


def constrain(constraints, phi):
  """Maps unconstrained ``phi`` to hyperparameters (a single `Constraint` applies to all)."""
  constraints = _check_constraints(constraints, phi)
  return jax.tree.map(lambda c, z: c.forward(z), constraints, phi, is_leaf=_is_constraint)


def unconstrain(constraints, lam):
  """Inverse of `constrain`; raises ValueError for out-of-range values."""
  constraints = _check_constraints(constraints, lam)
  return jax.tree.map(lambda c, x: c.inverse(x), constraints, lam, is_leaf=_is_constraint)


# ----------------------------------------------------------------------------------------------
# The tuning loop.
# ----------------------------------------------------------------------------------------------


_CONTEXT_DEGREE = 2   # Chebyshev degree of the contextual learner's per-arm regressions
_tsallis_sample = jax.jit(relax.tsallis_inf_sample)
_tsallis_update = jax.jit(relax.tsallis_inf_update)
_square_cb_sample = jax.jit(relax.square_cb_sample)
_square_cb_update = jax.jit(relax.square_cb_update)


def _log_hyperparams(lam: PyTree) -> jax.Array:
  """Mean of ``log |x|`` over every entry of the hyperparameter pytree (the
  ``"log_hyperparams"`` context; zeros count as the smallest positive float)."""
  flat = jnp.concatenate([jnp.ravel(jnp.asarray(x, float)) for x in jax.tree.leaves(lam)])
  return jnp.mean(jnp.log(jnp.maximum(jnp.abs(flat), jnp.finfo(flat.dtype).tiny)))


def _context_value(config: AdjointConfig, lam: PyTree) -> float:
  """The scalar context of the current outer step (see ``AdjointConfig.neumann_alpha_context``)."""
  fn = config.neumann_alpha_context
  value = _log_hyperparams(lam) if fn == "log_hyperparams" else jnp.asarray(fn(lam))
  if value.shape not in ((), (1,)):
    raise ValueError(f"AdjointConfig.neumann_alpha_context must return a scalar, got shape "
                     f"{value.shape}")
  value = float(value.reshape(()))
  if not np.isfinite(value):
    raise ValueError(f"AdjointConfig.neumann_alpha_context returned {value} at lam={lam!r}")
  return value


class _NeumannStepLearner:
  """Learns the Neumann step size of a sequence of adjoint solves online (`AdjointConfig`'s
  ``neumann_alpha_grid``), cost = iterations / maxiter: Tsallis-INF over the grid, or with
  ``neumann_alpha_context`` SquareCB on Chebyshev features of a scalar context of ``lam``.

  A step size that misses the tolerance (it diverges, or converges too slowly) costs 1, and the
  system is solved again by CG from the same warm start, so every outer step gets a hypergradient
  of the configured accuracy; the reported iteration count includes both solves.
  """

  def __init__(self, config: AdjointConfig):
    self.config, self.grid = config, config.neumann_alpha_grid
    self.contextual = config.neumann_alpha_context is not None
    # Float64 when enabled: Tsallis-INF's importance-weighted sums grow like rounds / p_min.
    self.dtype = jnp.result_type(float)
    if self.contextual:
      self.state = relax.square_cb_init(len(self.grid), _CONTEXT_DEGREE, dtype=self.dtype)
    else:
      self.state = relax.tsallis_inf_init(len(self.grid), self.dtype)
    self.key = jax.random.key(config.learner_seed)

  def solve(self, ift_step: Callable[[AdjointConfig], tuple],
            lam: PyTree) -> tuple[tuple, int, float, float | None]:
    """Plays one step size: ``(ift_step's output, total iterations, the step size played,
    the context or None)``."""
    self.key, key = jax.random.split(self.key)
    context = features = None
    if self.contextual:
      context = _context_value(self.config, lam)
      low, high = self.config.neumann_alpha_context_range
      features = relax.chebyshev_features(jnp.asarray(context, self.dtype), float(low),
                                          float(high), _CONTEXT_DEGREE).astype(self.dtype)
      arm, probabilities = _square_cb_sample(self.state, features, key)
    else:
      arm, probabilities = _tsallis_sample(self.state, key)
    alpha = float(self.grid[int(arm)])
    played = self.config.replace(neumann_alpha=alpha, neumann_alpha_grid=None,
                                 neumann_alpha_context=None, neumann_alpha_context_range=None)
    out = ift_step(played)
    iterations = int(out[1].iterations)
    cost = min(iterations / self.config.maxiter, 1.0) if bool(out[1].converged) else 1.0
    if self.contextual:
      self.state = _square_cb_update(self.state, features, arm, cost)
    else:
      self.state = _tsallis_update(self.state, arm, cost, probabilities)
    if not bool(out[1].converged):
      out = ift_step(played.replace(method="cg"))
      iterations += int(out[1].iterations)
    return out, iterations, alpha, context


class TuneResult(NamedTuple):
  """Output of `tune_hyperparameters`.

  Attributes:
    hyperparams: final hyperparameters (constrained).
    params: inner parameters after the last inner phase (trained at the final hyperparameters
      when ``final_inner_steps > 0``).
    history: dict of per-outer-step lists: ``outer_loss`` (at the inner solution before the
      step), ``hypergrad_norm`` (w.r.t. phi), ``adjoint_residual``, ``adjoint_iterations``,
      ``inner_grad_norm``, ``hyperparams``; with ``config.neumann_alpha_grid``, also
      ``adjoint_alpha`` (the step size played), and with ``config.neumann_alpha_context`` also
      ``adjoint_context`` (the context it was played for).
    final_outer_loss: ``L_V`` at the returned params and hyperparameters.
  """
  hyperparams: PyTree
  params: PyTree
  history: dict
  final_outer_loss: float


def tune_hyperparameters(inner_loss: Callable, outer_loss: Callable, params: PyTree,
                         hyperparams: PyTree, *, outer_optimizer: optax.GradientTransformation,
                         outer_steps: int,
                         inner_optimizer: optax.GradientTransformation | None = None,
                         inner_steps: int = 0, inner_solver: Callable | None = None,
                         constraints=None, inner_args: Sequence = (),
                         outer_args: Sequence = (), hypergradient: str = "ift",
                         config: AdjointConfig | None = None, warm_start: bool = True,
                         reset_inner_optimizer: bool = False, final_inner_steps: int = 0,
                         callback: Callable | None = None) -> TuneResult:
  """Alternates inner training and hypergradient steps on continuous hyperparameters.

  Each outer step: (1) run ``inner_steps`` of ``inner_optimizer`` on ``L_T(., lam)`` starting
  from the previous parameters (warm start), or call ``inner_solver(params, lam, *inner_args)``;
  (2) compute the hypergradient at the result, either
  by the IFT (`ift_hypergradient`, adjoint warm-started from the previous step) or by
  differentiating the ``inner_steps`` just run (``hypergradient="unrolled"``, truncated to this
  phase); (3) chain it through ``lam = constraint(phi)`` and apply ``outer_optimizer`` to
  ``phi``. Hyperparameters therefore stay in their ranges.

  Args:
    inner_loss: ``L_T(params, lam, *inner_args)``.
    outer_loss: ``L_V(params, lam, *outer_args)``.
    params: initial inner parameters.
    hyperparams: initial hyperparameters (inside their ranges).
    outer_optimizer: optax transformation over ``phi`` (e.g. ``optax.adam(0.05)``).
    outer_steps: number of outer steps.
    inner_optimizer: optax transformation (plain or with extra args such as `optax.lbfgs`; it
      receives ``value``, ``grad`` and ``value_fn``).
    inner_steps: inner steps per outer step (static).
    inner_solver: alternative to ``inner_optimizer``: ``inner_solver(params, lam, *inner_args)
      -> params`` (called as is: jit it yourself; one compiled solver can then serve a grid
      search, the tuning and the final re-solve). IFT hypergradients only.
    constraints: a `Constraint` or a pytree of them matching ``hyperparams``; default `real`.
    inner_args: extra arguments of ``inner_loss`` (e.g. the training set).
    outer_args: extra arguments of ``outer_loss`` (e.g. the validation set).
    hypergradient: ``"ift"`` or ``"unrolled"``.
    config: `AdjointConfig` for the IFT solve (default CG, tol 1e-6 relative).
    warm_start: reuse the previous adjoint as the initial guess.
    reset_inner_optimizer: re-initialise the inner optimizer state every outer step (useful for
      L-BFGS, whose memory goes stale when ``lam`` changes).
    final_inner_steps: extra inner steps at the final hyperparameters before returning (with
      ``inner_solver``: any positive value calls it once more).
    callback: ``callback(step, lam, info_dict)`` called on the host after each outer step.

  Returns:
    A `TuneResult`.

  Raises:
    ValueError: for an unknown ``hypergradient`` or bad step counts.
  """
  if hypergradient not in ("ift", "unrolled"):
    raise ValueError(f"hypergradient={hypergradient!r}; valid: 'ift', 'unrolled'")
  if (inner_optimizer is None) == (inner_solver is None):
    raise ValueError("give exactly one of inner_optimizer and inner_solver")
  if inner_solver is not None and hypergradient != "ift":
    raise ValueError("inner_solver is a black box: use hypergradient='ift'")
  for name, v in (("inner_steps", inner_steps), ("outer_steps", outer_steps),
                  ("final_inner_steps", final_inner_steps)):
    if not isinstance(v, int) or v < 0:
      raise ValueError(f"{name} must be a non-negative int, got {v!r}")
  config = config or AdjointConfig(method="cg", tol=1e-6, maxiter=500,
                                   on_nonconvergence="ignore")
  inner_args, outer_args = tuple(inner_args), tuple(outer_args)
  constraints = _check_constraints(constraints, hyperparams)
  phi = unconstrain(constraints, hyperparams)
  tx = optax.with_extra_args_support(inner_optimizer or optax.identity())

  def inner_step(state, lam, *args):
    p, s = state
    value_fn = lambda q: inner_loss(q, lam, *args)
    v, g = jax.value_and_grad(value_fn)(p)
    upd, s = tx.update(g, s, p, value=v, grad=g, value_fn=value_fn)
    return optax.apply_updates(p, upd), s

  def run_inner(state, lam, args, n):
    if n == 0:
      return state
    return jax.lax.scan(lambda st, _: (inner_step(st, lam, *args), None), state, None,
                        length=n)[0]

  @jax.jit
  def train(state, phi_, args):
    return run_inner(state, constrain(constraints, phi_), args, inner_steps)

  @jax.jit
  def final_train(state, phi_, args):
    return run_inner(state, constrain(constraints, phi_), args, final_inner_steps)

  @functools.partial(jax.jit, static_argnames="cfg")
  def ift_step(p, phi_, u0, iargs, oargs, cfg):
    lam, vjp_c = jax.vjp(lambda z: constrain(constraints, z), phi_)
    g_lam, info = ift_hypergradient(inner_loss, outer_loss, p, lam, inner_args=iargs,
                                    outer_args=oargs, config=cfg, u0=u0)
    (g_phi,) = vjp_c(g_lam)
    return g_phi, info, outer_loss(p, lam, *oargs)

  @jax.jit
  def unrolled_step(state, phi_, iargs, oargs):
    def step(st, z, *a):
      return inner_step(st, constrain(constraints, z), *a)

    def outer(st, z, *a):
      return outer_loss(st[0], constrain(constraints, z), *a)

    val, g_phi, new_state = unrolled_hypergradient(step, outer, state, phi_, inner_steps,
                                                   inner_args=iargs, outer_args=oargs)
    return g_phi, new_state, val

  @jax.jit
  def outer_update(phi_, ostate, g_phi):
    upd, ostate = outer_optimizer.update(g_phi, ostate, phi_)
    return optax.apply_updates(phi_, upd), ostate

  state = (params, tx.init(params))
  ostate = outer_optimizer.init(phi)
  u = None
  history = {k: [] for k in ("outer_loss", "hypergrad_norm", "adjoint_residual",
                             "adjoint_iterations", "inner_grad_norm", "hyperparams")}
  step_size_learner = (_NeumannStepLearner(config) if config.neumann_alpha_grid is not None
                       else None)
  if step_size_learner is not None and step_size_learner.contextual:
    _context_value(config, hyperparams)     # a bad context function fails before any work
  if step_size_learner is not None:
    history["adjoint_alpha"] = []
    if step_size_learner.contextual:
      history["adjoint_context"] = []
  for t in range(outer_steps):
    if reset_inner_optimizer:
      state = (state[0], tx.init(state[0]))
    if inner_solver is not None:
      state = (inner_solver(state[0], constrain(constraints, phi), *inner_args), state[1])
    elif hypergradient == "ift":
      state = train(state, phi, inner_args)
    if hypergradient == "ift":
      u0 = u if warm_start else None
      if u0 is None:
        u0 = jax.tree.map(jnp.zeros_like, state[0])
      if step_size_learner is None:
        g_phi, info, val = ift_step(state[0], phi, u0, inner_args, outer_args, cfg=config)
        iterations = int(info.iterations)
      else:
        (g_phi, info, val), iterations, alpha, context = step_size_learner.solve(
            lambda cfg: ift_step(state[0], phi, u0, inner_args, outer_args, cfg=cfg),
            constrain(constraints, phi))
        history["adjoint_alpha"].append(alpha)
        if context is not None:
          history["adjoint_context"].append(context)
      u = info.u
      history["adjoint_residual"].append(float(info.residual))
      history["adjoint_iterations"].append(iterations)
      history["inner_grad_norm"].append(float(info.inner_grad_norm))
    else:
      g_phi, state, val = unrolled_step(state, phi, inner_args, outer_args)
    history["outer_loss"].append(float(val))
    history["hypergrad_norm"].append(float(tree_norm(g_phi)))
    phi, ostate = outer_update(phi, ostate, g_phi)
    lam_now = constrain(constraints, phi)
    history["hyperparams"].append(jax.tree.map(np.asarray, lam_now))
    if callback is not None:
      callback(t, lam_now, {k: v[-1] for k, v in history.items() if v})
  if final_inner_steps and inner_solver is not None:
    state = (inner_solver(state[0], constrain(constraints, phi), *inner_args), state[1])
  elif final_inner_steps:
    if reset_inner_optimizer:
      state = (state[0], tx.init(state[0]))
    state = final_train(state, phi, inner_args)
  lam = constrain(constraints, phi)
  final = float(outer_loss(state[0], lam, *outer_args))
  return TuneResult(lam, state[0], history, final)
