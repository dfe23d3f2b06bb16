r"""Method comparison on MiniLM + WordNet supersenses: accuracy, parameters and step time of every
registered adapter, full fine-tuning and the frozen baseline; see `configs/repro/methods.py`.

Run: ``python -m experiments.repro_methods --config configs/repro/methods.py
--workdir /tmp/repro_methods`` (``:runlocal`` for a seconds-long check).

Each (method, size) point builds its adapter, optimizer and jitted train / eval steps once, with
the trainer's own pieces (`lowrank_jax.train`: model and data, `init_adapter` with calibration,
`make_steps`); every seed then reuses those compiled steps with its own head and adapter init and
data order. Seeds are the outer loop, so an interrupted run has every method at seed 0 first.
`methods.csv` gets a row per (method, size, seed) as soon as it finishes; rows already there are
skipped on a rerun. Step time is the median wall (and process CPU) time of the train steps after
the first `timing_skip`, the step blocked on its metrics as in the trainer's loop. With
`--workers`, several processes share the workdir and claim points from it.

Measured (2026-12-02, shared 2-core AMD EPYC CPU, load 20-38; Python 3.11.7, jax 0.10.2, flax
0.12.8, optax 0.2.8): all 72 runs, 52 in 80 min wall with 5 workers at nice 5 and the last 20
resumed in 19 min with 2; median step CPU time 170 ms (frozen baseline),
~380-430 ms (the other adapters), 597 ms (intrinsic, Fastfood), 687 ms (full fine-tuning).
Accuracies and verdicts: `configs/repro/methods.py` and `docs/results.md`.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import resource
import time
from typing import Any, Optional

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np
import optax
from ml_collections import config_flags

from configs import common
from configs import quickstart
from configs.repro import methods as methods_cfg
from lowrank_jax import optim
from lowrank_jax import registry
from lowrank_jax import steps
from lowrank_jax import tasks
from lowrank_jax import train
from lowrank_jax import tree as tree_lib

CSV_NAME, SUMMARY_NAME, PNG_NAME = "methods.csv", "summary.json", "methods.png"
FAILURES_NAME = "failures.jsonl"
# What a failing point raises (bad arguments, missing data, a non-finite loss); it is recorded in
# `failures.jsonl` and the run goes on.
POINT_ERRORS = (ValueError, TypeError, FileNotFoundError, FloatingPointError,
                np.linalg.LinAlgError)
COLUMNS = ("method", "size", "seed", "accuracy", "eval_loss", "trainable_params",
           "adapter_params", "head_params", "step_ms", "step_cpu_ms", "train_s", "lr")
FULL_FT = methods_cfg.FULL_FT


def sizes_of(config, method: str) -> tuple:
  """The size knob values of `method`: `config.ranks`, or (0,) for a method without one."""
  if method in methods_cfg.NO_RANK or method == FULL_FT:
    return (0,)
  return tuple(config.ranks)


def run_config(config, method: str, size: int, seed: int) -> ml_collections.ConfigDict:
  """The trainer config of one point: the quickstart task at this reproduction's scale."""
  c = quickstart.get_config(f"seed={seed},steps={config.steps}")
  c.model.name = config.model
  c.model.pretrained = config.pretrained
  c.dataset.max_eval_examples = config.max_eval_examples
  c.dataset.max_train_examples = config.max_train_examples
  c.dataset.seq_len = config.seq_len
  c.batch_size = config.batch_size
  c.eval_batch_size = config.eval_batch_size
  c.calib_batches = config.calib_batches
  c.baseline = False
  c.export_peft = False
  c.head = ".*" if method == FULL_FT else config.head
  adapter_method = "none" if method == FULL_FT else method
  c.adapter = common.adapter_config(adapter_method, rank=max(size, 1),
                                    targets=tuple(config.targets), total_steps=config.steps)
  c.optimizer.lr = config.lr.get(method, config.default_lr)
  c.optimizer.head_lr = config.head_lr
  c.optimizer.warmup_steps = config.warmup_steps
  c.optimizer.grad_clip = config.grad_clip
  return c


def full_ft_optimizer(ocfg, total_steps: int, encoder_lr: float) -> optax.GradientTransformation:
  """Full fine-tuning's optimizer: the trainer's (`optim.make_optimizer`), but the encoder's
  leaves (every "head" entry of the train state whose top-level name is not `head`) train at
  `encoder_lr`; the classification head keeps `head_lr`."""
  def one(lr):
    return optax.adamw(optim.make_schedule(ocfg, lr, total_steps), b1=ocfg.b1, b2=ocfg.b2,
                       weight_decay=ocfg.wd)

  def labels(tree):
    return {"adapter": jax.tree.map(lambda _: "encoder", tree["adapter"]),
            "head": {k: jax.tree.map(lambda _, k=k: "head" if k == "head" else "encoder", v)
                     for k, v in tree["head"].items()}}
  tx = optax.multi_transform({"encoder": one(encoder_lr), "head": one(ocfg.head_lr)}, labels)
  return optax.chain(optax.clip_by_global_norm(ocfg.grad_clip), tx) if ocfg.grad_clip > 0 else tx


@dataclasses.dataclass
class Compiled:
  """A point's seed-independent parts: adapter, optimizer and jitted steps (compiled once)."""
  adapter: Any
  tx: Any
  train_step: Any
  eval_step: Any


def build_compiled(config, method: str, rcfg, model, adapter) -> Compiled:
  """The optimizer and jitted steps of a point (`train.make_steps`)."""
  if method == FULL_FT:
    tx = full_ft_optimizer(rcfg.optimizer, rcfg.total_steps, config.full_ft_lr)
  else:
    tx = optim.make_optimizer(rcfg.optimizer, rcfg.total_steps)
  task = tasks.get_task(train.DEFAULT_TASK)
  train_step, eval_step = train.make_steps(adapter, model, task, tx)
  return Compiled(adapter, tx, train_step, eval_step)


def _cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def run_point(config, method: str, size: int, seed: int, cache: dict) -> dict:
  """Trains one (method, size, seed) point; returns its CSV row. `cache` holds the compiled
  parts per (method, size), made by the first seed and reused by the others."""
  rcfg = run_config(config, method, size, seed)
  train.check_config(rcfg)
  k_model, k_adapter, rng_loop = train.run_keys(seed)
  model, data = train.make_classifier_and_data(rcfg, k_model)
  adapter = cache[(method, size)].adapter if (method, size) in cache else None
  made, base, ad_state, head = train.init_adapter(rcfg, model, data, k_adapter)
  adapter = adapter or made
  counts = train.param_counts(rcfg.adapter.method, ad_state, head)
  model.params = None   # the steps keep only `model.apply`
  if (method, size) not in cache:
    cache[(method, size)] = build_compiled(config, method, rcfg, model, adapter)
  comp = cache[(method, size)]
  state = steps.init_train_state(ad_state, comp.tx, head=head, rng=rng_loop)
  del ad_state, head
  wall, cpu = [], []
  t0 = time.perf_counter()
  for _ in range(rcfg.total_steps):
    batch = next(data.train_iter)
    c0, w0 = _cpu_seconds(), time.perf_counter()
    state, m = comp.train_step(state, base, batch)
    loss = float(jax.device_get(m["loss"]))
    wall.append(time.perf_counter() - w0)
    cpu.append(_cpu_seconds() - c0)
    if not np.isfinite(loss):
      raise FloatingPointError(f"{method} size {size} seed {seed}: loss {loss} at step "
                               f"{len(wall)}")
  train_s = time.perf_counter() - t0
  ev = evaluate(comp.eval_step, state, base, data, rcfg.eval_batch_size)
  skip = min(config.timing_skip, len(wall) - 1)
  return {"method": method, "size": size, "seed": seed, "accuracy": ev["accuracy"],
          "eval_loss": ev["eval_loss"], "trainable_params": counts["trainable_params"],
          "adapter_params": counts["adapter_params"], "head_params": counts["head_params"],
          "step_ms": 1e3 * float(np.median(wall[skip:])),
          "step_cpu_ms": 1e3 * float(np.median(cpu[skip:])), "train_s": train_s,
          "lr": rcfg.optimizer.lr}


def evaluate(eval_step, state, base, data, batch_size: int) -> dict:
  """The classification task's summary (`accuracy`, `eval_loss`) over the eval split."""
  task = tasks.get_task(train.DEFAULT_TASK)
  totals = {}
  for batch in data.fixed_batches(data.eval_source, batch_size):
    totals = tasks.sum_metrics(totals, jax.device_get(eval_step(state, base, batch)))
  return {k: float(v) for k, v in task.summarize(totals).items()}


# ---------------------------------------------------------------------------------------------
# CSV (incremental, resumable), summary and claims, plot.
# ---------------------------------------------------------------------------------------------

def read_rows(path: str) -> list[dict]:
  """Rows of `methods.csv` (numbers parsed, one per method, size and seed), [] when absent."""
  if not os.path.exists(path):
    return []
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  ints = ("size", "seed", "trainable_params", "adapter_params", "head_params")
  out = {}
  for r in rows:   # the first row of a (method, size, seed) counts (merged CSVs may repeat one)
    r = {k: (v if k == "method" else int(v) if k in ints else float(v)) for k, v in r.items()}
    out.setdefault((r["method"], r["size"], r["seed"]), r)
  return list(out.values())


def append_row(path: str, row: dict):
  """Appends `row` to the CSV (header first if the file is new), flushed at once."""
  new = not os.path.exists(path)
  with open(path, "a", newline="") as f:
    w = csv.DictWriter(f, fieldnames=COLUMNS)
    if new:
      w.writeheader()
    w.writerow({k: row[k] for k in COLUMNS})


def points(config) -> list[tuple[str, int, int]]:
  """(method, size, seed) of every run, seed-major."""
  return [(m, s, seed) for seed in config.seeds for m in config.methods
          for s in sizes_of(config, m)]


def aggregate(rows: list[dict]) -> dict:
  """{(method, size): stats over its seeds}: params, acc mean / std / min / max, step times.

  `tuned_params` are the trainable parameters besides the classification head (whose size is the
  smallest `head_params` of the rows: full fine-tuning counts its whole model as head), the count
  the papers' parameter claims are about."""
  head_size = min((r["head_params"] for r in rows), default=0)
  groups = {}
  for r in rows:
    groups.setdefault((r["method"], r["size"]), []).append(r)
  out = {}
  for key, rs in groups.items():
    acc = np.array([r["accuracy"] for r in rs])
    out[key] = {"method": key[0], "size": key[1], "seeds": len(rs),
                "trainable_params": rs[0]["trainable_params"],
                "adapter_params": rs[0]["adapter_params"],
                "tuned_params": rs[0]["trainable_params"] - head_size,
                "acc_mean": float(acc.mean()), "acc_std": float(acc.std(ddof=1)) if len(rs) > 1
                else 0.0, "acc_min": float(acc.min()), "acc_max": float(acc.max()),
                "step_ms": float(np.median([r["step_ms"] for r in rs])),
                "step_cpu_ms": float(np.median([r["step_cpu_ms"] for r in rs]))}
  return out


def _reference(stats: dict, ref: str, size: int) -> Optional[dict]:
  """The reference point of a claim: `ref@R` at rank R, a rank-less `ref` as is, else `ref` at
  `size`."""
  name, _, rank = ref.partition("@")
  if rank:
    return stats.get((name, int(rank)))
  return stats.get((name, 0)) or stats.get((name, size))


def seed_std(stats: dict) -> Optional[float]:
  """The pooled seed-to-seed standard deviation of accuracy (root mean variance over the points
  with at least two seeds), or None when no point has two."""
  var = [s["acc_std"] ** 2 for s in stats.values() if s["seeds"] > 1]
  return float(np.sqrt(np.mean(var))) if var else None


def verdict(config, method: str, size: int, stats: dict,
            noise: Optional[float] = None) -> Optional[dict]:
  """The claim of `method` checked at `size` (`methods_cfg.CLAIMS`), or None without a claim or
  a measured reference.

  `noise` is the seed-to-seed accuracy std (`seed_std`); a difference within two standard errors
  of the difference of the two means, 2·noise·sqrt(1/n + 1/n_ref), of the claim's line is
  "inconclusive (within seed noise)" rather than a verdict either way."""
  if method not in methods_cfg.CLAIMS or (method, size) not in stats:
    return None
  claim, kind, ref, threshold = methods_cfg.CLAIMS[method]
  me, other = stats[(method, size)], _reference(stats, ref, size)
  if other is None:
    return {"claim": claim, "verdict": f"no measured reference ({ref})"}
  margin = 0.0 if noise is None else 200 * noise * np.sqrt(1 / me["seeds"] + 1 / other["seeds"])
  d_pts = 100 * (me["acc_mean"] - other["acc_mean"])
  ratio = other["tuned_params"] / max(me["tuned_params"], 1)
  ref_name = f"{other['method']}" + (f" r{other['size']}" if other["size"] else "")
  # How far the measured figure is past the claim's line (positive: on the claim's side), points.
  past = {"beats": d_pts, "comparable": d_pts + config.comparable_pts,
          "comparable_fewer": d_pts + config.comparable_pts,
          "fraction": 100 * (me["acc_mean"] - threshold * other["acc_mean"])}[kind]
  if kind == "comparable_fewer" and ratio <= threshold:
    result = "not at this scale"
  elif (past > margin) if kind == "beats" else (past >= 0):
    result = "reproduced"
  elif past < -margin:
    result = "not at this scale"
  else:
    result = "inconclusive (within seed noise)"
  figure = (f"{d_pts:+.1f} pts vs {ref_name}, {ratio:.3g}x fewer tuned params"
            if kind == "comparable_fewer" else
            f"{me['acc_mean'] / other['acc_mean']:.1%} of {ref_name}'s accuracy"
            if kind == "fraction" else f"{d_pts:+.1f} pts vs {ref_name}")
  if margin:
    figure += f" (noise ±{margin:.1f} pts)"
  return {"claim": claim, "reference": ref_name, "figure": figure, "verdict": result,
          "margin_pts": margin}


def summarize(config, rows: list[dict]) -> dict:
  """The summary JSON: per (method, size) stats with the claim's verdict, and the run's scale."""
  stats = aggregate(rows)
  noise = seed_std(stats)
  entries = []
  for (method, size), s in sorted(stats.items(), key=lambda kv: (kv[1]["trainable_params"])):
    entries.append({**s, "claim": verdict(config, method, size, stats, noise)})
  return {"points": entries, "seed_std": noise, "excluded": dict(methods_cfg.EXCLUDED),
          "runs": len(rows), "expected_runs": len(points(config))}


def plot(path: str, stats: dict):
  """Accuracy (mean, min-max over seeds) against trainable parameters (log x), one marker per
  method; sizes of a method are joined by a line."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(8, 5.2))
  by_method = {}
  for s in stats.values():
    by_method.setdefault(s["method"], []).append(s)
  markers = "osD^v<>pPhX*"
  for i, (method, ss) in enumerate(sorted(by_method.items())):
    ss.sort(key=lambda s: s["trainable_params"])
    x = [s["trainable_params"] for s in ss]
    y = [s["acc_mean"] for s in ss]
    err = [[s["acc_mean"] - s["acc_min"] for s in ss], [s["acc_max"] - s["acc_mean"] for s in ss]]
    ax.errorbar(x, y, yerr=err, marker=markers[i % len(markers)], capsize=3, lw=1,
                label=method)
  ax.set_xscale("log")
  ax.set(xlabel="trainable parameters (adapter + head)", ylabel="validation accuracy",
         title="MiniLM on WordNet supersenses: mean over seeds, bars min-max")
  ax.title.set_fontsize(10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def claim(workdir: str, method: str, size: int, seed: int) -> bool:
  """Claims a point for this process (a file created exclusively in `workdir/claims`); False
  when another worker already has it."""
  path = os.path.join(workdir, "claims", f"{method}_{size}_{seed}")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  try:
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    return True
  except FileExistsError:
    return False


def run(config, workdir: str, log=print, workers: bool = False) -> dict:
  """Runs every missing point into `workdir/methods.csv`, then writes the summary and the PNG.
  Returns the summary.

  With `workers`, several processes may share `workdir`: each takes the next point no other has
  claimed (`claim`), so they work through the grid in order together."""
  os.makedirs(workdir, exist_ok=True)
  csv_path = os.path.join(workdir, CSV_NAME)
  cache = {}
  for method, size, seed in points(config):
    done = {(r["method"], r["size"], r["seed"]) for r in read_rows(csv_path)}
    if (method, size, seed) in done or (workers and not claim(workdir, method, size, seed)):
      continue
    t0 = time.perf_counter()
    try:
      row = run_point(config, method, size, seed, cache)
    except POINT_ERRORS as e:   # one failing method must not stop the others; reported at the end
      log(f"FAILED {method} size {size} seed {seed}: {e!r}")
      with open(os.path.join(workdir, FAILURES_NAME), "a") as f:
        f.write(json.dumps({"method": method, "size": size, "seed": seed,
                            "error": repr(e)[:500]}) + "\n")
      continue
    append_row(csv_path, row)
    log(f"{method} size {size} seed {seed}: acc {row['accuracy']:.4f}, params "
        f"{row['trainable_params']:,}, step {row['step_ms']:.0f} ms (cpu {row['step_cpu_ms']:.0f}"
        f" ms), point {time.perf_counter() - t0:.0f} s")
  return write_outputs(config, workdir)


def write_outputs(config, workdir: str) -> dict:
  """summary.json and methods.png from the CSV's rows."""
  rows = read_rows(os.path.join(workdir, CSV_NAME))
  summary = summarize(config, rows)
  with open(os.path.join(workdir, SUMMARY_NAME), "w") as f:
    json.dump({"config": config.to_dict(), **summary}, f, indent=1)
  plot(os.path.join(workdir, PNG_NAME), aggregate(rows))
  return summary


def size_label(method: str, size: int) -> str:
  """How a point's size reads in the table: "r8", or the method's fixed shape."""
  fixed = {"none": "head only", FULL_FT: "all weights", "krona": "balanced factors",
           "diffusekrona": "a1=64, a2=8"}
  return fixed.get(method, f"r{size}")


def markdown_table(summary: dict) -> str:
  """The results table (method | size | params | acc | step ms | claim | verdict), rows by
  trainable parameters; a claim is written on its method's first row only."""
  lines = ["| method | size | trainable params (tuned besides the head) | accuracy mean ± std "
           "(seeds) | step ms (CPU ms) | paper claim | our figure: verdict |",
           "|---|---|---:|---|---:|---|---|"]
  seen = set()
  for p in summary["points"]:
    c = p["claim"] or {}
    claim = "" if p["method"] in seen else c.get("claim", "")
    seen.add(p["method"])
    result = f"{c['figure']}: {c['verdict']}" if "figure" in c else c.get("verdict", "")
    lines.append(f"| {p['method']} | {size_label(p['method'], p['size'])} | "
                 f"{p['trainable_params']:,} ({p['tuned_params']:,}) | "
                 f"{p['acc_mean']:.4f} ± {p['acc_std']:.4f} ({p['seeds']}) | "
                 f"{p['step_ms']:.0f} ({p['step_cpu_ms']:.0f}) | {claim} | {result} |")
  return "\n".join(lines)


def main(argv):
  del argv
  summary = run(flags.FLAGS.config, flags.FLAGS.workdir, workers=flags.FLAGS.workers)
  print(markdown_table(summary))
  print(f"{summary['runs']} of {summary['expected_runs']} runs in {flags.FLAGS.workdir}")


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "configs/repro/methods.py[:arg]",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Output directory (CSV, JSON, PNG).")
  flags.DEFINE_bool("workers", False, "Share the workdir with other processes started alike: "
                    "each runs the next point no other has claimed.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
