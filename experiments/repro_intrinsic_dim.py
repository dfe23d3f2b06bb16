r"""Reproduces the intrinsic-dimension claim of Li et al. (ICLR 2018) on digits; see the config.

Run: ``python -m experiments.repro_intrinsic_dim --config configs/repro/intrinsic_dim.py
--workdir /tmp/intrinsic_dim`` (``:runlocal`` for a seconds-long check).

`run(config)` returns the rows and the summary; `write_outputs` writes ``intrinsic_dim.csv``,
``summary.json`` and ``intrinsic_dim.png`` to the workdir.
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
import optax
from ml_collections import config_flags

import lowrank_jax as lj
from lowrank_jax import steps
from lowrank_jax.models import mlp


def load_digits_split(num_train: int, seed: int):
  """(train, test) batches of sklearn digits, pixels scaled to [0, 1], a fixed permutation."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  images, labels = load_digits(return_X_y=True)
  perm = np.random.default_rng(seed).permutation(len(labels))
  images, labels = images[perm] / 16.0, labels[perm]
  split = lambda s: {"image": jnp.asarray(images[s], jnp.float32), "label": jnp.asarray(labels[s])}
  return split(slice(0, num_train)), split(slice(num_train, None))


def train_accuracy(adapter, params, cfg, train, test, lr: float, num_steps: int,
                   head=None) -> float:
  """Trains `adapter` (and `head`, trained fully) with full-batch Adam; returns test accuracy."""
  def task_loss(p, b, rng):
    del rng
    logits = mlp.classify(p, cfg, b)
    return optax.softmax_cross_entropy_with_integer_labels(logits, b["label"]).mean(), {}

  base, state = adapter.init(jax.random.key(0), params)
  optimizer = optax.adam(lr)
  train_step = steps.make_train_step(adapter, task_loss, optimizer)
  train_state = steps.init_train_state(state, optimizer, head=head)
  for _ in range(num_steps):
    train_state, _ = train_step(train_state, base, train)
  final = steps.adapted_params(adapter, base, steps.adapter_state(train_state),
                               train_state["head"])
  return float(jnp.mean(jnp.argmax(mlp.classify(final, cfg, test), -1) == test["label"]))


def run(config) -> dict:
  """Baseline and subspace accuracies per width. Returns {"rows", "summary"}."""
  train, test = load_digits_split(config.num_train, config.seed)
  rows = []
  summary = {"baseline_accuracy": {}, "num_params": {}, "d_int90": {}}
  for width in config.widths:
    cfg = mlp.MLPConfig(features=(64, width, width, 10))
    params = mlp.init(jax.random.key(config.seed), cfg)
    baseline = train_accuracy(lj.identity(), params, cfg, train, test, config.baseline_lr,
                              config.steps, head=params)
    summary["baseline_accuracy"][width] = baseline
    summary["num_params"][width] = lj.count_params(params)
    d_int90 = None
    for d in config.dims:
      adapter = lj.intrinsic_dimension(d, config.projection)
      acc = train_accuracy(adapter, params, cfg, train, test, config.subspace_lr, config.steps)
      rows.append({"width": width, "num_params": lj.count_params(params), "d": d,
                   "accuracy": acc, "baseline_accuracy": baseline})
      if d_int90 is None and acc >= config.threshold * baseline:
        d_int90 = d
    summary["d_int90"][width] = d_int90
  return {"rows": rows, "summary": summary}


def write_outputs(workdir: str, config, result: dict) -> list[str]:
  """Writes the CSV, the summary JSON and the PNG; returns their paths."""
  os.makedirs(workdir, exist_ok=True)
  csv_path = os.path.join(workdir, "intrinsic_dim.csv")
  with open(csv_path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(result["rows"][0]))
    w.writeheader()
    w.writerows(result["rows"])
  json_path = os.path.join(workdir, "summary.json")
  with open(json_path, "w") as f:
    json.dump({"config": config.to_dict(), "summary": result["summary"]}, f, indent=1)
  png_path = os.path.join(workdir, "intrinsic_dim.png")
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for width in config.widths:
    rows = [r for r in result["rows"] if r["width"] == width]
    line, = ax.semilogx([r["d"] for r in rows], [r["accuracy"] for r in rows], "o-",
                        label=f"w = {width} (D = {rows[0]['num_params']:,})")
    ax.axhline(config.threshold * rows[0]["baseline_accuracy"], color=line.get_color(), ls=":",
               lw=1)
  ax.set(xlabel="subspace dimension d", ylabel="test accuracy",
         title=f"MLP 64-w-w-10 on digits, {config.projection} projection (dotted: 90% of "
               "baseline)")
  ax.title.set_fontsize(9)
  ax.legend()
  fig.tight_layout()
  fig.savefig(png_path, dpi=110)
  plt.close(fig)
  return [csv_path, json_path, png_path]


def main(argv):
  del argv
  config = flags.FLAGS.config
  result = run(config)
  for path in write_outputs(flags.FLAGS.workdir, config, result):
    print("wrote", path)
  print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
  # Flags are defined here, not at import, so that `run` can be imported next to other modules
  # that define `--config`.
  config_flags.DEFINE_config_file("config", None, "configs/repro/intrinsic_dim.py[:arg]",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Output directory (CSV, JSON, PNG).")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
