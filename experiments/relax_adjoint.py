"""Learning to relax on the adjoint systems of IFT weight-decay tuning (sklearn digits).

Run: ``python -m experiments.relax_adjoint`` (float64, CPU, a minute or two).

Inner problem: multinomial logistic regression on 600 standardised digits (64 pixels + bias) with
weight decay ``lam``, solved by warm-started L-BFGS. Outer: Adam on ``log lam`` against the
cross-entropy on 400 validation digits, hypergradients by the IFT (adjoint solved by CG to 1e-10,
warm-started from the previous step's adjoint). Every outer step t gives one matrix-free system
``H_t u = g_t`` (Hessian-vector products only); the systems drift as ``lam`` moves.

For each system, the number of Neumann (Richardson) iterations ``u <- u + alpha (g - H u)`` needed
to reach the relative residual ``--tol`` is measured for every ``alpha`` in a grid (multiples of
``1 / lambda_max(H_0)`` from 0.5 to 8, wide because ``lambda_max`` falls with ``lam``; ``--maxiter`` when it diverges or does not converge), starting from the
previous adjoint (warm start). Every policy therefore reaches the same hypergradient accuracy; the
learners only see the count of the arm they chose. Printed, in total adjoint iterations:

* ``tsallis`` (no context) and ``squarecb`` (context ``log lam_t``), mean over seeds;
* ``best_fixed`` (hindsight), ``instance`` (best arm per system);
* ``default``: the library's default ``neumann_alpha = 1.0``;
* the grid point nearest ``1 / lambda_max(H_0)``, the textbook choice made once at the start;
* ``cg``: conjugate gradients to the same tolerance, for reference.

With ``--online`` the learners also run inside the tuning loop, as the ``neumann_alpha_grid``
(Tsallis-INF) and ``neumann_alpha_context`` (SquareCB on log lam) options of `AdjointConfig`
(`start_online`), against CG and the default step, all at the same tolerance; ``--workers``
threads run them alongside the offline part. ``--out_dir`` writes ``relax_adjoint.csv``,
``relax_adjoint_summary.json`` and ``relax_adjoint.png``; ``--config configs/repro/relax.py``
takes the reproduction's flags.

Measured offline (2026-12-02, shared 2-core CPU under load ~35, jax 0.10.2; the defaults, i.e.
``python -m experiments.relax_adjoint``; 51 s of CPU time, 9 min 29 s wall): lam 1 -> 0.0226
over 50 outer steps, ``lambda_max(H_t)`` 2.18 -> 0.539; total adjoint iterations over the 50
systems (bandits: mean of 5 seeds)::

  tsallis  squarecb  best_fixed  instance  0.93/lmax0  default (alpha=1)    cg
  19594.8   14008.8      8874.0    3120.0     16546.0             9176.0  709.0

The best fixed step is 1.714 / lambda_max(H_0); the default step alpha = 1 failed on 2 of the 50
systems (each counted as the 1000-iteration budget). With 50 rounds and 10 arms, both learners
pay more than the default step: the sequence is too short for them, and CG is 12x cheaper than
the best fixed Neumann step.

Measured online (same day and machine, load ~38; ``--config configs/repro/relax.py --out_dir
/tmp/relax``, i.e. the defaults plus ``--online --online_seeds 3 --workers 4``; offline part
included, 3 min 37 s of CPU time, 26 min 52 s wall): total adjoint iterations over the 50 outer
steps of `tune_hyperparameters`, every solve to relative residual 1e-6 (largest residual
1.00e-6 in every row; final lam 0.0216 in every row)::

  cg                     709
  default alpha=1       9192   (alpha = 1 failed on 2 of the 50 systems offline)
  tsallis-online       16103   (seeds 20623 / 14416 / 13269)
  contextual-online    12967   (seeds 12410 / 14560 / 11931)

The contextual learner (context log lam in [-7, 2.5]) pays 19% less than Tsallis-INF but 41%
more than the default step, and 18x more than CG.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

from configs import common
from lowrank_jax import bilevel
from lowrank_jax.implicit import AdjointConfig, linear_solve, relax


def load():
  x, y = load_digits(return_X_y=True)
  x = (x - x.mean(0)) / (x.std(0) + 1e-6)
  x = np.concatenate([x, np.ones((len(x), 1))], 1)
  perm = np.random.default_rng(0).permutation(len(x))
  tr, va = perm[:600], perm[600:1000]
  return jnp.asarray(x[tr]), jnp.asarray(y[tr]), jnp.asarray(x[va]), jnp.asarray(y[va])


def cross_entropy(w, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(x @ w, y).mean()


def inner_loss(w, log_lam, x, y):
  return cross_entropy(w, x, y) + 0.5 * jnp.exp(log_lam) * jnp.sum(w ** 2)


def power_iteration(hvp, v, steps=100):
  """Largest eigenvalue of the SPD operator ``hvp`` (Rayleigh quotient after ``steps`` steps)."""
  def body(_, u):
    u = hvp(u)
    return u / jnp.linalg.norm(u)
  u = jax.lax.fori_loop(0, steps, body, v / jnp.linalg.norm(v))
  return jnp.vdot(u, hvp(u))


def make_step(data, alphas, tol, maxiter, inner_steps):
  """Jitted inner solve and the per-system measurement (adjoint, hypergradient, costs)."""
  x, y, xv, yv = data
  solver = optax.lbfgs()
  grad_w = lambda w, log_lam: jax.grad(inner_loss)(w, log_lam, x, y)

  @jax.jit
  def solve_inner(w, log_lam):
    value_fn = lambda v: inner_loss(v, log_lam, x, y)

    def body(carry, _):
      v, s = carry
      val, g = jax.value_and_grad(value_fn)(v)
      u, s = solver.update(g, s, v, value=val, grad=g, value_fn=value_fn)
      return (optax.apply_updates(v, u), s), None

    return jax.lax.scan(body, (w, solver.init(w)), None, length=inner_steps)[0][0]

  @jax.jit
  def measure(w, log_lam, u_prev):
    inner_grad, hvp = jax.linearize(lambda v: grad_w(v, log_lam), w)
    g = jax.grad(cross_entropy)(w, xv, yv)
    exact = AdjointConfig(method="cg", tol=1e-10, maxiter=5000, on_nonconvergence="ignore")
    u, _ = linear_solve(hvp, g, x0=u_prev, config=exact)
    hypergrad = -jax.grad(lambda ll: jnp.vdot(grad_w(w, ll), u))(log_lam)
    cfg = AdjointConfig(tol=tol, maxiter=maxiter, on_nonconvergence="ignore")
    cost = lambda c: (lambda info: jnp.where(info.converged, info.iterations, maxiter))(
        linear_solve(hvp, g, x0=u_prev, config=c)[1])
    neumann = jnp.stack([cost(cfg.replace(method="neumann", neumann_alpha=float(a)))
                         for a in alphas])
    baselines = jnp.stack([cost(cfg.replace(method="neumann")), cost(cfg.replace(method="cg"))])
    return (u, hypergrad, neumann, baselines, power_iteration(hvp, g),
            jnp.linalg.norm(inner_grad))

  return solve_inner, measure


def start_online(data, alphas, init_lam, args, pool):
  """The learners inside the tuning loop: `bilevel.tune_hyperparameters` with
  ``AdjointConfig.neumann_alpha_grid`` (Tsallis-INF over the grid) and with
  ``neumann_alpha_context="log_hyperparams"`` (SquareCB on log lam), each over
  ``--online_seeds`` seeds, against CG (the library's default adjoint solver) and the default
  Neumann step ``alpha = 1`` (given as a grid of two equal steps, so that it too is re-solved by
  CG when it fails). Every solve therefore meets the tolerance: equal hypergradient accuracy.
  The runs are submitted to the thread pool `pool`; returns ``{name: [futures]}`` for
  `report_online`."""
  x, y, xv, yv = data
  solve_inner, _ = make_step(data, alphas[:1], args.tol, args.maxiter, args.inner_steps)
  base = AdjointConfig(tol=args.tol, maxiter=args.maxiter, on_nonconvergence="ignore")
  neumann = base.replace(method="neumann", neumann_alpha_grid=alphas)
  context = dict(neumann_alpha_context="log_hyperparams",
                 neumann_alpha_context_range=tuple(args.context_range))
  groups = {
      "cg": [base.replace(method="cg")],
      "default alpha=1": [base.replace(method="neumann", neumann_alpha_grid=(1.0, 1.0))],
      "tsallis-online": [neumann.replace(learner_seed=s) for s in range(args.online_seeds)],
      "contextual-online": [neumann.replace(learner_seed=s, **context)
                            for s in range(args.online_seeds)],
  }
  tune = lambda cfg: bilevel.tune_hyperparameters(
      inner_loss, lambda w, _, xv_, yv_: cross_entropy(w, xv_, yv_), jnp.zeros((65, 10)),
      jnp.log(init_lam), outer_optimizer=optax.adam(args.outer_lr),
      outer_steps=args.outer_steps, inner_solver=lambda w, ll, *_: solve_inner(w, ll),
      inner_args=(x, y), outer_args=(xv, yv), config=cfg)
  return {name: [pool.submit(tune, cfg) for cfg in cfgs] for name, cfgs in groups.items()}


def report_online(futures, args):
  """Prints the total adjoint iterations, the largest adjoint residual and the final lam of each
  online configuration; returns ``{name: (outer_steps,) adjoint iterations}`` (seeds
  averaged)."""
  print(f"tune_hyperparameters, {args.outer_steps} outer steps, adjoint tol {args.tol} (a failed "
        "Neumann solve is re-solved by CG; its iterations count); learners: mean over "
        f"{args.online_seeds} seeds")
  print("config".ljust(20) + "adjoint iterations".rjust(20) + "max residual".rjust(14)
        + "final lam".rjust(12) + "   per seed")
  curves = {}
  for name, group in futures.items():
    runs = [f.result() for f in group]
    counts = np.array([r.history["adjoint_iterations"] for r in runs], float)
    curves[name] = counts.mean(0)
    per_seed = " ".join(f"{int(c)}" for c in counts.sum(1)) if len(runs) > 1 else ""
    print(name.ljust(20) + f"{counts.sum(1).mean():20.1f}"
          + f"{max(max(r.history['adjoint_residual']) for r in runs):14.2e}"
          + f"{np.mean([float(jnp.exp(r.hyperparams)) for r in runs]):12.4g}   {per_seed}")
  return curves


def write_outputs(out_dir, offline, online_curves, summary):
  """``relax_adjoint.csv`` (per outer step: every policy's adjoint iterations, offline replay
  and online), ``relax_adjoint_summary.json`` and ``relax_adjoint.png`` (cumulative iterations,
  offline replay and online)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  columns = {f"offline_{k}": v for k, v in offline.items()}
  columns.update({f"online_{k}": v for k, v in online_curves.items()})
  with open(os.path.join(out_dir, "relax_adjoint.csv"), "w", newline="") as f:
    out = csv.writer(f)
    out.writerow(["step", *columns])
    for t in range(len(next(iter(columns.values())))):
      out.writerow([t + 1, *(f"{c[t]:.6g}" for c in columns.values())])
  with open(os.path.join(out_dir, "relax_adjoint_summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  panels = [("offline replay on the CG trajectory's systems", offline)]
  if online_curves:
    panels.append(("online in tune_hyperparameters (equal accuracy)", online_curves))
  fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
  for ax, (title, curves) in zip(axes[0], panels):
    for name, c in curves.items():
      ax.plot(np.arange(1, len(c) + 1), np.cumsum(c), label=name)
    ax.set_yscale("log")
    ax.set_xlabel("outer step")
    ax.set_ylabel("cumulative adjoint iterations (HVPs)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
  fig.tight_layout()
  path = os.path.join(out_dir, "relax_adjoint.png")
  fig.savefig(path, dpi=120)
  plt.close(fig)
  print(f"saved {path}")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--outer_steps", type=int, default=50)
  ap.add_argument("--outer_lr", type=float, default=0.1)
  ap.add_argument("--init_lam", type=float, default=1.0)
  ap.add_argument("--inner_steps", type=int, default=100)
  ap.add_argument("--tol", type=float, default=1e-6, help="adjoint relative residual")
  ap.add_argument("--maxiter", type=int, default=1000, help="adjoint iteration budget")
  ap.add_argument("--grid", type=int, default=10)
  ap.add_argument("--seeds", type=int, default=5)
  ap.add_argument("--online", action="store_true",
                  help="also run the learners inside tune_hyperparameters (AdjointConfig option)")
  ap.add_argument("--online_seeds", type=int, default=3, help="seeds of each online learner")
  ap.add_argument("--context_range", type=float, nargs=2, default=(-7.0, 2.5),
                  help="range of the contextual learner's context log(lam)")
  ap.add_argument("--out_dir", default="", help="if set, write CSV, summary JSON and PNG there")
  ap.add_argument("--workers", type=int, default=1,
                  help="threads running the online tuning runs, alongside the offline part")
  args = common.parse_flags_with_config(ap, "adjoint", argv)
  jax.config.update("jax_enable_x64", True)

  data = load()
  w = jnp.zeros((65, 10))
  log_lam = jnp.log(args.init_lam)
  probe_solve, probe = make_step(data, (1.0,), args.tol, args.maxiter, args.inner_steps)
  w = probe_solve(w, log_lam)
  lmax0 = float(probe(w, log_lam, jnp.zeros_like(w))[4])
  multiples = np.geomspace(0.5, 8.0, args.grid)
  alphas = tuple(float(m / lmax0) for m in multiples)
  solve_inner, measure = make_step(data, alphas, args.tol, args.maxiter, args.inner_steps)
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=args.workers)
  futures = start_online(data, alphas, args.init_lam, args, pool) if args.online else {}

  opt = optax.adam(args.outer_lr)
  opt_state = opt.init(log_lam)
  u = jnp.zeros_like(w)
  rows, contexts, lams, lmaxes, inner_norms = [], [], [], [], []
  for _ in range(args.outer_steps):
    w = solve_inner(w, log_lam)
    u_next, hypergrad, neumann, baselines, lmax, inner_norm = measure(w, log_lam, u)
    rows.append(np.concatenate([np.asarray(neumann), np.asarray(baselines)]))
    contexts.append(float(log_lam))
    lmaxes.append(float(lmax))
    inner_norms.append(float(inner_norm))
    upd, opt_state = opt.update(hypergrad, opt_state)
    log_lam = optax.apply_updates(log_lam, upd)
    u = u_next
  table = np.array(rows)
  arms, (default, cg) = table[:, :args.grid], table[:, args.grid:].T
  contexts = np.array(contexts)

  losses = jnp.asarray(arms / args.maxiter)
  picked = lambda a: arms[np.arange(len(arms)), np.asarray(a)]
  low, high = contexts.min() - 1e-9, contexts.max() + 1e-9
  tsallis = np.mean([picked(relax.tsallis_inf_play(losses, jax.random.key(s))[0])
                     for s in range(args.seeds)], axis=0)
  squarecb = np.mean([picked(relax.square_cb_play(losses, jnp.asarray(contexts),
                                                  jax.random.key(s), low=low, high=high)[0])
                      for s in range(args.seeds)], axis=0)
  best = int(np.argmin(arms.sum(0)))
  at_one = int(np.argmin(np.abs(multiples - 1.0)))
  print(f"{args.outer_steps} outer steps; lam {np.exp(contexts[0]):.3g} -> "
        f"{np.exp(contexts[-1]):.3g}; lambda_max(H_t) {lmaxes[0]:.3g} -> {lmaxes[-1]:.3g}; "
        f"max inner grad norm {max(inner_norms):.2e}")
  print(f"adjoint tol {args.tol}, budget {args.maxiter} (cost = budget when not converged); "
        f"alpha grid = {np.round(multiples, 3)} / lambda_max(H_0), lambda_max(H_0) = {lmax0:.4g}")
  print(f"best fixed arm in hindsight: {multiples[best]:.3f} / lambda_max(H_0); "
        f"systems where the default alpha=1 converged: {int((default < args.maxiter).sum())}")
  curves = {"tsallis": tsallis, "squarecb": squarecb, "best_fixed": arms[:, best],
            "instance": arms.min(1), f"{multiples[at_one]:.2f}/lmax0": arms[:, at_one],
            "default": default, "cg": cg}
  print("total adjoint iterations over the first t systems (bandits: mean over "
        f"{args.seeds} seeds)")
  print("t".rjust(5) + "".join(k.rjust(13) for k in curves))
  for t in sorted({10, 20, 40, len(arms)} & set(range(1, len(arms) + 1))):
    print(f"{t:5d}" + "".join(f"{np.sum(c[:t]):13.1f}" for c in curves.values()))
  online_curves = report_online(futures, args) if args.online else {}
  pool.shutdown()
  if args.out_dir:
    summary = {
        "outer_steps": args.outer_steps, "tol": args.tol, "maxiter": args.maxiter,
        "alpha_multiples_of_1_over_lambda_max0": [float(m) for m in multiples],
        "lambda_max0": lmax0, "lam_first_last": [float(np.exp(contexts[0])),
                                                 float(np.exp(contexts[-1]))],
        "offline_totals": {k: float(np.sum(c)) for k, c in curves.items()},
        "online_totals": {k: float(np.sum(c)) for k, c in online_curves.items()},
        "seeds": args.seeds, "online_seeds": args.online_seeds,
        "context_range": list(args.context_range)}
    write_outputs(args.out_dir, curves, online_curves, summary)


if __name__ == "__main__":
  main()
