"""lowrank_jax.sensing against float64 numpy re-derivations of the measurement model, the gradient
descent updates and the rebalancing step, at tiny sizes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax import sensing
from lowrank_jax import testing

N, RANK, M = 6, 2, 60


@pytest.fixture(name="problem", scope="module")
def _problem():
  with testing.enable_x64():
    yield sensing.make_problem(jax.random.key(0), n=N, rank=RANK, num_measurements=M,
                               singular_values=(1.0, 0.5), dtype=jnp.float64)


@pytest.fixture(autouse=True)
def _x64():
  with testing.enable_x64():
    yield


def _np_gradient(a, y, mat):
  """(1/m) Σ_i (⟨A_i, M⟩ − y_i) A_i, written with an explicit loop over measurements."""
  grad = np.zeros_like(mat)
  for a_i, y_i in zip(a, y):
    grad += (np.sum(a_i * mat) - y_i) * a_i
  return grad / len(a)


def test_problem_is_a_psd_rank_r_target_and_its_measurements(problem):
  a, y, target = (np.asarray(x) for x in problem)
  assert a.shape == (M, N, N) and target.dtype == np.float64
  np.testing.assert_allclose(target, target.T, atol=1e-14)
  np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(target))[::-1][:3], [1.0, 0.5, 0.0],
                             atol=1e-12)
  np.testing.assert_allclose(y, [np.sum(a_i * target) for a_i in a], rtol=1e-12)


def test_loss_gradient_matches_the_sum_over_measurements_and_finite_differences(problem):
  mat = np.asarray(jax.random.normal(jax.random.key(3), (N, N), jnp.float64))
  a, y = np.asarray(problem.a), np.asarray(problem.y)
  grad = np.asarray(sensing.loss_gradient(problem, jnp.asarray(mat)))
  np.testing.assert_allclose(grad, _np_gradient(a, y, mat), rtol=1e-11, atol=1e-12)
  loss = lambda mm: np.sum((np.einsum("ijk,jk->i", a, mm) - y) ** 2) / (2 * M)
  e = np.zeros((N, N))
  e[1, 4] = 1e-6
  assert abs((loss(mat + e) - loss(mat - e)) / 2e-6 - grad[1, 4]) < 1e-6


def test_symmetric_run_matches_a_numpy_gradient_descent(problem):
  a, y, target = (np.asarray(x) for x in problem)
  x0 = sensing.small_init(jax.random.key(1), N, 3, 0.5, jnp.float64)
  errors = np.asarray(sensing.run_symmetric(problem, x0, eta=0.05, steps=4))
  x, expected = np.asarray(x0), []
  for _ in range(4):
    expected.append(np.sum((x @ x.T - target) ** 2))
    g = _np_gradient(a, y, x @ x.T)
    x = x - 0.05 * (g + g.T) @ x
  expected.append(np.sum((x @ x.T - target) ** 2))
  np.testing.assert_allclose(errors, expected, rtol=1e-10)


def _np_rebalance(f, g, scale):
  evals, evecs = np.linalg.eigh(f.T @ f)
  r = scale * evecs @ np.diag(evals ** -0.5) @ evecs.T
  return f @ r, g @ np.linalg.inv(r).T


@pytest.mark.parametrize("threshold", [None, 1e6])
def test_asymmetric_run_matches_a_numpy_gradient_descent(problem, threshold):
  """Simultaneous F, G updates; with a threshold above the initial error the rebalancing runs
  before the first step."""
  a, y, target = (np.asarray(x) for x in problem)
  f0, g0 = sensing.asymmetric_init(jax.random.key(2), N, 3, 0.5, jnp.float64)
  errors, at = sensing.run_asymmetric(problem, f0, g0, eta=0.05, steps=4,
                                      rebalance_below=threshold, rebalance_scale=0.8)
  f, g, expected = np.asarray(f0), np.asarray(g0), []
  if threshold is not None:
    f, g = _np_rebalance(f, g, 0.8)
  for _ in range(4):
    expected.append(np.sum((f @ g.T - target) ** 2))
    grad = _np_gradient(a, y, f @ g.T)
    f, g = f - 0.05 * grad @ g, g - 0.05 * grad.T @ f
  expected.append(np.sum((f @ g.T - target) ** 2))
  np.testing.assert_allclose(np.asarray(errors), expected, rtol=1e-10)
  assert int(at) == (-1 if threshold is None else 0)


def test_rebalance_keeps_the_product_and_sets_the_singular_values():
  f = np.asarray(jax.random.normal(jax.random.key(4), (7, 3), jnp.float64)) * [1.0, 0.1, 0.01]
  g = np.asarray(jax.random.normal(jax.random.key(5), (5, 3), jnp.float64))
  f2, g2 = (np.asarray(x) for x in sensing.rebalance(jnp.asarray(f), jnp.asarray(g), 2.0))
  np.testing.assert_allclose(f2 @ g2.T, f @ g.T, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(np.linalg.svd(f2, compute_uv=False), [2.0, 2.0, 2.0], rtol=1e-10)


def test_batched_runs_equal_the_single_runs(problem):
  keys = jax.random.split(jax.random.key(6), 2)
  x0s = jnp.stack([sensing.small_init(k, N, 3, 0.3, jnp.float64) for k in keys])
  batch = sensing.run_symmetric_batch(problem, x0s, 0.05, 5)
  for x0, errors in zip(x0s, batch):
    np.testing.assert_allclose(errors, sensing.run_symmetric(problem, x0, 0.05, 5), rtol=1e-12)
  inits = [sensing.asymmetric_init(k, N, 3, 0.3, jnp.float64) for k in keys]
  f0s, g0s = jnp.stack([f for f, _ in inits]), jnp.stack([g for _, g in inits])
  errors, at = sensing.run_asymmetric_batch(problem, f0s, g0s, 0.05, 5, [None, 1e6])
  for i, threshold in enumerate([None, 1e6]):
    single, single_at = sensing.run_asymmetric(problem, f0s[i], g0s[i], 0.05, 5, threshold)
    np.testing.assert_allclose(errors[i], single, rtol=1e-12)
    assert int(at[i]) == int(single_at)


def test_exact_width_converges_linearly_and_over_parameterised_stalls(problem):
  """The paper's symmetric contrast at a tiny size: after the same steps, k = r is at round-off
  and k > r is still far from it."""
  key = jax.random.key(7)
  exact = sensing.run_symmetric(problem, sensing.small_init(key, N, RANK, 0.1, jnp.float64),
                                0.2, 1500)
  over = sensing.run_symmetric(problem, sensing.small_init(key, N, 4, 0.1, jnp.float64), 0.2, 1500)
  assert float(exact[-1]) < 1e-20
  assert float(over[-1]) > 1e-8


def test_fitted_slope_and_rate_recover_known_curves():
  t = np.arange(100, 1000, 50)
  assert sensing.loglog_slope(t, 3.0 / t ** 2) == pytest.approx(-2.0, abs=1e-12)
  assert sensing.linear_rate(t, 5.0 * np.exp(-0.03 * t)) == pytest.approx(0.03, rel=1e-10)


def test_bad_input_names_the_field(problem):
  with pytest.raises(ValueError, match="rank must be <= n"):
    sensing.make_problem(jax.random.key(0), n=3, rank=4)
  with pytest.raises(ValueError, match="singular_values must be 2 positive values"):
    sensing.make_problem(jax.random.key(0), n=3, rank=2, singular_values=(1.0,))
  with pytest.raises(ValueError, match="k must be a positive int"):
    sensing.small_init(jax.random.key(0), 4, 0, 0.1)
  with pytest.raises(ValueError, match="alpha must be a positive number"):
    sensing.small_init(jax.random.key(0), 4, 2, -1.0)
  x0 = jnp.zeros((N, 2), jnp.float64)
  with pytest.raises(ValueError, match="eta must be a positive number"):
    sensing.run_symmetric(problem, x0, 0.0, 3)
  with pytest.raises(ValueError, match="steps must be a positive int"):
    sensing.run_asymmetric(problem, x0, x0, 0.1, 0)
  with pytest.raises(ValueError, match="rebalance_below needs one entry per run"):
    sensing.run_asymmetric_batch(problem, x0[None], x0[None], 0.1, 3, [None, None])
