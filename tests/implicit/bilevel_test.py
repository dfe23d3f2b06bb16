"""lowrank_jax.bilevel: unrolled reference, constraints, tuning loop, and the digits experiment."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowrank_jax import bilevel
from tests.implicit.ridge import ridge_data
from lowrank_jax.implicit import AdjointConfig


def inner_loss(w, lam, x, y):
  lam = jnp.broadcast_to(lam, w.shape)
  return 0.5 * jnp.mean((x @ w - y) ** 2) + 0.5 * jnp.sum(lam * w ** 2)


def outer_loss(w, lam, xv, yv):
  del lam
  return 0.5 * jnp.mean((xv @ w - yv) ** 2)


def _exact(lam, x, y):
  n = x.shape[0]
  lam = jnp.broadcast_to(lam, (x.shape[1],))
  return jnp.linalg.solve(x.T @ x / n + jnp.diag(lam), x.T @ y / n)


def test_unrolled_reference_matches_ift_and_truncation_is_biased():
  x, y, xv, yv = ridge_data()
  lam = jnp.full((6,), 0.3)
  lmax = float(np.linalg.eigvalsh(np.asarray(x.T @ x / 40)).max()) + 0.3
  step = lambda w, l, a, b: w - jax.grad(inner_loss)(w, l, a, b) / lmax
  g_ift, info = bilevel.ift_hypergradient(inner_loss, outer_loss, _exact(lam, x, y), lam,
                                          inner_args=(x, y), outer_args=(xv, yv),
                                          config=AdjointConfig(tol=1e-14))
  _, g_unr, w_k = bilevel.unrolled_hypergradient(step, outer_loss, jnp.zeros(6), lam, 2000,
                                                 inner_args=(x, y), outer_args=(xv, yv))
  np.testing.assert_allclose(g_unr, g_ift, rtol=1e-8, atol=1e-12)
  _, g_nock, _ = bilevel.unrolled_hypergradient(step, outer_loss, jnp.zeros(6), lam, 2000,
                                                inner_args=(x, y), outer_args=(xv, yv),
                                                checkpoint=False)
  np.testing.assert_allclose(g_nock, g_unr, rtol=1e-12)
  errs = []
  for t in (2, 20, 500):
    _, g_t, _ = bilevel.unrolled_hypergradient(step, outer_loss, jnp.zeros(6), lam, 2000,
                                               truncate=t, inner_args=(x, y),
                                               outer_args=(xv, yv))
    errs.append(float(jnp.max(jnp.abs(g_t - g_ift))))
  assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-8, errs
  with pytest.raises(ValueError, match="truncate"):
    bilevel.unrolled_hypergradient(step, outer_loss, jnp.zeros(6), lam, 5, truncate=6,
                                   inner_args=(x, y), outer_args=(xv, yv))


def test_constraints_roundtrip_and_ranges():
  lam = {"wd": jnp.array([1e-3, 2.0]), "mix": jnp.asarray(0.25), "s": jnp.asarray(-1.0)}
  cons = {"wd": bilevel.positive(), "mix": bilevel.interval(0.0, 1.0), "s": bilevel.real()}
  phi = bilevel.unconstrain(cons, lam)
  back = bilevel.constrain(cons, phi)
  for k in lam:
    np.testing.assert_allclose(back[k], lam[k], rtol=1e-12)
  big = jax.tree.map(lambda z: z + 30.0 * jnp.sign(z + 0.5), phi)
  out = bilevel.constrain(cons, big)
  assert bool(jnp.all(out["wd"] > 0)) and 0.0 <= float(out["mix"]) <= 1.0
  with pytest.raises(ValueError, match="> 0"):
    bilevel.unconstrain(bilevel.positive(), jnp.array([0.0]))
  with pytest.raises(ValueError, match="inside"):
    bilevel.unconstrain(bilevel.interval(0, 1), jnp.asarray(1.5))
  with pytest.raises(ValueError, match="low < high"):
    bilevel.interval(1.0, 1.0)
  with pytest.raises(ValueError, match="structure"):
    bilevel.constrain({"wd": bilevel.positive()}, {"a": jnp.ones(1)})


@pytest.mark.parametrize("mode", ["ift", "unrolled"])
def test_tuning_loop_lowers_validation_loss_and_respects_ranges(mode):
  x, y, xv, yv = ridge_data(seed=1, n=20, d=10)
  lam0 = jnp.full((10,), 0.5)
  w0 = jnp.zeros(10)
  start = float(outer_loss(_exact(lam0, x, y), lam0, xv, yv))
  seen = []
  res = bilevel.tune_hyperparameters(
      inner_loss, outer_loss, w0, lam0, inner_optimizer=optax.sgd(0.3),
      outer_optimizer=optax.adam(0.1), inner_steps=30, outer_steps=25,
      constraints=bilevel.interval(1e-4, 2.0), inner_args=(x, y), outer_args=(xv, yv),
      hypergradient=mode, final_inner_steps=300,
      callback=lambda t, lam, info: seen.append(float(jnp.min(lam))))
  lam = res.hyperparams
  assert bool(jnp.all((lam > 1e-4) & (lam < 2.0)))
  assert len(seen) == 25 and min(seen) > 1e-4
  end = float(outer_loss(_exact(lam, x, y), lam, xv, yv))
  assert end < start - 1e-3, (start, end)
  assert np.all(np.isfinite(res.history["hypergrad_norm"]))
  with pytest.raises(ValueError, match="hypergradient"):
    bilevel.tune_hyperparameters(inner_loss, outer_loss, w0, lam0,
                                 inner_optimizer=optax.sgd(0.1), outer_optimizer=optax.sgd(0.1),
                                 inner_steps=1, outer_steps=1, hypergradient="stn")


def test_digits_per_feature_weight_decay_beats_grid_best():
  from experiments import bilevel_digits
  out = bilevel_digits.run(outer_steps=12, grid=np.logspace(-5, -1, 9), verbose=False)
  assert out["tuned_val_loss"] < out["grid_best_val_loss"] - 0.01, out
  assert out["max_final_inner_grad_norm"] < 1e-3
  assert np.all(out["tuned_lam"] > 0)


def test_corda_damping_and_mix_hypergradient_through_the_frozen_residual():
  """IFT chained with the projector's implicit VJP: theta = (damping, mix) acts via W - Delta W0."""
  from lowrank_jax.implicit import corda_delta
  rng = np.random.default_rng(0)
  d_in, d_out, n = 8, 5, 60
  w = jnp.asarray(rng.normal(size=(d_in, d_out)))
  c1 = jnp.asarray(np.cov(rng.normal(size=(100, d_in)) * np.linspace(0.5, 2, d_in), rowvar=False))
  c2 = jnp.asarray(np.cov(rng.normal(size=(100, d_in)), rowvar=False))
  x, xv = (jnp.asarray(rng.normal(size=(m, d_in))) for m in (n, n))
  w_true = jnp.asarray(rng.normal(size=(d_in, d_out)))
  y, yv = x @ w_true, xv @ w_true + 0.1 * jnp.asarray(rng.normal(size=(n, d_out)))
  cfg = AdjointConfig(tol=1e-13, on_nonconvergence="raise")
  mu = 0.3

  def w_res(theta):
    c = (1 - theta["mix"]) * c1 + theta["mix"] * c2
    return w - corda_delta(w, c, 2, "ipa", theta["damping"], cfg)

  def inner(dw, theta, a, b):   # a full-matrix adapter on the CorDA residual: convex in dw
    return 0.5 * jnp.mean(jnp.sum((a @ (w_res(theta) + dw) - b) ** 2, -1)) + 0.5 * mu * jnp.sum(
        dw ** 2)

  def outer(dw, theta, a, b):
    return 0.5 * jnp.mean(jnp.sum((a @ (w_res(theta) + dw) - b) ** 2, -1))

  def solve(theta):
    a = x.T @ x / n + mu * jnp.eye(d_in)
    return jnp.linalg.solve(a, x.T @ (y - x @ w_res(theta)) / n)

  theta = {"damping": jnp.asarray(0.05), "mix": jnp.asarray(0.3)}
  g, info = bilevel.ift_hypergradient(inner, outer, solve(theta), theta, inner_args=(x, y),
                                      outer_args=(xv, yv), config=cfg)
  assert bool(info.converged)
  for k in theta:
    eps = 1e-6
    tp = {**theta, k: theta[k] + eps}
    tm = {**theta, k: theta[k] - eps}
    fd = (outer(solve(tp), tp, xv, yv) - outer(solve(tm), tm, xv, yv)) / (2 * eps)
    assert abs(float(g[k]) - float(fd)) <= 1e-6 * max(1.0, abs(float(fd))), (k, g[k], fd)
  # A few outer steps keep damping > 0 and mix in (0, 1) and lower the validation loss.
  res = bilevel.tune_hyperparameters(
      inner, outer, solve(theta), theta, inner_solver=jax.jit(lambda dw, th, a, b: solve(th)),
      outer_optimizer=optax.adam(0.2), outer_steps=4,
      constraints={"damping": bilevel.positive(), "mix": bilevel.interval(0.0, 1.0)},
      inner_args=(x, y), outer_args=(xv, yv), config=cfg)
  lam = res.hyperparams
  assert float(lam["damping"]) > 0 and 0 < float(lam["mix"]) < 1
  assert res.history["outer_loss"][-1] < res.history["outer_loss"][0]


def test_learned_neumann_step_size_keeps_the_hypergradient_accuracy():
  x, y, xv, yv = ridge_data(seed=2, n=40, d=12)
  lam0 = jnp.full((12,), 0.3)
  lmax = float(np.linalg.eigvalsh(np.asarray(x.T @ x / 40) + 0.3 * np.eye(12)).max())
  grid = tuple(c / lmax for c in (0.5, 1.0, 2.5))   # 2.5 / lambda_max diverges
  solver = jax.jit(lambda w, lam, x_, y_: _exact(lam, x_, y_))
  tol = 1e-8

  def tune(config):
    return bilevel.tune_hyperparameters(
        inner_loss, outer_loss, jnp.zeros(12), lam0, outer_optimizer=optax.adam(0.05),
        outer_steps=30, inner_solver=solver, constraints=bilevel.interval(0.05, 2.0),
        inner_args=(x, y), outer_args=(xv, yv), config=config)

  cg = tune(AdjointConfig(method="cg", tol=tol, maxiter=3000, on_nonconvergence="ignore"))
  learned = tune(AdjointConfig(method="neumann", tol=tol, maxiter=3000, neumann_alpha_grid=grid,
                               on_nonconvergence="ignore"))
  played = learned.history["adjoint_alpha"]
  assert len(played) == 30 and set(played) <= set(grid) and len(set(played)) > 1
  # Every outer step meets the tolerance (a diverging step size is re-solved by CG), so the
  # hyperparameter trajectory is CG's.
  assert max(learned.history["adjoint_residual"]) <= tol
  np.testing.assert_allclose(learned.hyperparams, cg.hyperparams, atol=1e-6)
  # A diverging step size runs until its residual overflows, then CG solves: its steps cost more
  # than any converging one, and they count in the reported iterations.
  counts = learned.history["adjoint_iterations"]
  diverged = [n for a, n in zip(played, counts) if a == grid[2]]
  converged = [n for a, n in zip(played, counts) if a != grid[2]]
  assert diverged and min(diverged) > max(converged), counts


def test_neumann_step_size_grid_is_checked():
  with pytest.raises(ValueError, match="neumann_alpha_grid is learned for method='neumann'"):
    AdjointConfig(method="cg", neumann_alpha_grid=(0.1, 0.2))
  with pytest.raises(ValueError, match="at least two positive step sizes"):
    AdjointConfig(method="neumann", neumann_alpha_grid=(0.1, -0.2))
  with pytest.raises(ValueError, match="at least two positive step sizes"):
    AdjointConfig(method="neumann", neumann_alpha_grid=[0.1, 0.2])
  cfg = AdjointConfig(method="neumann", neumann_alpha_grid=(0.1, 0.2))
  with pytest.raises(ValueError, match="learned across a sequence of solves"):
    bilevel.ift_hypergradient(inner_loss, outer_loss, jnp.zeros(3), 0.1,
                              inner_args=(jnp.ones((4, 3)), jnp.ones(4)),
                              outer_args=(jnp.ones((4, 3)), jnp.ones(4)), config=cfg)


def _richardson_counts(h, g, u0, alphas, tol, maxiter):
  """Float64 numpy re-derivation of the Neumann (Richardson) sweep counts ``u <- u + a (g - H u)``
  from ``u0`` for every step size at once: the first k with ``|g - H u_k| <= tol |g|``, or
  ``maxiter`` when that never happens (divergence included)."""
  alphas = np.asarray(alphas)[:, None]
  u = np.tile(u0, (len(alphas), 1))
  counts = np.full(len(alphas), maxiter)
  done = np.zeros(len(alphas), bool)
  thresh = tol * np.linalg.norm(g)
  with np.errstate(over="ignore", invalid="ignore"):
    for k in range(maxiter + 1):
      r = g[None] - u @ h.T
      hit = ~done & (np.linalg.norm(r, axis=1) <= thresh)
      counts[hit], done = k, done | hit
      if done.all():
        break
      u = u + alphas * r
  return counts


def test_contextual_neumann_step_learner_beats_the_best_fixed_step_on_a_drifting_sequence():
  # The outer loss pulls log(lam) up at a steady pace (Adam on -log lam dominates), so the
  # adjoint systems (X^T X / n + lam I) u = g drift from lam = 0.01 to about 10 and the best
  # Neumann step ~ 2 / (lambda_min + lambda_max) falls tenfold: no single step size is good
  # throughout, and the largest ones diverge late in the sequence.
  x, y, xv, yv = ridge_data(seed=2, n=40, d=12)
  steps, lam0, lam1, tol, maxiter = 120, 1e-2, 1e1, 1e-8, 1000
  grid = tuple(float(a) for a in np.geomspace(0.06, 0.9, 6))
  scalar_inner = lambda w, lam, x_, y_: (0.5 * jnp.mean((x_ @ w - y_) ** 2)
                                         + 0.5 * lam * jnp.sum(w ** 2))
  drifting_outer = lambda w, lam, xv_, yv_: 0.5 * jnp.mean((xv_ @ w - yv_) ** 2) - jnp.log(lam)
  solver = jax.jit(lambda w, lam, x_, y_: _exact(lam, x_, y_))
  config = AdjointConfig(method="neumann", tol=tol, maxiter=maxiter, on_nonconvergence="ignore",
                         neumann_alpha_grid=grid, neumann_alpha_context="log_hyperparams",
                         neumann_alpha_context_range=(float(np.log(lam0)), float(np.log(lam1))))
  res = bilevel.tune_hyperparameters(
      scalar_inner, drifting_outer, jnp.zeros(12), jnp.asarray(lam0),
      outer_optimizer=optax.adam(np.log(lam1 / lam0) / steps), outer_steps=steps,
      inner_solver=solver, constraints=bilevel.positive(), inner_args=(x, y),
      outer_args=(xv, yv), config=config)
  hist = res.history
  lams = np.array([lam0] + [float(h) for h in hist["hyperparams"][:-1]])
  assert lams[-1] > 300 * lams[0]                                # the sequence did drift
  np.testing.assert_allclose(hist["adjoint_context"], np.log(lams), rtol=1e-12)
  assert max(hist["adjoint_residual"]) <= tol                  # same accuracy as CG

  # Brute force: every step size on every system of the sequence, from the previous exact adjoint.
  xn, yn, xvn, yvn = (np.asarray(a) for a in (x, y, xv, yv))
  table, u_prev = [], np.zeros(12)
  for lam in lams:
    h = xn.T @ xn / 40 + lam * np.eye(12)
    w = np.linalg.solve(h, xn.T @ yn / 40)
    g = xvn.T @ (xvn @ w - yvn) / len(yvn)
    table.append(_richardson_counts(h, g, u_prev, grid, tol, maxiter))
    u_prev = np.linalg.solve(h, g)
  table = np.array(table)
  arms = np.array([grid.index(a) for a in hist["adjoint_alpha"]])
  paid = table[np.arange(steps), arms]
  # The library's iteration counts agree with the re-derivation where the played step converged.
  ok = paid < maxiter
  np.testing.assert_allclose(np.array(hist["adjoint_iterations"])[ok], paid[ok], atol=2)
  best_fixed, instance = table.sum(0).min(), table.min(1).sum()
  assert paid.sum() < 0.85 * best_fixed, (paid.sum(), table.sum(0), instance)
  # It follows the context: smaller steps once lam is large.
  alphas = np.array(hist["adjoint_alpha"])
  early, late = alphas[:steps // 3].mean(), alphas[-steps // 3:].mean()
  assert late < 0.75 * early, (early, late)


def test_contextual_neumann_step_learner_fields_are_checked():
  grid = (0.1, 0.2)
  neumann = lambda **kw: AdjointConfig(method="neumann", **kw)
  with pytest.raises(ValueError, match="neumann_alpha_context='log_lam'; valid: None"):
    neumann(neumann_alpha_grid=grid, neumann_alpha_context="log_lam",
            neumann_alpha_context_range=(0.0, 1.0))
  with pytest.raises(ValueError, match="set neumann_alpha_grid too"):
    neumann(neumann_alpha_context="log_hyperparams", neumann_alpha_context_range=(0.0, 1.0))
  with pytest.raises(ValueError, match=r"needs neumann_alpha_context_range=\(low, high\)"):
    neumann(neumann_alpha_grid=grid, neumann_alpha_context="log_hyperparams")
  with pytest.raises(ValueError, match="only used with neumann_alpha_context"):
    neumann(neumann_alpha_grid=grid, neumann_alpha_context_range=(0.0, 1.0))
  for bad in ((1.0, 0.0), (0.0, float("inf")), [0.0, 1.0], (0.0,)):
    with pytest.raises(ValueError, match="finite numbers with low < high"):
      neumann(neumann_alpha_grid=grid, neumann_alpha_context="log_hyperparams",
              neumann_alpha_context_range=bad)
  # A callable context must return a scalar; the error names the field before any solve.
  x, y, xv, yv = ridge_data(seed=2, n=40, d=12)
  cfg = neumann(neumann_alpha_grid=grid, neumann_alpha_context=lambda lam: lam,
                neumann_alpha_context_range=(0.0, 1.0), on_nonconvergence="ignore")
  with pytest.raises(ValueError, match="neumann_alpha_context must return a scalar"):
    bilevel.tune_hyperparameters(
        inner_loss, outer_loss, jnp.zeros(12), jnp.full((12,), 0.3),
        outer_optimizer=optax.adam(0.1), outer_steps=1,
        inner_solver=jax.jit(lambda w, lam, x_, y_: _exact(lam, x_, y_)),
        inner_args=(x, y), outer_args=(xv, yv), config=cfg)
  with pytest.raises(ValueError, match="learned across a sequence of solves"):
    bilevel.ift_hypergradient(inner_loss, outer_loss, jnp.zeros(3), 0.1,
                              inner_args=(jnp.ones((4, 3)), jnp.ones(4)),
                              outer_args=(jnp.ones((4, 3)), jnp.ones(4)),
                              config=cfg.replace(neumann_alpha_context="log_hyperparams"))
