r"""Reproduces the intrinsic-dimension claims of Li et al. (ICLR 2018); see the config.

Run: ``python -m experiments.repro_intrinsic_dim --config configs/repro/intrinsic_dim.py
--workdir /tmp/intrinsic_dim`` (``:runlocal`` for a seconds-long check; ``:model=cnn`` for the
CNN on Fashion-MNIST; ``:projection=fastfood+dense+sparse`` to compare the projections). The
config's docstring gives the commands and the measured figures.

`run(config)` returns the rows and the summary; `write_outputs` writes ``intrinsic_dim.csv``,
``summary.json`` and ``intrinsic_dim.png`` to the workdir.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Callable

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import config_flags

import lowrank_jax as lj
from lowrank_jax import steps
from lowrank_jax.data import _sources
from lowrank_jax.models import cnn
from lowrank_jax.models import mlp

Batch = dict   # {"image": (N, ...) float32, "label": (N,) int}


def load_digits_split(num_train: int, seed: int):
  """(train, test) batches of sklearn digits, pixels scaled to [0, 1], a fixed permutation."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  images, labels = load_digits(return_X_y=True)
  perm = np.random.default_rng(seed).permutation(len(labels))
  images, labels = images[perm] / 16.0, labels[perm]
  split = lambda s: {"image": jnp.asarray(images[s], jnp.float32), "label": jnp.asarray(labels[s])}
  return split(slice(0, num_train)), split(slice(num_train, None))


def load_fashion_split(num_train: int, num_test: int, seed: int):
  """(train, test) batches of Fashion-MNIST, (N, 28, 28, 1), standardised with the training
  subset's pixel mean and std; the training subset is a fixed random `num_train` of the 60k."""
  xs, ys = _sources.fashion_mnist("train")
  xt, yt = _sources.fashion_mnist("test")
  if not 0 < num_train <= len(xs) or not 0 < num_test <= len(xt):
    raise ValueError(f"num_train must be in 1..{len(xs)} and num_test in 1..{len(xt)}, got "
                     f"{num_train} and {num_test}")
  pick = np.random.default_rng(seed).permutation(len(xs))[:num_train]
  scale = lambda x: x.reshape(-1, 28, 28, 1).astype(np.float32) / 255.0
  train_x = scale(xs[pick])
  mean, std = train_x.mean(), train_x.std()
  batch = lambda x, y: {"image": jnp.asarray((x - mean) / std), "label": jnp.asarray(y, jnp.int32)}
  return batch(train_x, ys[pick]), batch(scale(xt[:num_test]), yt[:num_test])


def load_data(config):
  """The (train, test) batches of `config.dataset`."""
  if config.dataset == "digits":
    return load_digits_split(config.num_train, config.seed)
  return load_fashion_split(config.num_train, config.num_test, config.seed)


def build_model(model: str, width: int, seed: int):
  """(params at the random init, classify(params, batch) -> logits, description) for `width`."""
  if model == "mlp":
    cfg = mlp.MLPConfig(features=(64, width, width, 10))
    return (mlp.init(jax.random.key(seed), cfg), lambda p, b: mlp.classify(p, cfg, b),
            f"MLP 64-{width}-{width}-10")
  cfg = cnn.CNNConfig(channels=(width, 2 * width))
  return (cnn.init(jax.random.key(seed), cfg), lambda p, b: cnn.classify(p, cfg, b),
          f"CNN channels ({width}, {2 * width})")


def train_params(adapter, params, classify: Callable, train: Batch, lr: float, num_steps: int,
                 batch_size: int, seed: int, head=None):
  """Trains `adapter` (and `head`, trained fully) with Adam; returns the final model params.

  `batch_size` 0 trains on the whole of `train` every step; otherwise each step draws
  `batch_size` examples without replacement within an epoch (a fixed numpy permutation stream
  seeded by `seed`, the same for every run of an experiment).
  """
  def task_loss(p, b, rng):
    del rng
    logits = classify(p, b)
    return optax.softmax_cross_entropy_with_integer_labels(logits, b["label"]).mean(), {}

  base, state = adapter.init(jax.random.key(0), params)
  optimizer = optax.adam(lr)
  train_step = steps.make_train_step(adapter, task_loss, optimizer)
  train_state = steps.init_train_state(state, optimizer, head=head)
  n = train["label"].shape[0]
  for idx in _batch_indices(n, batch_size, num_steps, seed):
    batch = train if idx is None else jax.tree.map(lambda x, i=idx: x[i], train)
    train_state, _ = train_step(train_state, base, batch)
  return steps.adapted_params(adapter, base, steps.adapter_state(train_state),
                              train_state["head"])


def _batch_indices(n: int, batch_size: int, num_steps: int, seed: int):
  """Yields per step None (full batch) or an index array of `batch_size` (epoch permutations)."""
  if batch_size <= 0 or batch_size >= n:
    yield from (None for _ in range(num_steps))
    return
  rng = np.random.default_rng(seed)
  order, pos = rng.permutation(n), 0
  for _ in range(num_steps):
    if pos + batch_size > n:
      order, pos = rng.permutation(n), 0
    yield jnp.asarray(order[pos:pos + batch_size])
    pos += batch_size


def accuracy(classify: Callable, params, test: Batch, eval_batch: int) -> float:
  """Test accuracy, in chunks of `eval_batch` examples."""
  fwd = jax.jit(lambda p, x: jnp.argmax(classify(p, {"image": x}), -1))
  n = test["label"].shape[0]
  correct = 0
  for s in range(0, n, eval_batch):
    pred = fwd(params, test["image"][s:s + eval_batch])
    correct += int(jnp.sum(pred == test["label"][s:s + eval_batch]))
  return correct / n


def check_config(config) -> dict:
  """{width: D}; raises a ValueError before any training on a d the Fastfood block can't hold."""
  sizes = {}
  for width in config.widths:
    params, _, _ = build_model(config.model, width, config.seed)
    sizes[width] = lj.count_params(params)
    block = 1 << max(0, (sizes[width] - 1).bit_length())
    if "fastfood" in config.projections and max(config.dims) > block:
      raise ValueError(f"config.dims: d = {max(config.dims)} exceeds the Fastfood block size "
                       f"{block} of width {width} (D = {sizes[width]}); valid d: 1..{block}")
  return sizes


def run(config, on_row: Callable[[dict], None] | None = None) -> dict:
  """Baseline and subspace accuracies per width and projection. Returns {"rows", "summary"}.

  `on_row(row)` is called as each row is measured (main appends it to ``rows.csv``, so a run
  stopped early keeps what it measured).
  """
  sizes = check_config(config)
  train, test = load_data(config)
  fit = lambda adapter, params, classify, lr, head=None: train_params(
      adapter, params, classify, train, lr, config.steps, config.batch_size, config.seed, head)
  rows = []
  for width in config.widths:
    params, classify, _ = build_model(config.model, width, config.seed)
    final = fit(lj.identity(), params, classify, config.baseline_lr, head=params)
    baseline = accuracy(classify, final, test, config.eval_batch)
    for projection in config.projections:
      for d in config.dims:
        adapter = lj.intrinsic_dimension(d, projection)
        acc = accuracy(classify, fit(adapter, params, classify, config.subspace_lr), test,
                       config.eval_batch)
        rows.append({"projection": projection, "width": width, "num_params": sizes[width],
                     "d": d, "accuracy": acc, "baseline_accuracy": baseline})
        print(f"{projection} w={width} d={d}: {acc:.4f} (baseline {baseline:.4f})", flush=True)
        if on_row is not None:
          on_row(rows[-1])
  return {"rows": rows, "summary": summarize(rows, config.threshold)}


def summarize(rows: list[dict], threshold: float) -> dict:
  """Baseline accuracy and D per width, and d_int90 per projection and width: the smallest d whose
  accuracy reaches `threshold` times the baseline's (None when no d of the grid does)."""
  summary = {"baseline_accuracy": {}, "num_params": {}, "d_int90": {}}
  for r in sorted(rows, key=lambda r: (r["width"], r["d"])):
    summary["baseline_accuracy"][r["width"]] = r["baseline_accuracy"]
    summary["num_params"][r["width"]] = r["num_params"]
    per_width = summary["d_int90"].setdefault(r["projection"], {})
    per_width.setdefault(r["width"], None)
    if per_width[r["width"]] is None and r["accuracy"] >= threshold * r["baseline_accuracy"]:
      per_width[r["width"]] = r["d"]
  return summary


def read_rows(workdirs: list[str]) -> list[dict]:
  """The rows of the runs in `workdirs` (e.g. one per width): each one's ``intrinsic_dim.csv``,
  or, for a run stopped before the end, its row-by-row ``rows.csv``."""
  types = {"projection": str, "width": int, "num_params": int, "d": int, "accuracy": float,
           "baseline_accuracy": float}
  rows = []
  for workdir in workdirs:
    path = os.path.join(workdir, "intrinsic_dim.csv")
    if not os.path.exists(path):
      path = os.path.join(workdir, "rows.csv")
    with open(path, newline="") as f:
      rows += [{k: types[k](v) for k, v in r.items()} for r in csv.DictReader(f)]
  return rows


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
  widths = config.widths
  fig, axes = plt.subplots(1, len(widths), figsize=(4.2 * len(widths) + 0.6, 4.0), sharey=True,
                           squeeze=False)
  for ax, width in zip(axes[0], widths):
    for projection in config.projections:
      rows = [r for r in result["rows"] if r["width"] == width and r["projection"] == projection]
      ax.semilogx([r["d"] for r in rows], [r["accuracy"] for r in rows], "o-", label=projection)
    baseline = result["summary"]["baseline_accuracy"][width]
    ax.axhline(baseline, color="k", lw=1, label="baseline")
    ax.axhline(config.threshold * baseline, color="k", ls=":", lw=1, label="90% of baseline")
    ax.set_xticks(config.dims, [str(d) for d in config.dims], minor=False)
    ax.set_xticks([], minor=True)
    ax.set(xlabel="subspace dimension d",
           title=f"{build_model(config.model, width, config.seed)[2]}, "
                 f"D = {result['summary']['num_params'][width]:,}")
    ax.title.set_fontsize(9)
  axes[0][0].set_ylabel(f"test accuracy ({config.dataset})")
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(png_path, dpi=110)
  plt.close(fig)
  return [csv_path, json_path, png_path]


def main(argv):
  del argv
  config = flags.FLAGS.config
  if flags.FLAGS.merge:
    rows = read_rows(flags.FLAGS.merge)
    result = {"rows": rows, "summary": summarize(rows, config.threshold)}
  else:
    os.makedirs(flags.FLAGS.workdir, exist_ok=True)
    partial = os.path.join(flags.FLAGS.workdir, "rows.csv")
    if os.path.exists(partial):
      os.remove(partial)

    def on_row(row):
      new = not os.path.exists(partial)
      with open(partial, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
          w.writeheader()
        w.writerow(row)

    result = run(config, on_row)
  for path in write_outputs(flags.FLAGS.workdir, config, result):
    print("wrote", path)
  print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
  # Flags are defined here, not at import, so that `run` can be imported next to other modules
  # that define `--config`.
  config_flags.DEFINE_config_file("config", None, "configs/repro/intrinsic_dim.py[:arg]",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Output directory (CSV, JSON, PNG).")
  flags.DEFINE_list("merge", None, "Workdirs of earlier runs (e.g. one per width) whose CSV rows "
                    "to combine into the outputs instead of training; the config names the "
                    "widths and projections to plot.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
