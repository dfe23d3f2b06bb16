r"""Reproduces the matrix-sensing claims of Xiong, Ding & Du (ICLR 2024); see the config.

Run: ``python -m experiments.repro_matrix_sensing --config configs/repro/matrix_sensing.py
--workdir /tmp/matrix_sensing`` (``:runlocal`` for a seconds-long check). Runs in float64.

`run(config)` returns the curves and the summary (the colab calls it too); `write_outputs`
writes ``matrix_sensing.csv``, ``summary.json`` and ``matrix_sensing.png`` to the workdir.
"""
from __future__ import annotations

import csv
import json
import os

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from lowrank_jax import sensing



def _symmetric_runs(config, problem, key):
  """Exact (k = r) and over-parameterised (k = over_width) X Xᵀ runs."""
  dtype = problem.a.dtype
  runs = []
  for k, steps in ((config.rank, config.exact_steps), (config.over_width, config.symmetric_steps)):
    x0 = sensing.small_init(key, config.n, k, config.symmetric_alpha, dtype)
    errors = sensing.run_symmetric(problem, x0, config.eta, steps)
    runs.append(dict(run=f"XXT_k{k}", parameterisation="symmetric", k=k,
                     alpha=config.symmetric_alpha, rebalance=False, rebalanced_at=-1,
                     errors=np.asarray(errors)))
  return runs


def _asymmetric_runs(config, problem, key):
  """F Gᵀ runs at k = over_width: plain GD per alpha, then with the rebalancing step (one
  vectorised scan for all of them)."""
  plain = [(a, None) for a in config.asymmetric_alphas]
  rebalanced = [(a, config.rebalance_below) for a in config.rebalanced_alphas]
  settings = plain + rebalanced
  inits = [sensing.asymmetric_init(key, config.n, config.over_width, a, problem.a.dtype)
           for a, _ in settings]
  errors, at = sensing.run_asymmetric_batch(
      problem, jnp.stack([f for f, _ in inits]), jnp.stack([g for _, g in inits]), config.eta,
      config.asymmetric_steps, [t for _, t in settings])
  runs = []
  for (alpha, threshold), e, t in zip(settings, np.asarray(errors), np.asarray(at)):
    tag = "_rebalanced" if threshold is not None else ""
    runs.append(dict(run=f"FGT_alpha{alpha}{tag}", parameterisation="asymmetric",
                     k=config.over_width, alpha=alpha, rebalance=threshold is not None,
                     rebalanced_at=int(t), errors=e))
  return runs


def fitted_rate(errors: np.ndarray, floor: float) -> float:
  """Linear rate per 1000 steps over the last half of a run, where the error exceeds `floor`."""
  steps = np.arange(len(errors))
  keep = (steps >= len(errors) // 2) & (errors > floor)
  if keep.sum() < 10:
    raise ValueError(f"fewer than 10 steps above the floor {floor} in the last half of the run; "
                     "shorten asymmetric_steps or lower rate_floor")
  return 1000 * sensing.linear_rate(steps[keep], errors[keep])


def summarize(config, runs) -> dict:
  """The claims' figures: error·(ηT)² and the log-log slope (symmetric, over-parameterised), the
  exact run's final error, each plain F Gᵀ run's rate per 1000 steps and rate/α², and each run's
  final error."""
  by_name = {r["run"]: r for r in runs}
  over = by_name[f"XXT_k{config.over_width}"]["errors"]
  ts = np.asarray(config.checkpoints)
  summary = {
      "symmetric_err_times_eta_t_squared": {
          int(t): float(over[t] * (config.eta * t) ** 2) for t in ts},
      "symmetric_loglog_slope": sensing.loglog_slope(ts, over[ts]),
      "symmetric_exact_final_error": float(by_name[f"XXT_k{config.rank}"]["errors"][-1]),
      "asymmetric_rate_per_1000_steps": {},
      "asymmetric_rate_over_alpha_squared": {},
      "final_error": {r["run"]: float(r["errors"][-1]) for r in runs},
      "rebalanced_at": {r["run"]: r["rebalanced_at"] for r in runs if r["rebalance"]},
  }
  for r in runs:
    if r["parameterisation"] == "asymmetric" and not r["rebalance"]:
      rate = fitted_rate(r["errors"], config.rate_floor)
      summary["asymmetric_rate_per_1000_steps"][str(r["alpha"])] = rate
      summary["asymmetric_rate_over_alpha_squared"][str(r["alpha"])] = rate / r["alpha"] ** 2
  return summary


def run(config) -> dict:
  """Builds the problem and runs every curve, in float64. Returns {"runs", "summary"}."""
  with jax.enable_x64(True):
    key_problem, key_init = jax.random.split(jax.random.key(config.seed))
    problem = sensing.make_problem(key_problem, config.n, config.rank, config.num_measurements,
                                   config.singular_values, dtype=jnp.float64)
    runs = _symmetric_runs(config, problem, key_init) + _asymmetric_runs(config, problem, key_init)
  return {"runs": runs, "summary": summarize(config, runs)}


def write_outputs(workdir: str, config, result: dict) -> list[str]:
  """Writes the CSV (every `csv_every`-th step), the summary JSON and the PNG; returns paths."""
  os.makedirs(workdir, exist_ok=True)
  csv_path = os.path.join(workdir, "matrix_sensing.csv")
  with open(csv_path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["run", "parameterisation", "k", "alpha", "rebalance", "step", "error"])
    for r in result["runs"]:
      for t in range(0, len(r["errors"]), config.csv_every):
        w.writerow([r["run"], r["parameterisation"], r["k"], r["alpha"], r["rebalance"], t,
                    f"{r['errors'][t]:.6e}"])
  json_path = os.path.join(workdir, "summary.json")
  with open(json_path, "w") as f:
    json.dump({"config": config.to_dict(), "summary": result["summary"]}, f, indent=1)
  png_path = os.path.join(workdir, "matrix_sensing.png")
  plot(result["runs"], config, png_path)
  return [csv_path, json_path, png_path]


def plot(runs, config, path: str) -> None:
  """Three panels: symmetric (log-log, with the 1/T² guide), asymmetric by alpha, rebalanced."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  ax = axes[0]
  for r in runs:
    if r["parameterisation"] == "symmetric":
      t = np.arange(1, len(r["errors"]))
      ax.loglog(t, r["errors"][1:], label=f"X Xᵀ, k = {r['k']}")
  over = next(r for r in runs if r["run"] == f"XXT_k{config.over_width}")["errors"]
  t0 = config.checkpoints[0]
  t = np.arange(t0, len(over))
  ax.loglog(t, over[t0] * (t0 / t) ** 2, "k--", lw=1, label="∝ 1/T²")
  ax.set(title="symmetric: over-parameterised is Θ(1/T²)", xlabel="step T",
         ylabel="‖M − M*‖²_F", ylim=(1e-30, 10))
  ax.legend()
  for ax, rebalanced, title in ((axes[1], False, "asymmetric F Gᵀ: rate ∝ α²"),
                                (axes[2], True, "with one rebalancing step: α-free")):
    for r in runs:
      if r["parameterisation"] == "asymmetric" and r["rebalance"] == rebalanced:
        ax.semilogy(r["errors"], label=f"α = {r['alpha']}")
        if rebalanced and r["rebalanced_at"] >= 0:
          ax.axvline(r["rebalanced_at"], color="gray", lw=0.5)
    ax.set(title=title, xlabel="step T", ylabel="‖F Gᵀ − M*‖²_F", ylim=(1e-30, 10))
    ax.legend()
  fig.suptitle(f"matrix sensing, n = {config.n}, rank {config.rank}, k = {config.over_width}, "
               f"m = {config.num_measurements}, η = {config.eta}")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  del argv
  config = flags.FLAGS.config
  result = run(config)
  for path in write_outputs(flags.FLAGS.workdir, config, result):
    print("wrote", path)
  print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
  # Flags are defined here, not at import, so that `run` can be imported (by the colab) next to
  # other modules that define `--config`.
  config_flags.DEFINE_config_file("config", None, "configs/repro/matrix_sensing.py[:arg]",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Output directory (CSV, JSON, PNG).")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
