"""custom_root / custom_fixed_point / linear_solve on ridge regression and a tanh fixed point."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax import bilevel
from tests.implicit.ridge import ridge_data
from lowrank_jax.implicit import (AdjointConfig, AdjointDiagnostics, custom_fixed_point,
                                  custom_root, fixed_point_iteration, linear_solve)
from lowrank_jax.implicit.testing import check_implicit_grad

TIGHT = AdjointConfig(tol=1e-14, maxiter=2000, on_nonconvergence="raise")


def inner_loss(w, lam, x, y):
  return 0.5 * jnp.sum((x @ w - y) ** 2) + 0.5 * lam * jnp.sum(w ** 2)


def outer_loss(w, lam, xv, yv):
  del lam
  return 0.5 * jnp.sum((xv @ w - yv) ** 2)


def ridge_grad(w, lam, x, y):
  return x.T @ (x @ w - y) + lam * w


def exact_ridge(lam, x, y):
  return jnp.linalg.solve(x.T @ x + lam * jnp.eye(x.shape[1]), x.T @ y)


def closed_form_hypergrad(lam, x, y, xv, yv):
  w = exact_ridge(lam, x, y)
  dw = -jnp.linalg.solve(x.T @ x + lam * jnp.eye(x.shape[1]), w)
  return jnp.dot(xv.T @ (xv @ w - yv), dw)


def cg_inner_solver(w0, lam, x, y):
  """An iterative forward solver (a while loop: not differentiable without custom_root)."""
  w, _ = linear_solve(lambda v: x.T @ (x @ v) + lam * v, x.T @ y, x0=w0,
                      config=AdjointConfig(tol=1e-15, maxiter=500), symmetric=True)
  return w


@pytest.mark.parametrize("method", ["cg", "gmres", "normal_cg", "neumann", "dense"])
def test_ridge_hypergradient_matches_closed_form(method):
  x, y, xv, yv = ridge_data()
  cfg = TIGHT.replace(method=method)
  if method == "neumann":  # Richardson step 1/L (L = largest Hessian eigenvalue + lam)
    lmax = float(np.linalg.eigvalsh(np.asarray(x.T @ x)).max()) + 2.0
    cfg = cfg.replace(neumann_alpha=1.0 / lmax, maxiter=20000, tol=1e-13)
  solver = custom_root(ridge_grad, config=cfg)(cg_inner_solver)
  lam = 2.0
  g = jax.grad(lambda l: outer_loss(solver(jnp.zeros(6), l, x, y), l, xv, yv))(lam)
  expected = closed_form_hypergrad(lam, x, y, xv, yv)
  assert abs(float(g) - float(expected)) <= 1e-8 * max(1.0, abs(float(expected)))


def test_ift_hypergradient_matches_closed_form_and_custom_root():
  x, y, xv, yv = ridge_data()
  lam = 0.7
  w = exact_ridge(lam, x, y)
  g, info = bilevel.ift_hypergradient(inner_loss, outer_loss, w, lam, inner_args=(x, y),
                                      outer_args=(xv, yv), config=TIGHT)
  expected = float(closed_form_hypergrad(lam, x, y, xv, yv))
  assert abs(float(g) - expected) <= 1e-8 * max(1.0, abs(expected))
  assert bool(info.converged) and float(info.inner_grad_norm) < 1e-10
  argmin = bilevel.make_argmin(inner_loss, lambda w0, l, a, b: exact_ridge(l, a, b), TIGHT)
  g2 = jax.grad(lambda l: outer_loss(argmin(jnp.zeros(6), l, x, y), l, xv, yv))(lam)
  assert abs(float(g2) - expected) <= 1e-8 * max(1.0, abs(expected))


def test_root_and_fixed_point_forms_agree_with_fd_and_unrolling():
  x, y, xv, yv = ridge_data()
  lmax = float(np.linalg.eigvalsh(np.asarray(x.T @ x)).max())
  eta = 1.0 / (lmax + 5.0)
  gd_map = lambda w, lam, a, b: w - eta * ridge_grad(w, lam, a, b)

  root_solver = custom_root(ridge_grad, config=TIGHT, symmetric=True)(cg_inner_solver)
  fp_solver = custom_fixed_point(gd_map, config=TIGHT.replace(method="gmres"))(
      fixed_point_iteration(gd_map, tol=1e-15, maxiter=100000))
  fp_neumann = custom_fixed_point(gd_map, config=TIGHT.replace(method="neumann",
                                                               maxiter=100000))(
      fixed_point_iteration(gd_map, tol=1e-15, maxiter=100000))

  def val(solver):
    # Finite differences call this on perturbed lam: the inner problem is re-solved to ~1e-15.
    return lambda lam: outer_loss(solver(jnp.zeros(6), lam, x, y), lam, xv, yv)

  def unrolled(lam):
    step = jax.checkpoint(lambda w, _: (gd_map(w, lam, x, y), None))
    w = jax.lax.scan(step, jnp.zeros(6), None, length=3000)[0]
    return outer_loss(w, lam, xv, yv)

  lam = jnp.asarray(1.3)
  g_unrolled = jax.jit(jax.grad(unrolled))(lam)
  grads = []
  for solver in (root_solver, fp_solver, fp_neumann):
    res = check_implicit_grad(val(solver), lam, against=("fd", "reference"), reference=g_unrolled,
                              eps=1e-5, rtol=1e-6, atol=1e-9, num_directions=1)
    grads.append(float(res.grad))
  np.testing.assert_allclose(grads, float(closed_form_hypergrad(lam, x, y, xv, yv)), rtol=1e-8)


def _tanh_problem(seed=0, n=5, p=3):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(n, n))
  a = 0.6 * a / np.linalg.norm(a, 2)
  b = rng.normal(size=(n, p))
  return jnp.asarray(a), jnp.asarray(b)


@pytest.mark.parametrize("method", ["gmres", "neumann", "normal_cg", "dense"])
def test_tanh_fixed_point_all_solvers(method):
  a, b = _tanh_problem()
  t_map = lambda z, theta: jnp.tanh(a @ z + b @ theta["v"]) * theta["s"]
  solver = custom_fixed_point(t_map, solve=method, config=TIGHT)(
      fixed_point_iteration(t_map, tol=1e-15, maxiter=2000))
  theta = {"v": jnp.array([0.3, -0.2, 0.5]), "s": jnp.asarray(0.9)}
  f = lambda th: jnp.sum(jnp.sin(solver(jnp.zeros(5), th)))
  check_implicit_grad(f, theta, eps=1e-6, rtol=1e-6, atol=1e-9, num_directions=3)


def test_jit_and_vmap_compose():
  x, y, xv, yv = ridge_data()
  solver = custom_root(ridge_grad, config=TIGHT, symmetric=True)(cg_inner_solver)
  hg = lambda l: jax.grad(lambda l_: outer_loss(solver(jnp.zeros(6), l_, x, y), l_, xv, yv))(l)
  lams = jnp.array([0.1, 1.0, 10.0])
  batched = jax.jit(jax.vmap(hg))(lams)
  expected = jnp.stack([closed_form_hypergrad(l, x, y, xv, yv) for l in lams])
  np.testing.assert_allclose(batched, expected, rtol=1e-8)


def test_forward_mode_is_blocked_and_documented():
  x, y, _, _ = ridge_data()
  solver = custom_root(ridge_grad, config=TIGHT, symmetric=True)(cg_inner_solver)
  with pytest.raises(TypeError, match="custom_vjp"):
    jax.jvp(lambda l: solver(jnp.zeros(6), l, x, y), (1.0,), (1.0,))
  import lowrank_jax.implicit._root as root_mod
  assert "forward mode (`jvp`, `jacfwd`) is blocked" in root_mod.__doc__


def test_diagnostics_probe_and_nonconvergence_policies():
  x, y, xv, yv = ridge_data()

  def loss_with(cfg):
    solver = custom_root(ridge_grad, config=cfg, symmetric=True)(cg_inner_solver)
    return lambda l, p: outer_loss(solver(jnp.zeros(6), l, x, y, diagnostics=p), l, xv, yv)

  _, diag = jax.grad(loss_with(TIGHT), argnums=(0, 1))(1.0, AdjointDiagnostics.zeros())
  assert float(diag.converged) == 1.0 and float(diag.residual) < 1e-13
  assert 1 <= float(diag.iterations) <= 6

  starved = AdjointConfig(tol=1e-14, maxiter=2, on_nonconvergence="ignore")
  g, diag = jax.grad(loss_with(starved), argnums=(0, 1))(1.0, AdjointDiagnostics.zeros())
  assert float(diag.converged) == 0.0 and float(diag.iterations) == 2 and np.isfinite(g)

  with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    jax.grad(loss_with(starved.replace(on_nonconvergence="warn")))(1.0, None)
  assert any("did not converge" in str(r.message) for r in rec)

  with pytest.raises(Exception, match="did not converge"):
    jax.block_until_ready(
        jax.jit(jax.grad(loss_with(starved.replace(on_nonconvergence="raise"))))(1.0, None))


def test_unconverged_inner_solve_degrades_smoothly():
  """K inner GD steps (not a root): the IFT hypergradient error tracks |w_K - w*|, no NaN."""
  x, y, xv, yv = ridge_data()
  lam = 1.0
  lmax = float(np.linalg.eigvalsh(np.asarray(x.T @ x)).max()) + lam
  exact = float(closed_form_hypergrad(lam, x, y, xv, yv))
  errors = []
  for k in (0, 3, 10, 30, 100, 1000):
    w = jnp.zeros(6)
    for _ in range(k):
      w = w - ridge_grad(w, lam, x, y) / lmax
    g, info = bilevel.ift_hypergradient(inner_loss, outer_loss, w, lam, inner_args=(x, y),
                                        outer_args=(xv, yv), config=TIGHT)
    assert np.isfinite(float(g)) and bool(info.converged)
    errors.append(abs(float(g) - exact))
  assert all(e1 >= e2 for e1, e2 in zip(errors, errors[1:])), errors
  assert errors[0] > 1e-2 and errors[-1] < 1e-8, errors


def test_neumann_series_and_warm_start():
  x, y, xv, yv = ridge_data()
  lam = 1.0
  w = exact_ridge(lam, x, y)
  lmax = float(np.linalg.eigvalsh(np.asarray(x.T @ x)).max()) + lam
  exact = float(closed_form_hypergrad(lam, x, y, xv, yv))
  errs = []
  for i in (1, 10, 1000):
    cfg = AdjointConfig(method="neumann", neumann_alpha=1.0 / lmax, maxiter=i, tol=0.0,
                        on_nonconvergence="ignore")
    g, info = bilevel.ift_hypergradient(inner_loss, outer_loss, w, lam, inner_args=(x, y),
                                        outer_args=(xv, yv), config=cfg)
    assert int(info.iterations) == i and np.isfinite(float(g))
    errs.append(abs(float(g) - exact))
  assert errs[0] > errs[1] > 1e-6 and errs[2] < 1e-9 * max(1.0, abs(exact)), errs
  # Warm start: the previous adjoint at a nearby lam saves CG iterations (larger problem).
  x, y, xv, yv = ridge_data(n=80, nv=40, d=60, seed=1)
  cfg = AdjointConfig(tol=1e-12)
  hyper = lambda l, u0=None: bilevel.ift_hypergradient(
      inner_loss, outer_loss, exact_ridge(l, x, y), l, inner_args=(x, y), outer_args=(xv, yv),
      config=cfg, u0=u0)
  _, info0 = hyper(0.5)
  _, cold = hyper(0.5005)
  _, warm = hyper(0.5005, info0.u)
  assert int(warm.iterations) < int(cold.iterations)


def test_config_validation():
  with pytest.raises(ValueError, match="method"):
    AdjointConfig(method="lu")
  with pytest.raises(ValueError, match="on_nonconvergence"):
    AdjointConfig(on_nonconvergence="explode")
  with pytest.raises(ValueError, match="ridge"):
    AdjointConfig(ridge=-1.0)
  with pytest.raises(TypeError, match="AdjointConfig"):
    custom_root(ridge_grad, config={"tol": 1e-3})
  solver = custom_root(ridge_grad)(cg_inner_solver)
  x, y, _, _ = ridge_data()
  with pytest.raises(TypeError, match="AdjointDiagnostics"):
    solver(jnp.zeros(6), 1.0, x, y, diagnostics=jnp.zeros(4))
  assert hash(AdjointConfig()) == hash(AdjointConfig())


def test_ridge_option_biases_and_custom_solve_callable():
  x, y, xv, yv = ridge_data()
  exact = float(closed_form_hypergrad(1.0, x, y, xv, yv))
  biased = custom_root(ridge_grad, config=TIGHT.replace(ridge=1.0))(cg_inner_solver)
  g = jax.grad(lambda l: outer_loss(biased(jnp.zeros(6), l, x, y), l, xv, yv))(1.0)
  assert abs(float(g) - exact) > 1e-4

  def dense_solve(matvec, b):
    a = jax.vmap(matvec)(jnp.eye(b.shape[0])).T
    return jnp.linalg.solve(a, b)

  user = custom_root(ridge_grad, solve=dense_solve, config=TIGHT)(cg_inner_solver)
  g = jax.grad(lambda l: outer_loss(user(jnp.zeros(6), l, x, y), l, xv, yv))(1.0)
  assert abs(float(g) - exact) <= 1e-8 * max(1.0, abs(exact))


def test_check_implicit_grad_catches_a_wrong_backward():
  @jax.custom_vjp
  def f(t):
    return jnp.sum(t ** 2)

  f.defvjp(lambda t: (f(t), t), lambda t, g: (3.0 * g * t,))   # wrong: should be 2 g t
  with pytest.raises(AssertionError, match="implicit gradient check failed"):
    check_implicit_grad(f, jnp.arange(1.0, 4.0))
  res = check_implicit_grad(f, jnp.arange(1.0, 4.0), raise_on_failure=False, coordinates=True)
  assert not res.passed and len(res.fd_directional) == 3 + 3
  with pytest.raises(ValueError, match="reference"):
    check_implicit_grad(f, jnp.ones(2), against=("reference",))


def test_has_aux_and_warm_start_config():
  x, y, xv, yv = ridge_data()

  def solver_aux(w0, lam, a, b):
    return exact_ridge(lam, a, b), {"iters": jnp.asarray(1)}

  s = custom_root(ridge_grad, config=TIGHT.replace(warm_start=True), has_aux=True)(solver_aux)
  g = jax.grad(lambda l: outer_loss(s(jnp.zeros(6), l, x, y)[0], l, xv, yv))(1.0)
  expected = float(closed_form_hypergrad(1.0, x, y, xv, yv))
  assert abs(float(g) - expected) <= 1e-8 * max(1.0, abs(expected))
  sol, aux = s(jnp.zeros(6), 1.0, x, y)
  assert sol.shape == (6,) and int(aux["iters"]) == 1


# ----------------------------------------------------------------------------------------------
# The forward solver is checked, not trusted; the adjoint method follows the problem's symmetry.
# ----------------------------------------------------------------------------------------------


def _policy_outcomes(grad_fn):
  """Runs `grad_fn(policy)` under each host policy; returns the warnings and the raised error."""
  with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    jax.block_until_ready(grad_fn("warn"))
  with pytest.raises(Exception) as raised:
    jax.block_until_ready(grad_fn("raise"))
  return [str(r.message) for r in rec], str(raised.value)


def test_early_stopped_forward_cg_is_reported_per_policy():
  """A 3-iteration forward CG: its gradient is off, and every policy now says so."""
  x, y, xv, yv = ridge_data()
  lam = 1.0

  def cg3(w0, l, a, b):
    return linear_solve(lambda v: a.T @ (a @ v) + l * v, a.T @ b, x0=w0,
                        config=AdjointConfig(tol=1e-15, maxiter=3), symmetric=True)

  def hypergrad(policy, probe=None):
    cfg = TIGHT.replace(on_nonconvergence=policy)
    solver = custom_root(ridge_grad, config=cfg, has_aux=True, symmetric=True)(cg3)
    loss = lambda l, p: outer_loss(solver(jnp.zeros(6), l, x, y, diagnostics=p)[0], l, xv, yv)
    return jax.grad(loss, argnums=(0, 1))(lam, probe)

  exact = float(closed_form_hypergrad(lam, x, y, xv, yv))
  g, diag = hypergrad("ignore", AdjointDiagnostics.zeros())
  assert abs(float(g) - exact) > 1e-3 * abs(exact)           # the failure being reported
  w3 = np.asarray(cg3(jnp.zeros(6), lam, x, y)[0])
  h = np.asarray(x.T @ x) + lam * np.eye(6)
  f_norm = np.linalg.norm(h @ w3 - np.asarray(x.T @ y))
  np.testing.assert_allclose(float(diag.forward_residual), f_norm / (1 + np.linalg.norm(w3)),
                             rtol=1e-10)
  assert float(diag.forward_residual) > 1e-2
  assert float(diag.forward_iterations) == 3 and float(diag.forward_converged) == 0.0
  assert float(diag.converged) == 1.0                          # the adjoint itself is fine
  warned, raised = _policy_outcomes(lambda p: hypergrad(p)[0])
  assert any("not a root" in m and "after 3 solver iterations" in m for m in warned), warned
  assert "not a root" in raised
  g_nan, _ = hypergrad("nan")
  assert np.isnan(float(g_nan))
  solver = custom_root(ridge_grad, config=TIGHT.replace(on_nonconvergence="nan"), has_aux=True,
                       symmetric=True)(cg3)
  assert np.all(np.isnan(np.asarray(solver(jnp.zeros(6), lam, x, y)[0])))


def test_two_iteration_fixed_point_is_reported_and_tight_one_is_not():
  """x = tanh(A x + B theta) stopped after 2 iterations: gradient off against FD, now reported."""
  a, b = _tanh_problem()
  t_map = lambda z, theta: jnp.tanh(a @ z + b @ theta)
  theta = jnp.array([0.3, -0.2, 0.5])
  tight = fixed_point_iteration(t_map, tol=1e-15, maxiter=2000)
  value = lambda th: jnp.sum(jnp.sin(tight(jnp.zeros(5), th)))
  direction = jnp.array([1.0, 2.0, -1.0]) / np.sqrt(6.0)
  fd = (float(value(theta + 1e-6 * direction)) - float(value(theta - 1e-6 * direction))) / 2e-6

  def directional(maxiter, policy, probe=None):
    solver = custom_fixed_point(t_map, config=TIGHT.replace(on_nonconvergence=policy),
                                has_aux=True)(
        fixed_point_iteration(t_map, tol=1e-15, maxiter=maxiter, return_info=True))
    loss = lambda th, p: jnp.sum(jnp.sin(solver(jnp.zeros(5), th, diagnostics=p)[0]))
    g, diag = jax.grad(loss, argnums=(0, 1))(theta, probe)
    return jnp.dot(g, direction), diag

  g2, diag = directional(2, "ignore", AdjointDiagnostics.zeros())
  assert abs(float(g2) - fd) > 1e-3 * abs(fd)
  assert float(diag.forward_converged) == 0.0 and float(diag.forward_iterations) == 2
  warned, raised = _policy_outcomes(lambda p: directional(2, p)[0])
  assert any("not a root" in m for m in warned) and "not a root" in raised
  assert np.isnan(float(directional(2, "nan")[0]))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    g_tight, diag = directional(2000, "raise", AdjointDiagnostics.zeros())
  assert abs(float(g_tight) - fd) <= 1e-6 * abs(fd)
  assert float(diag.forward_converged) == 1.0 and float(diag.forward_residual) < 1e-14
  assert 2 < float(diag.forward_iterations) < 2000


def test_divergent_iteration_is_reported_not_returned_silently():
  """x <- 2 x + theta diverges (the root x* = -theta repels): 1e15 is flagged, or NaN."""
  t_map = lambda z, theta: 2.0 * z + theta
  theta = jnp.ones(3)
  iterate = fixed_point_iteration(t_map, tol=1e-10, maxiter=50)

  def solve(policy):
    return custom_fixed_point(t_map, config=TIGHT.replace(on_nonconvergence=policy))(iterate)(
        jnp.zeros(3), theta)

  diverged = np.asarray(solve("ignore"))
  assert np.all(np.abs(diverged) > 1e14)                      # what used to pass silently
  warned, raised = _policy_outcomes(solve)
  assert any("not a root" in m for m in warned) and "not a root" in raised
  assert np.all(np.isnan(np.asarray(solve("nan"))))
  grad = jax.grad(lambda t: jnp.sum(custom_fixed_point(
      t_map, config=TIGHT.replace(on_nonconvergence="nan"))(iterate)(jnp.zeros(3), t)))(theta)
  assert np.all(np.isnan(np.asarray(grad)))


def test_default_adjoint_method_follows_the_problem_symmetry():
  """A config without a method used CG on the non-symmetric I - dT/dx; now GMRES (FD-checked)."""
  assert AdjointConfig().resolve(symmetric=True).method == "cg"
  assert AdjointConfig().resolve(symmetric=False).method == "gmres"
  assert AdjointConfig(method="neumann").resolve(symmetric=False).method == "neumann"
  a, b = _tanh_problem()
  t_map = lambda z, theta: jnp.tanh(a @ z + b @ theta)
  theta = jnp.array([0.3, -0.2, 0.5])
  iterate = fixed_point_iteration(t_map, tol=1e-15, maxiter=2000)
  no_method = AdjointConfig(tol=1e-12, on_nonconvergence="ignore")

  def grad_with(cfg, probe=None):
    solver = custom_fixed_point(t_map, config=cfg)(iterate)
    return jax.grad(lambda th, p: jnp.sum(jnp.sin(solver(jnp.zeros(5), th, diagnostics=p))),
                    argnums=(0, 1))(theta, probe)

  value = lambda th: jnp.sum(jnp.sin(iterate(jnp.zeros(5), th)))
  fd = np.array([(float(value(theta + 1e-6 * e)) - float(value(theta - 1e-6 * e))) / 2e-6
                 for e in jnp.eye(3)])
  g_cg, diag_cg = grad_with(no_method.replace(method="cg"), AdjointDiagnostics.zeros())
  assert float(diag_cg.converged) == 0.0                      # the old default's failure
  assert np.max(np.abs(np.asarray(g_cg) - fd)) > 1e-4
  g, diag = grad_with(no_method, AdjointDiagnostics.zeros())
  assert float(diag.converged) == 1.0
  np.testing.assert_allclose(np.asarray(g), fd, rtol=1e-6, atol=1e-9)
  # The same config on a symmetric problem (ridge, F a gradient) solves by CG: at most d steps.
  x, y, xv, yv = ridge_data()
  solver = custom_root(ridge_grad, config=no_method, symmetric=True)(cg_inner_solver)
  _, diag = jax.grad(lambda l, p: outer_loss(solver(jnp.zeros(6), l, x, y, diagnostics=p), l,
                                             xv, yv), argnums=(0, 1))(1.0,
                                                                       AdjointDiagnostics.zeros())
  assert float(diag.converged) == 1.0 and float(diag.iterations) <= 6


def test_nan_policy_on_a_starved_adjoint_and_forward_config_validation():
  x, y, xv, yv = ridge_data()
  starved = AdjointConfig(method="cg", tol=1e-14, maxiter=2, on_nonconvergence="nan")
  solver = custom_root(ridge_grad, config=starved, symmetric=True)(cg_inner_solver)
  g = jax.jit(jax.grad(lambda l: outer_loss(solver(jnp.zeros(6), l, x, y), l, xv, yv)))(1.0)
  assert np.isnan(float(g))
  assert np.all(np.isfinite(np.asarray(solver(jnp.zeros(6), 1.0, x, y))))  # forward is fine
  with pytest.raises(ValueError, match="forward_tol"):
    AdjointConfig(forward_tol=-1.0)
  with pytest.raises(ValueError, match="forward_atol"):
    AdjointConfig(forward_atol=-1.0)
  # A loose inner solve passes once the caller loosens the forward tolerance.
  loose = AdjointConfig(forward_tol=1.0, on_nonconvergence="raise")
  w, info = fixed_point_iteration(lambda z, t: 0.5 * z + t, tol=1e-3, maxiter=100,
                                  return_info=True)(0.0, 1.0)
  assert bool(info.converged) and 0 < float(info.residual) <= 1e-3 and int(info.iterations) > 1
  fp = custom_fixed_point(lambda z, t: 0.5 * z + t, config=loose)(
      fixed_point_iteration(lambda z, t: 0.5 * z + t, tol=1e-3, maxiter=100))
  np.testing.assert_allclose(float(jax.grad(lambda t: fp(0.0, t))(1.0)), 2.0, rtol=1e-8)
