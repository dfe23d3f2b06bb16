"""Bilevel tuning of per-feature weight decay for logistic regression on sklearn digits.

Run: ``python -m experiments.bilevel_digits`` (CPU, float64; 35-85 s wall on a shared 2-core
machine under heavy load).

Setup (deterministic): `sklearn.datasets.load_digits` (1797 images, 64 pixel features / 16),
permuted with ``numpy.random.default_rng(seed)``; ``n_train`` training, ``n_val`` validation and
the rest test examples. Inner problem: multinomial logistic regression ``(W (64, 10), b (10))``
with ``L_T = mean CE(train) + 0.5 sum_j lam_j |W_j|^2`` (bias unregularised). Outer:
``L_V = mean CE(val)``.

Baseline: the best *shared* weight decay over a log grid, each point solved to convergence with
L-BFGS. Tuned: 64 per-feature decays initialised at the grid best, optimised with Adam on
``log lam`` (`lowrank_jax.bilevel.positive`) using IFT hypergradients (CG adjoint) while the inner
model is trained with warm-started L-BFGS (25 steps per outer step). The tuned decays are evaluated
after re-solving the inner problem to convergence. Prints validation and test losses and
accuracies of both.

Measured (defaults, seed 0; 300 / 600 / 897 examples): grid best shared lam = 1e-4 with validation
loss 0.21146 (test 0.16703, test accuracy 0.9465); per-feature lam after 40 outer steps:
validation loss 0.15143 (test 0.17915, test accuracy 0.9365). The hypergradient does its job on
the validation objective, but 64 hyperparameters fitted on 600 validation examples overfit them:
the held-out test loss does not improve.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank_jax import bilevel
from lowrank_jax.implicit import AdjointConfig


def load_split(seed: int = 0, n_train: int = 300, n_val: int = 300):
  """Deterministic train/val/test split of sklearn digits (features scaled to [0, 1])."""
  from sklearn.datasets import load_digits
  x, y = load_digits(return_X_y=True)
  perm = np.random.default_rng(seed).permutation(len(y))
  x = x[perm] / 16.0
  y = y[perm]
  a, b = n_train, n_train + n_val
  return (x[:a], y[:a]), (x[a:b], y[a:b]), (x[b:], y[b:])


def _ce(params, x, y):
  logits = x @ params["w"] + params["b"]
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def inner_loss(params, lam, x, y):
  """Mean training cross-entropy + 0.5 sum_j lam_j |W_j|^2 (lam: scalar or (64,))."""
  lam = jnp.broadcast_to(lam, (params["w"].shape[0],))
  return _ce(params, x, y) + 0.5 * jnp.sum(lam[:, None] * params["w"] ** 2)


def outer_loss(params, lam, x, y):
  """Mean validation cross-entropy (lam enters only through the inner solution)."""
  del lam
  return _ce(params, x, y)


def accuracy(params, x, y) -> float:
  return float(jnp.mean(jnp.argmax(x @ params["w"] + params["b"], -1) == y))


def solve_inner(params0, lam, x, y, steps=300):
  """L-BFGS (optax, zoom line search) run for ``steps`` iterations (``steps`` may be traced)."""
  tx = optax.lbfgs()
  value_fn = lambda p: inner_loss(p, lam, x, y)
  vg = optax.value_and_grad_from_state(value_fn)

  def body(_, carry):
    p, s = carry
    v, g = vg(p, state=s)
    u, s = tx.update(g, s, p, value=v, grad=g, value_fn=value_fn)
    return optax.apply_updates(p, u), s

  return jax.lax.fori_loop(0, steps, body, (params0, tx.init(params0)))[0]


def run(seed: int = 0, n_train: int = 300, n_val: int = 600, grid=None, outer_steps: int = 40,
        inner_steps: int = 25, outer_lr: float = 0.1, verbose: bool = True) -> dict:
  """Runs the grid baseline and the per-feature bilevel tuning; returns the figures.

  Returns:
    dict with ``grid`` (list of (lam, val_loss)), ``grid_best_lam``, ``grid_best_val_loss``,
    ``grid_best_test_loss``, ``grid_best_val_acc``, ``grid_best_test_acc``,
    ``tuned_val_loss``, ``tuned_test_loss``, ``tuned_val_acc``, ``tuned_test_acc``,
    ``tuned_lam`` (64,), ``outer_history`` (validation loss per outer step),
    ``max_final_inner_grad_norm`` and ``seconds``.
  """
  t0 = time.time()
  with jax.enable_x64(True):
    (xt, yt), (xv, yv), (xs, ys) = load_split(seed, n_train, n_val)
    xt, xv, xs = (jnp.asarray(a, jnp.float64) for a in (xt, xv, xs))
    yt, yv, ys = (jnp.asarray(a) for a in (yt, yv, ys))
    d, k = xt.shape[1], 10
    p0 = {"w": jnp.zeros((d, k)), "b": jnp.zeros((k,))}
    grid = np.logspace(-5, 0, 16) if grid is None else np.asarray(grid, np.float64)

    # One compiled L-BFGS serves the grid, the tuning (warm-started, few steps) and the re-solve.
    solve = jax.jit(solve_inner)
    ps = [solve(p0, jnp.full((d,), lam), xt, yt, 300) for lam in grid]
    val_losses = np.array([float(_ce(p, xv, yv)) for p in ps])
    i = int(np.argmin(val_losses))
    best_lam = float(grid[i])
    p_best = ps[i]
    out = {
        "grid": list(zip(grid.tolist(), val_losses.tolist())),
        "grid_best_lam": best_lam,
        "grid_best_val_loss": float(val_losses[i]),
        "grid_best_test_loss": float(_ce(p_best, xs, ys)),
        "grid_best_val_acc": accuracy(p_best, xv, yv),
        "grid_best_test_acc": accuracy(p_best, xs, ys),
    }
    if verbose:
      print(f"grid of shared weight decay ({len(grid)} points):")
      for lam, vl in out["grid"]:
        print(f"  lam={lam:.3e}  val_loss={vl:.5f}")
      print(f"grid best: lam={best_lam:.3e} val_loss={out['grid_best_val_loss']:.5f} "
            f"test_loss={out['grid_best_test_loss']:.5f} val_acc={out['grid_best_val_acc']:.4f} "
            f"test_acc={out['grid_best_test_acc']:.4f}")

    lam0 = jnp.full((d,), best_lam)
    res = bilevel.tune_hyperparameters(
        inner_loss, outer_loss, p_best, lam0,
        inner_solver=lambda p, lam, x, y: solve(p, lam, x, y, inner_steps),
        outer_optimizer=optax.adam(outer_lr), outer_steps=outer_steps,
        constraints=bilevel.positive(),
        inner_args=(xt, yt), outer_args=(xv, yv),
        config=AdjointConfig(method="cg", tol=1e-8, maxiter=500, on_nonconvergence="ignore"),
        )
    lam_t = res.hyperparams
    p_t = solve(res.params, lam_t, xt, yt, 300)
    g_inner = jax.grad(inner_loss)(p_t, lam_t, xt, yt)
    out.update({
        "tuned_val_loss": float(_ce(p_t, xv, yv)),
        "tuned_test_loss": float(_ce(p_t, xs, ys)),
        "tuned_val_acc": accuracy(p_t, xv, yv),
        "tuned_test_acc": accuracy(p_t, xs, ys),
        "tuned_lam": np.asarray(lam_t),
        "outer_history": res.history["outer_loss"],
        "max_adjoint_residual": float(np.max(res.history["adjoint_residual"])),
        "max_final_inner_grad_norm": float(optax.tree_utils.tree_norm(g_inner)),
    })
  out["seconds"] = time.time() - t0
  if verbose:
    h = out["outer_history"]
    print(f"per-feature tuning: {outer_steps} outer steps x {inner_steps} L-BFGS inner steps; "
          f"val loss along the run {h[0]:.5f} -> {h[-1]:.5f}; max adjoint residual "
          f"{out['max_adjoint_residual']:.2e}")
    lt = out["tuned_lam"]
    print(f"tuned per-feature lam: min {lt.min():.3e} median {np.median(lt):.3e} "
          f"max {lt.max():.3e}")
    print(f"tuned (re-solved, |grad L_T|={out['max_final_inner_grad_norm']:.1e}): "
          f"val_loss={out['tuned_val_loss']:.5f} test_loss={out['tuned_test_loss']:.5f} "
          f"val_acc={out['tuned_val_acc']:.4f} test_acc={out['tuned_test_acc']:.4f}")
    print(f"validation loss: grid-best shared {out['grid_best_val_loss']:.5f} vs per-feature "
          f"{out['tuned_val_loss']:.5f} ({out['seconds']:.1f} s)")
  return out


if __name__ == "__main__":
  run()
