"""SOR and the learning-to-relax bandits against float64 numpy re-derivations and closed forms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax.implicit import relax


def _sor_reference(a, b, omega, tol, max_iter):
  """Row-by-row SOR in plain Python floats; returns (x, sweeps)."""
  n = len(b)
  x = [0.0] * n
  norm_b = float(np.linalg.norm(b))
  for k in range(max_iter + 1):
    if np.linalg.norm(b - a @ np.array(x)) <= tol * norm_b or k == max_iter:
      return np.array(x), k
    for i in range(n):
      s = sum(a[i][j] * x[j] for j in range(n) if j != i)
      x[i] = (1 - omega) * x[i] + omega * (b[i] - s) / a[i][i]


def _poisson_1d(n):
  return 2 * np.eye(n) - np.eye(n, k=1) - np.eye(n, k=-1)


def _spd(n, seed):
  rng = np.random.default_rng(seed)
  m = rng.normal(size=(n, n))
  return m @ m.T + n * np.eye(n), rng.normal(size=n)


@pytest.mark.parametrize("omega", [0.7, 1.0, 1.4])
def test_sor_matches_row_by_row_reference(omega):
  a, b = _spd(8, 0)
  for tol, max_iter in ((1e-30, 5), (1e-10, 500)):
    want_x, want_k = _sor_reference(a, b, omega, tol, max_iter)
    got = relax.sor_solve(jnp.asarray(a), jnp.asarray(b), omega, tol=tol, max_iter=max_iter)
    assert int(got.iterations) == want_k
    np.testing.assert_allclose(np.asarray(got.x), want_x, rtol=1e-12, atol=1e-12)
  assert bool(got.converged) and float(got.residual) <= 1e-10


def test_poisson_2d_is_the_five_point_stencil():
  m = 4
  want = np.zeros((m * m, m * m))
  for i in range(m):
    for j in range(m):
      want[i * m + j, i * m + j] = 4
      for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        if 0 <= i + di < m and 0 <= j + dj < m:
          want[i * m + j, (i + di) * m + j + dj] = -1
  np.testing.assert_array_equal(np.asarray(relax.poisson_2d(m, jnp.float64)), want)


@pytest.mark.parametrize("dim", [1, 2])
def test_iteration_count_is_minimal_at_the_known_optimal_omega(dim):
  n = 30 if dim == 1 else 10
  a = _poisson_1d(n) if dim == 1 else np.asarray(relax.poisson_2d(n, jnp.float64))
  b = np.random.default_rng(dim).normal(size=a.shape[0])
  h = 1.0 / (n + 1)
  omega_star = 2.0 / (1.0 + np.sin(np.pi * h))
  np.testing.assert_allclose(float(relax.young_omega(np.cos(np.pi * h))), omega_star, rtol=1e-14)
  grid = np.linspace(1.2, 1.98, 79)
  counts = np.asarray(relax.sor_iterations(a, b, grid, tol=1e-8, max_iter=5000))
  at_star = int(relax.sor_solve(a, b, omega_star, tol=1e-8, max_iter=5000).iterations)
  assert abs(grid[np.argmin(counts)] - omega_star) <= 0.011
  assert at_star <= 1.1 * counts.min()
  assert counts[0] > 2.5 * counts.min()   # omega matters: the problem is a real test


def test_sor_rejects_bad_input():
  a = jnp.eye(3)
  with pytest.raises(ValueError, match="omega"):
    relax.sor_solve(a, jnp.ones(3), 2.0)
  with pytest.raises(ValueError, match="square"):
    relax.sor_solve(jnp.ones((3, 2)), jnp.ones(3), 1.0)
  with pytest.raises(ValueError, match="max_iter"):
    relax.sor_solve(a, jnp.ones(3), 1.0, max_iter=0)


def _tsallis_reference(losses, t, eta_scale=2.0):
  """Tsallis-INF distribution by bisection on the normaliser x in float64."""
  eta = eta_scale / np.sqrt(t)
  prob = lambda x: 4.0 / (eta * (losses - x)) ** 2
  lo, hi = losses.min() - 2 * np.sqrt(len(losses)) / eta, losses.min() - 2 / eta
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if prob(mid).sum() < 1 else (lo, mid)
  return prob(0.5 * (lo + hi))


def test_tsallis_inf_matches_a_float64_rederivation_along_a_run():
  rng = np.random.default_rng(0)
  table = rng.uniform(size=(60, 6))
  arms, probs = relax.tsallis_inf_play(jnp.asarray(table), jax.random.key(3))
  arms, probs = np.asarray(arms), np.asarray(probs)
  cumulative = np.zeros(6)
  for t in range(60):
    np.testing.assert_allclose(probs[t], _tsallis_reference(cumulative, t + 1), rtol=1e-10)
    cumulative[arms[t]] += table[t, arms[t]] / probs[t, arms[t]]
  assert len(set(arms.tolist())) > 1


def test_tsallis_inf_concentrates_on_the_best_arm():
  rng = np.random.default_rng(1)
  means = np.array([0.5, 0.3, 0.6, 0.8, 0.45, 0.55])
  table = np.clip(means + rng.uniform(-0.1, 0.1, size=(3000, 6)), 0, 1)
  arms, probs = relax.tsallis_inf_play(jnp.asarray(table), jax.random.key(0))
  assert np.asarray(probs)[-500:, 1].mean() > 0.8
  played = table[np.arange(3000), np.asarray(arms)].sum()
  regret = played - table[:, 1].sum()
  assert 0 < regret < 0.05 * 3000   # uniform play would lose 0.23 per round


def test_square_cb_probabilities_match_ridge_regression_and_inverse_gap_weighting():
  rng = np.random.default_rng(2)
  k, degree, ridge, low, high = 4, 3, 0.5, 0.0, 2.0
  state = relax.square_cb_init(k, degree, ridge, jnp.float64)
  history = []
  for _ in range(25):
    c, arm, loss = rng.uniform(low, high), int(rng.integers(k)), rng.uniform()
    state = relax.square_cb_update(state, relax.chebyshev_features(c, low, high, degree), arm, loss)
    history.append((c, arm, loss))
  c = 1.3
  phi = np.polynomial.chebyshev.chebvander(2 * (c - low) / (high - low) - 1, degree)[0]
  preds = []
  for i in range(k):
    rows = [(h[0], h[2]) for h in history if h[1] == i]
    x = np.polynomial.chebyshev.chebvander(
        2 * (np.array([r[0] for r in rows]) - low) / (high - low) - 1, degree)
    targets = np.array([r[1] for r in rows])
    coef = np.linalg.solve(x.T @ x + ridge * np.eye(degree + 1), x.T @ targets)
    preds.append(float(phi @ coef))
  preds = np.array(preds)
  gamma = 0.7 * np.sqrt(k * 26)
  want = 1 / (k + gamma * (preds - preds.min()))
  best = np.argmin(preds)
  want[best] = 1 - (want.sum() - want[best])
  got = relax.square_cb_probabilities(state, relax.chebyshev_features(c, low, high, degree),
                                       gamma_scale=0.7)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10)


def test_square_cb_approaches_the_instance_optimal_policy():
  rng = np.random.default_rng(3)
  rounds, grid = 2000, np.linspace(1.0, 1.9, 10)
  contexts = rng.uniform(0, 2, size=rounds)
  best_omega = 1.9 - 0.45 * contexts          # the best arm moves with the context
  table = 0.2 + 0.5 * (grid[None] - best_omega[:, None]) ** 2 + rng.uniform(0, 0.02, (rounds, 10))
  arms, _ = relax.square_cb_play(jnp.asarray(table), jnp.asarray(contexts), jax.random.key(0),
                                 low=0.0, high=2.0, degree=2)
  tail = slice(rounds - 500, rounds)
  played = table[np.arange(rounds), np.asarray(arms)][tail].mean()
  instance_optimal = table[tail].min(axis=1).mean()
  best_fixed = table[tail].mean(axis=0).min()
  assert played - instance_optimal < 0.25 * (best_fixed - instance_optimal)
