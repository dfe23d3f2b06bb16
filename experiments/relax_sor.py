"""Learning to relax on shifted 2-D Poisson systems: cumulative SOR sweeps of the bandits.

Run: ``python -m experiments.relax_sor --systems 200 --grid 12 [--plot regret.png]
[--out_dir DIR]`` (float64, CPU; about 15 s at the default ``--m 10``, a minute for 1000
systems), or ``--config configs/repro/relax.py`` for the reproduction's settings. ``--out_dir``
writes ``relax_sor.csv`` (per system), ``summary.json`` and ``relax_sor.png`` (cumulative sweeps
per policy; regret against T with a linear and a ``sqrt(T)`` reference).

System t is ``(P + c_t I) x = b_t`` with P the five-point Laplacian of an m×m grid,
``c_t ~ U[0, c_max]`` and ``b_t ~ N(0, I)``. For every system the sweep count of SOR (from zero, to
relative residual ``tol``) is computed for every grid point; the learners only read the entry of the
arm they chose. Printed, cumulative over the first t systems:

* ``tsallis``: Tsallis-INF (no context), mean over ``--seeds`` seeds;
* ``squarecb``: SquareCB on Chebyshev features of ``c_t`` (context), mean over the same seeds;
* ``best_fixed``: the grid point with the fewest sweeps over the whole sequence (hindsight);
* ``instance``: the best grid point for each system;
* ``young``: Young's formula ``omega*(c) = 2 / (1 + sqrt(1 - rho^2))``, ``rho = 4 cos(pi h) /
  (4 + c)``, off the grid (the analytic instance-optimal policy);
* ``gauss_seidel``: omega = 1.

Measured (2026-12-02, shared 2-core CPU under load ~40, jax 0.10.2;
``--config configs/repro/relax.py``: 1000 systems, m = 10, 12 omegas in [1, 1.95], 5 seeds;
37 s of CPU time, 11 min 26 s wall)::

       t   tsallis  squarecb  best_fixed  instance    young  gauss_seidel
     100    5360.4    4102.0      2801.0    2113.0   2059.0        4439.0
     200    9604.0    6659.6      5555.0    4260.0   4130.0        8733.0
    1000   40329.0   26501.8     27242.0   21294.0  20691.0       43435.0

  best fixed omega 1.345; regret / T of tsallis against the best fixed omega for horizon T:
  38.5 / 25.6 / 20.2 / 13.1 at T = 10 / 100 / 200 / 1000; squarecb against the instance-optimal
  grid point: 42.8 / 19.9 / 12.0 / 5.2.
"""
from __future__ import annotations

import argparse
import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from configs import common
from lowrank_jax.implicit import relax


def sweep_table(m, shifts, rhs, grid, tol, max_iter):
  """(T, K) sweep counts and the (T,) counts at Young's omega."""
  poisson = relax.poisson_2d(m, jnp.float64)
  eye = jnp.eye(m * m, dtype=jnp.float64)
  rho0 = np.cos(np.pi / (m + 1))

  @jax.jit
  def counts(c, b):
    a = poisson + c * eye
    young = relax.young_omega(4.0 * rho0 / (4.0 + c))
    on_grid = relax.sor_iterations(a, b, grid, tol=tol, max_iter=max_iter)
    return on_grid, relax.sor_solve(a, b, young, tol=tol, max_iter=max_iter).iterations

  rows = [counts(c, b) for c, b in zip(shifts, rhs)]
  return (np.stack([np.asarray(r[0]) for r in rows]), np.array([int(r[1]) for r in rows]))


def horizon_regret(played, table):
  """Regret after each horizon T: ``sum_{t<=T} played_t - min_k sum_{t<=T} table[t, k]`` (the
  best fixed arm in hindsight *for that horizon*)."""
  return np.cumsum(played) - np.cumsum(table, axis=0).min(axis=1)


def run(args):
  """The sequence, the learners' replays and the reference policies: ``(curves, table, shifts,
  grid)`` with ``curves`` a dict of (T,) per-system sweep counts."""
  rng = np.random.default_rng(0)
  shifts = rng.uniform(0.0, args.c_max, size=args.systems)
  rhs = rng.normal(size=(args.systems, args.m * args.m))
  grid = relax.omega_grid(args.grid)
  table, young = sweep_table(args.m, shifts, rhs, grid, args.tol, args.max_iter)
  losses = jnp.asarray(table / args.max_iter)
  picked = lambda arms: table[np.arange(args.systems), np.asarray(arms)]
  tsallis = np.mean([picked(relax.tsallis_inf_play(losses, jax.random.key(s))[0])
                     for s in range(args.seeds)], axis=0)
  squarecb = np.mean([picked(relax.square_cb_play(losses, jnp.asarray(shifts), jax.random.key(s),
                                                  low=0.0, high=args.c_max)[0])
                      for s in range(args.seeds)], axis=0)
  best_arm = int(np.argmin(table.sum(axis=0)))
  curves = {
      "tsallis": tsallis, "squarecb": squarecb, "best_fixed": table[:, best_arm],
      "instance": table.min(axis=1), "young": young, "gauss_seidel": table[:, 0],
  }
  return curves, table, shifts, np.asarray(grid)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--m", type=int, default=10, help="grid side; the systems have m*m unknowns")
  ap.add_argument("--systems", type=int, default=200)
  ap.add_argument("--grid", type=int, default=12, help="number of omega values in [1, 1.95]")
  ap.add_argument("--c_max", type=float, default=2.0, help="shifts c ~ U[0, c_max]")
  ap.add_argument("--tol", type=float, default=1e-8)
  ap.add_argument("--max_iter", type=int, default=400, help="sweep budget; loss = sweeps / budget")
  ap.add_argument("--seeds", type=int, default=5)
  ap.add_argument("--plot", default="", help="if set, save the regret curves to this PNG path")
  ap.add_argument("--out_dir", default="",
                  help="if set, write relax_sor.csv, relax_sor.png and summary.json there")
  args = common.parse_flags_with_config(ap, "sor", argv)
  jax.config.update("jax_enable_x64", True)

  curves, table, shifts, grid = run(args)
  tsallis, squarecb = curves["tsallis"], curves["squarecb"]
  best_arm = int(np.argmin(table.sum(axis=0)))
  print(f"{args.systems} systems, m={args.m} ({args.m ** 2} unknowns), c ~ U[0, {args.c_max}], "
        f"tol={args.tol}, budget {args.max_iter} sweeps; grid {np.round(grid, 3)}")
  print(f"best fixed omega in hindsight: {float(grid[best_arm]):.3f}; systems that hit the "
        f"budget at some grid point: {int((table >= args.max_iter).any(axis=1).sum())}")
  print("cumulative SOR sweeps after t systems (bandits: mean over "
        f"{args.seeds} seeds)")
  checkpoints = sorted({t for t in (10, 25, 50, 100, 200, 400, 800) if t <= args.systems}
                       | {args.systems})
  print("t".rjust(6) + "".join(name.rjust(14) for name in curves))
  for t in checkpoints:
    print(f"{t:6d}" + "".join(f"{np.sum(c[:t]):14.1f}" for c in curves.values()))
  regret = horizon_regret(tsallis, table)
  print("regret vs best fixed / t at the checkpoints (tsallis):",
        " ".join(f"{regret[t - 1] / t:.2f}" for t in checkpoints))
  print("regret vs instance-optimal / t at the checkpoints (squarecb):",
        " ".join(f"{(np.cumsum(squarecb) - np.cumsum(curves['instance']))[t - 1] / t:.2f}"
                 for t in checkpoints))
  if args.plot:
    plot_regret(curves, table, args.plot)
  if args.out_dir:
    write_outputs(args, curves, table, shifts, grid, checkpoints)


def write_outputs(args, curves, table, shifts, grid, checkpoints):
  """``relax_sor.csv`` (per system: shift, every policy's sweeps, the regrets), ``summary.json``
  (totals, regret / T at the checkpoints) and ``relax_sor.png`` (`plot_regret`)."""
  os.makedirs(args.out_dir, exist_ok=True)
  regrets = {"tsallis_vs_best_fixed": horizon_regret(curves["tsallis"], table),
             "squarecb_vs_best_fixed": horizon_regret(curves["squarecb"], table),
             "squarecb_vs_instance": np.cumsum(curves["squarecb"] - curves["instance"])}
  with open(os.path.join(args.out_dir, "relax_sor.csv"), "w", newline="") as f:
    out = csv.writer(f)
    out.writerow(["t", "shift", *curves, *(f"regret_{k}" for k in regrets)])
    for t in range(len(shifts)):
      out.writerow([t + 1, f"{shifts[t]:.6g}", *(f"{c[t]:.6g}" for c in curves.values()),
                    *(f"{r[t]:.6g}" for r in regrets.values())])
  best_arm = int(np.argmin(table.sum(axis=0)))
  summary = {
      "systems": args.systems, "m": args.m, "c_max": args.c_max, "tol": args.tol,
      "max_iter": args.max_iter, "seeds": args.seeds, "grid": [float(g) for g in grid],
      "best_fixed_omega": float(grid[best_arm]),
      "total_sweeps": {k: float(np.sum(c)) for k, c in curves.items()},
      "regret_over_t": {k: {int(t): float(r[t - 1] / t) for t in checkpoints}
                        for k, r in regrets.items()},
  }
  with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  plot_regret(curves, table, os.path.join(args.out_dir, "relax_sor.png"))


def plot_regret(curves, table, path):
  """Two panels: cumulative sweeps per policy; regret against T for the learners, with the
  expected regret of uniformly random play (linear) and ``c sqrt(T)`` (sublinear) as references,
  ``c`` matched to Tsallis-INF's regret at the last T."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  ts = np.arange(1, len(table) + 1)
  for name, c in curves.items():
    left.plot(ts, np.cumsum(c), label=name)
  left.set_xlabel("systems solved")
  left.set_ylabel("cumulative SOR sweeps")
  left.legend()
  tsallis = horizon_regret(curves["tsallis"], table)
  right.plot(ts, tsallis, label="tsallis vs best fixed (horizon T)")
  right.plot(ts, horizon_regret(curves["squarecb"], table),
             label="squarecb vs best fixed (horizon T)")
  right.plot(ts, np.cumsum(curves["squarecb"] - curves["instance"]),
             label="squarecb vs instance-optimal (grid)")
  right.plot(ts, horizon_regret(table.mean(axis=1), table), "k:",
             label="uniform random play (expected)")
  scale = tsallis[-1] / np.sqrt(ts[-1])
  right.plot(ts, scale * np.sqrt(ts), "k--", label=f"{scale:.1f} sqrt(T)")
  right.set_xlabel("T (systems)")
  right.set_ylabel("regret (SOR sweeps)")
  right.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  print(f"saved {path}")


if __name__ == "__main__":
  main()
