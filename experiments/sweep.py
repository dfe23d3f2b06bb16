r"""Runs a config's sweep: `python -m experiments.sweep --config configs/<x>.py --workdir DIR`.

The config module's `sweep(add)` declares the points (as big_vision configs' `sweep_best(add)`):
each `add(arg="k=v,...", **{"field.sub": value})` is one run, given by a config arg and/or field
overrides. Each point runs into `DIR/<point name>` (in this process by default, or as a
`python -m experiments.run` subprocess with `--subprocess`); points whose `results.json` exists are
finished and skipped, so an interrupted sweep resumes. `--only REGEX` selects which points run;
the results and plots always cover every finished point of the sweep (a filter never drops a
finished point from `results.csv`). At the end it writes

  DIR/results.csv            one row per point (method, rank, seed, accuracy, params, time, ...)
  DIR/accuracy_vs_params.png accuracy vs trainable parameters, one series per method
  DIR/loss_curves.png        training loss vs step of every point
  DIR/rank_allocation.png    per-module ranks of IncreLoRA/AdaLoRA points, if they logged them
                             (`ranks.jsonl` in the point's workdir)

A plot with nothing to show is removed rather than left from an earlier call.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
from typing import Any, NamedTuple

from absl import app
from absl import flags
from absl import logging

_CONFIG = flags.DEFINE_string("config", None, "Config file with a sweep(add) function.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory (one subdirectory per point).")
_SUBPROCESS = flags.DEFINE_bool("subprocess", False, "Run each point as a subprocess.")
_ONLY = flags.DEFINE_string("only", "", "Run only points whose name matches this regex.")
_PLOT_ONLY = flags.DEFINE_bool("plot_only", False, "Only collect results and plot.")

# What a failed point raises (a bad config, missing data, a non-finite loss, a failed subprocess).
POINT_ERRORS = (ValueError, FileNotFoundError, ImportError, FloatingPointError,
                subprocess.CalledProcessError)
PLOT_FILES = ("accuracy_vs_params.png", "loss_curves.png", "rank_allocation.png")
RESULT_COLUMNS = ("name", "method", "rank", "seed", "accuracy", "eval_loss", "trainable_params",
                  "adapter_params", "steps", "train_s", "wall_s", "arg", "overrides")


class Point(NamedTuple):
  """One sweep point: a config arg and field overrides ({"optimizer.lr": 1e-3})."""
  name: str
  arg: str | None
  overrides: dict


def load_config_module(path: str):
  """Imports a config file by path (its directory's parent must be importable for `configs.*`)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path} not found")
  name = "_sweep_config_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  module.__config_path__ = path
  return module


def point_name(arg: str | None, overrides: dict) -> str:
  parts = [p.replace("=", "-") for p in (arg or "").split(",") if p]
  parts += [f"{k}-{v}" for k, v in sorted(overrides.items())]
  name = "_".join(parts) or "default"
  return re.sub(r"[^A-Za-z0-9._+-]", "", name)


def expand(module) -> list[Point]:
  """The points declared by `module.sweep(add)`.

  Raises:
    ValueError: the module has no `sweep`, or two points get the same name.
  """
  if not hasattr(module, "sweep"):
    raise ValueError(f"config {getattr(module, '__name__', module)} defines no sweep(add)")
  points: list[Point] = []

  def add(arg: str | None = None, **overrides):
    points.append(Point(point_name(arg, overrides), arg, dict(overrides)))

  module.sweep(add)
  names = [p.name for p in points]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise ValueError(f"sweep declares duplicate points: {dup}")
  return points


def apply_overrides(config, overrides: dict):
  """Sets dotted fields of a (locked) ConfigDict; unknown fields raise ValueError."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      if p not in node:
        raise ValueError(f"sweep override {key!r}: config has no field {p!r}")
      node = node[p]
    if leaf not in node:
      raise ValueError(f"sweep override {key!r}: config has no field {leaf!r}; fields here: "
                       f"{sorted(node.keys())}")
    node[leaf] = value
  return config


def point_config(module, point: Point):
  config = module.get_config(point.arg)
  config.lock()
  return apply_overrides(config, point.overrides)


def run_point(module, point: Point, workdir: str, use_subprocess: bool) -> None:
  if use_subprocess:
    path = module.__config_path__ + (f":{point.arg}" if point.arg else "")
    cmd = [sys.executable, "-m", "experiments.run", f"--config={path}", f"--workdir={workdir}"]
    cmd += [f"--config.{k}={v}" for k, v in point.overrides.items()]
    logging.info("running %s", " ".join(cmd))
    subprocess.run(cmd, check=True)
  else:
    from lowrank_jax import train  # pylint: disable=g-import-not-at-top
    train.train_and_evaluate(point_config(module, point), workdir)


def collect(workdir: str, points: list[Point]) -> list[dict[str, Any]]:
  rows = []
  for p in points:
    path = os.path.join(workdir, p.name, "results.json")
    if not os.path.exists(path):
      continue
    with open(path) as f:
      r = json.load(f)
    cfg = r.get("config", {})
    ad = cfg.get("adapter", {})
    rank = next((ad[k] for k in ("rank", "target_rank", "target_r", "d") if k in ad), "")
    rows.append({"name": p.name, "method": r.get("method"), "rank": rank,
                 "seed": cfg.get("seed", ""),
                 "accuracy": r.get("accuracy"), "eval_loss": r.get("eval_loss"),
                 "trainable_params": r.get("trainable_params"),
                 "adapter_params": r.get("adapter_params"), "steps": r.get("steps"),
                 "train_s": r.get("train_s"), "wall_s": r.get("wall_s"), "arg": p.arg or "",
                 "overrides": json.dumps(p.overrides) if p.overrides else ""})
  return rows


def write_csv(path: str, rows: list[dict]):
  """Writes the rows to `path` through a temporary file, so a crash leaves the old file whole."""
  tmp = path + ".tmp"
  with open(tmp, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
    w.writeheader()
    for r in rows:
      w.writerow({k: r.get(k, "") for k in RESULT_COLUMNS})
  os.replace(tmp, path)


def plot(workdir: str, rows: list[dict]) -> list[str]:
  """Writes the PNGs; returns their paths."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from lowrank_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  out = []
  if not rows:
    return out
  fig, ax = plt.subplots(figsize=(7, 4.5))
  methods = sorted({r["method"] for r in rows})
  colors = plt.get_cmap("tab20")
  markers = "os^vD<>pP*hX"
  for i, method in enumerate(methods):
    rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["trainable_params"])
    ax.plot([r["trainable_params"] for r in rs], [r["accuracy"] for r in rs],
            marker=markers[i % len(markers)], linestyle="-", color=colors(i % 20), label=method,
            alpha=0.85)
  ax.set_xscale("log")
  ax.set_xlabel("trainable parameters")
  ax.set_ylabel("eval accuracy")
  ax.set_title("accuracy vs trainable parameters")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  out.append(os.path.join(workdir, "accuracy_vs_params.png"))
  fig.savefig(out[-1], dpi=100)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(6, 4))
  for r in rows:
    recs = [m for m in metrics_lib.read_jsonl(os.path.join(workdir, r["name"], "metrics.jsonl"))
            if "loss" in m]
    ax.plot([m["step"] for m in recs], [m["loss"] for m in recs], label=r["name"], alpha=0.8)
  ax.set_xlabel("step")
  ax.set_ylabel("train loss")
  ax.set_yscale("log")
  ax.set_title("loss curves")
  ax.grid(alpha=0.3)
  if len(rows) <= 12:
    ax.legend(fontsize=6)
  fig.tight_layout()
  out.append(os.path.join(workdir, "loss_curves.png"))
  fig.savefig(out[-1], dpi=100)
  plt.close(fig)

  rank_rows = [(r, metrics_lib.read_jsonl(os.path.join(workdir, r["name"], "ranks.jsonl")))
               for r in rows]
  rank_rows = [(r, recs) for r, recs in rank_rows if recs]
  if rank_rows:
    fig, axes = plt.subplots(len(rank_rows), 1, figsize=(7, 2.2 * len(rank_rows)),
                             squeeze=False)
    for ax, (r, recs) in zip(axes[:, 0], rank_rows):
      modules = list(recs[-1].get("ranks", {}))
      for m in modules:
        ax.step([rec["step"] for rec in recs], [rec["ranks"].get(m, 0) for rec in recs],
                where="post", label=m.replace("encoder/", "").replace("/kernel", ""))
      ax.set_ylabel("rank")
      ax.set_title(f"{r['name']}: rank per module", fontsize=8)
      if len(modules) <= 12:
        ax.legend(fontsize=5, ncol=2)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    out.append(os.path.join(workdir, "rank_allocation.png"))
    fig.savefig(out[-1], dpi=100)
    plt.close(fig)
  return out


def select(points: list[Point], only: str) -> list[Point]:
  """The points whose name matches the regex `only` (all points if it is empty).

  Raises:
    ValueError: `only` is not a valid regex, or matches no point.
  """
  if not only:
    return points
  try:
    pattern = re.compile(only)
  except re.error as e:
    raise ValueError(f"--only {only!r} is not a valid regex: {e}") from None
  chosen = [p for p in points if pattern.search(p.name)]
  if not chosen:
    raise ValueError(f"--only {only!r} matches no point; points: {[p.name for p in points]}")
  return chosen


def remove_stale_plots(workdir: str, written: list[str]) -> None:
  """Deletes the sweep's plot files that this call did not rewrite."""
  for name in PLOT_FILES:
    path = os.path.join(workdir, name)
    if path not in written and os.path.exists(path):
      os.remove(path)


def run_sweep(config_path: str, workdir: str, *, use_subprocess: bool = False, only: str = "",
              plot_only: bool = False) -> list[dict]:
  """Runs (or skips, if finished) the points `only` selects, then writes results.csv and the
  plots over every finished point of the sweep.

  Raises:
    ValueError: `only` selects nothing, or a point failed (the others still run, and the results
      of every finished point are written first).
  """
  module = load_config_module(config_path)
  points = expand(module)
  chosen = select(points, only)
  os.makedirs(workdir, exist_ok=True)
  failed = []
  if not plot_only:
    for i, p in enumerate(chosen):
      wd = os.path.join(workdir, p.name)
      if os.path.exists(os.path.join(wd, "results.json")):
        print(f"[{i + 1}/{len(chosen)}] {p.name}: finished, skipped", flush=True)
        continue
      print(f"[{i + 1}/{len(chosen)}] {p.name}: running", flush=True)
      try:
        run_point(module, p, wd, use_subprocess)
      except POINT_ERRORS as e:
        failed.append(p.name)
        print(f"[{i + 1}/{len(chosen)}] {p.name}: failed: {type(e).__name__}: {e}", flush=True)
  rows = collect(workdir, points)
  write_csv(os.path.join(workdir, "results.csv"), rows)
  pngs = plot(workdir, rows)
  remove_stale_plots(workdir, pngs)
  if failed:
    raise ValueError(f"{len(failed)} point(s) failed: {failed}; results.csv and the plots hold "
                     f"the {len(rows)} finished point(s)")
  print(f"{len(rows)}/{len(points)} points finished; wrote {workdir}/results.csv and "
        f"{', '.join(os.path.basename(p) for p in pngs)}", flush=True)
  for r in rows:
    print(f"  {r['name']:40s} {r['method']:10s} acc {r['accuracy']:.4f} "
          f"params {r['trainable_params']:>9,} time {r['wall_s']:.1f}s", flush=True)
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    run_sweep(_CONFIG.value, _WORKDIR.value, use_subprocess=_SUBPROCESS.value, only=_ONLY.value,
              plot_only=_PLOT_ONLY.value)
  except (ValueError, FileNotFoundError, ImportError) as e:
    if os.environ.get("LOWRANK_JAX_TRACEBACK"):
      raise
    print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
