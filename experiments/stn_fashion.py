"""Self-Tuning Network on Fashion-MNIST: per-layer dropout, augmentation and weight decay, against
random and grid search at equal training steps.

Run: ``python -m experiments.stn_fashion --workdir /tmp/stn_fashion`` (CPU, minutes; the smaller
``--train 2000 --warmup 20 --cycles 20`` runs in seconds); ``--config configs/repro/stn.py`` takes
the reproduction's flags from that file.

Data: Fashion-MNIST from the Debian package; the first ``--train`` training images train, the
next ``--val`` validate (the hyper phase's loss), the first ``--test`` test images test. Pixels are
scaled to [0, 1] and standardised.

Model: conv 3x3x16 - avg-pool 2 - dropout_0 - conv 3x3x32 - avg-pool 2 - dropout_1 - dense 128 -
dropout_2 - dense 10 (ReLU). Six hyperparameters, all applied per example during training only:

* ``dropout_0``, ``dropout_1``, ``dropout_2`` in [0, 0.8]: per-layer dropout rates;
* ``shift`` in [0, 4]: random translation by up to ``round(shift)`` pixels per axis (zero fill);
* ``cutout`` in [0, 14]: a ``cutout x cutout`` square at a random centre is zeroed;
* ``weight_decay`` in [0, 1e-3]: ``wd * |phi|^2`` over all STN parameters, with the batch's
  mean ``wd``.

STN: ``--warmup`` train steps, then ``--cycles`` cycles of 2 train steps (hyperparameters perturbed
per example) and 1 hyper step (Adam on the validation loss - tau * entropy). The final model is
the best response at the final hyperparameters (`lowrank_jax.stn.fix`).

Baselines, each at the STN's total number of training steps (split evenly among the trials):
random search (``--trials`` configurations drawn uniformly from the ranges) and grid search (a 3 x 3
grid: all dropouts equal in {0, 0.25, 0.5} x augmentation strength a in {0, 0.5, 1} with
shift = 4a and cutout = 14a; weight decay 0). The best trial by validation loss is reported.
Then a plain model is retrained for the full budget with the STN's schedule (the values the STN
trained with, step by step), with the STN's final values fixed, and with the best search
configuration fixed.

Writes ``results.csv`` and ``schedule.png`` (the hyperparameter schedule) to ``--workdir``.

Measured (2-core CPU, ``--train 5000 --val 2000 --test 5000 --warmup 100 --cycles 200 --batch
64``, 500 training steps, 7 min)::

  run                                   val acc  test acc
  STN (best response at final values)   0.8295   0.8206
  random search (9 x 55 steps)          0.7130   0.7148
  grid search (9 x 55 steps)            0.7310   0.7184
  retrain: STN schedule                 0.8370   0.8338
  retrain: STN final values fixed       0.8415   0.8446
  retrain: best search values fixed     0.8440   0.8358

  final values: dropout 0.048 / 0.323 / 0.053, shift 0.27, cutout 1.71, weight decay 8.9e-5
"""
from __future__ import annotations

import argparse
import csv
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import common
from experiments import stn_digits
from lowrank_jax import ops
from lowrank_jax import stn
from lowrank_jax.data import _sources
from lowrank_jax.models import _layers as L

HYPERPARAMETERS = (
    stn.Hyperparameter("dropout_0", 0.0, 0.8),
    stn.Hyperparameter("dropout_1", 0.0, 0.8),
    stn.Hyperparameter("dropout_2", 0.0, 0.8),
    stn.Hyperparameter("shift", 0.0, 4.0),
    stn.Hyperparameter("cutout", 0.0, 14.0),
    stn.Hyperparameter("weight_decay", 0.0, 1e-3),
)
LOW = np.array([h.low for h in HYPERPARAMETERS])
HIGH = np.array([h.high for h in HYPERPARAMETERS])
SIDE = 28
MAX_SHIFT = 4


def load(num_train: int, num_val: int, num_test: int):
  """[(x, y) train, validation, test]: x (N, 28, 28, 1) standardised float32, y int32."""
  xs, ys = _sources.fashion_mnist("train")
  xt, yt = _sources.fashion_mnist("test")
  if num_train + num_val > len(xs) or num_test > len(xt):
    raise ValueError(f"--train + --val must be <= {len(xs)} and --test <= {len(xt)}")
  scale = lambda x: x.reshape(-1, SIDE, SIDE, 1).astype(np.float32) / 255.0
  mean, std = scale(xs[:num_train]).mean(), scale(xs[:num_train]).std()
  norm = lambda x: jnp.asarray((scale(x) - mean) / std)
  parts = [(xs[:num_train], ys[:num_train]), (xs[num_train:num_train + num_val],
                                               ys[num_train:num_train + num_val]),
           (xt[:num_test], yt[:num_test])]
  return [(norm(x), jnp.asarray(y, jnp.int32)) for x, y in parts]


def init(key):
  k = jax.random.split(key, 4)
  return {"conv_0": L.conv_init(k[0], (3, 3), 1, 16), "conv_1": L.conv_init(k[1], (3, 3), 16, 32),
          "dense_0": L.dense_init(k[2], 7 * 7 * 32, 128), "dense_1": L.dense_init(k[3], 128, 10)}


def _dropout(x, rate, key):
  """Inverted dropout with a per-example rate (B,)."""
  rate = rate.reshape((-1,) + (1,) * (x.ndim - 1))
  keep = jax.random.uniform(key, x.shape) >= rate
  return jnp.where(keep, x / (1.0 - rate), 0.0)


def augment(x, shift, cutout, key):
  """Per-example random translation by up to round(shift) pixels and a zeroed cutout square."""
  k_dx, k_dy, k_cx, k_cy = jax.random.split(key, 4)
  b = x.shape[0]
  limit = jnp.round(shift)
  offset = lambda k: jnp.round(jax.random.uniform(k, (b,), minval=-1.0, maxval=1.0) * limit)
  dx, dy = offset(k_dx).astype(jnp.int32), offset(k_dy).astype(jnp.int32)
  padded = jnp.pad(x, ((0, 0), (MAX_SHIFT, MAX_SHIFT), (MAX_SHIFT, MAX_SHIFT), (0, 0)))
  crop = lambda img, i, j: jax.lax.dynamic_slice(img, (i, j, 0), (SIDE, SIDE, 1))
  x = jax.vmap(crop)(padded, MAX_SHIFT + dy, MAX_SHIFT + dx)
  cx = jax.random.uniform(k_cx, (b, 1, 1, 1), maxval=SIDE)
  cy = jax.random.uniform(k_cy, (b, 1, 1, 1), maxval=SIDE)
  grid = jnp.arange(SIDE, dtype=jnp.float32) + 0.5
  half = cutout.reshape(b, 1, 1, 1) / 2.0
  inside = ((jnp.abs(grid[None, :, None, None] - cy) < half)
            & (jnp.abs(grid[None, None, :, None] - cx) < half))
  return jnp.where(inside, 0.0, x)


def forward(params, x, values=None, key=None):
  """Logits; with per-example ``values`` (B, 6) and a key, the training-time augmentation and
  dropouts are applied."""
  train = values is not None
  if train:
    keys = jax.random.split(key, 4)
    x = augment(x, values[:, 3], values[:, 4], keys[3])
  pool = lambda h: jax.lax.reduce_window(h, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1),
                                         "VALID") / 4.0
  for i in range(2):
    x = pool(jax.nn.relu(ops.conv(x, params[f"conv_{i}"]["kernel"], padding="SAME")
                         + params[f"conv_{i}"]["bias"]))
    if train:
      x = _dropout(x, values[:, i], keys[i])
  x = x.reshape(x.shape[0], -1)
  x = jax.nn.relu(ops.dense(x, params["dense_0"]["kernel"]) + params["dense_0"]["bias"])
  if train:
    x = _dropout(x, values[:, 2], keys[2])
  return ops.dense(x, params["dense_1"]["kernel"]) + params["dense_1"]["bias"]


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train_loss(params, values, batch, key):
  weights = jax.tree.leaves(stn.with_hyperparameters(params, None))   # not the inputs z
  decay = jnp.mean(values[:, 5]) * sum(jnp.sum(w ** 2) for w in weights)
  return cross_entropy(forward(params, batch[0], values, key), batch[1]) + decay


def evaluate(params, data, chunk: int = 1000):
  """(loss, accuracy) over `data`, in chunks."""
  x, y = data
  logits = jnp.concatenate([_logits(params, x[i:i + chunk]) for i in range(0, len(x), chunk)])
  return (float(cross_entropy(logits, y)), float(jnp.mean(jnp.argmax(logits, -1) == y)))


@jax.jit
def _logits(params, x):
  return forward(params, x)


def make_train_plain(batch_size: int, lr: float):
  """A jitted `(train, schedule (T, 6), seed) -> params`: a plain model trained for T steps, step
  t with the hyperparameter values schedule[t] for every example."""

  @jax.jit
  def train_plain(train, schedule, seed):
    opt = optax.adam(lr)
    params = init(jax.random.key(0))
    idx = jax.random.randint(jax.random.key(seed), (schedule.shape[0], batch_size), 0,
                             train[0].shape[0])

    def step(carry, inputs):
      p, o = carry
      i, values, key = inputs
      vals = jnp.broadcast_to(values, (batch_size, values.shape[-1]))
      g = jax.grad(train_loss)(p, vals, (train[0][i], train[1][i]), key)
      u, o = opt.update(g, o, p)
      return (optax.apply_updates(p, u), o), None

    keys = jax.random.split(jax.random.key(seed + 1), schedule.shape[0])
    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), (idx, schedule, keys))
    return params

  return lambda train, schedule, seed: train_plain(train, jnp.asarray(schedule, jnp.float32),
                                                   seed)


def search_configs(trials: int, seed: int):
  """(random configurations, grid configurations), each (n, 6)."""
  rng = np.random.default_rng(seed)
  random = LOW + (HIGH - LOW) * rng.uniform(size=(trials, len(HYPERPARAMETERS)))
  grid = np.array([[d, d, d, 4.0 * a, 14.0 * a, 0.0] for d in (0.0, 0.25, 0.5)
                   for a in (0.0, 0.5, 1.0)])
  return random, grid


def run_stn(args, data, batches):
  """Trains the STN; returns (best-response params, final values, per-step schedule, history)."""
  train, val, _ = data
  tuner = stn.STN(
      HYPERPARAMETERS, train_loss=train_loss,
      val_loss=lambda p, batch: cross_entropy(forward(p, batch[0]), batch[1]),
      train_optimizer=optax.adam(args.lr), hyper_optimizer=optax.adam(args.hyper_lr),
      entropy_weight=args.tau)
  init_values = list(args.init)
  state = stn.init(tuner, stn.wrap(init(jax.random.key(0)), jax.random.key(1),
                                   len(HYPERPARAMETERS)), init_values)
  state, _ = stn.train_phase(tuner, state, batches(train, args.warmup, 0), jax.random.key(2))
  schedule, history = [np.tile(init_values, (args.warmup, 1))], []
  for c in range(args.cycles):
    values = np.asarray(tuner.values(state.hyper))
    schedule.append(np.tile(values, (2, 1)))
    history.append(values)
    state, _ = stn.cycle(tuner, state, batches(train, 2, c + 1), batches(val, 1, 10_000 + c),
                         jax.random.key(c + 3))
  final = np.asarray(tuner.values(state.hyper))
  history.append(final)
  return stn.fix(state.params, jnp.zeros(len(HYPERPARAMETERS))), final, np.concatenate(
      schedule), np.array(history)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--train", type=int, default=10_000)
  ap.add_argument("--val", type=int, default=5_000)
  ap.add_argument("--test", type=int, default=10_000)
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--lr", type=float, default=1e-3)
  ap.add_argument("--hyper_lr", type=float, default=3e-2)
  ap.add_argument("--tau", type=float, default=1e-3, help="entropy weight")
  ap.add_argument("--warmup", type=int, default=300)
  ap.add_argument("--cycles", type=int, default=600)
  ap.add_argument("--trials", type=int, default=9, help="random-search configurations")
  ap.add_argument("--init", type=float, nargs=6, default=(0.2, 0.2, 0.2, 1.0, 4.0, 1e-4),
                  help="initial dropout_0 dropout_1 dropout_2 shift cutout weight_decay")
  args = common.parse_flags_with_config(ap, None, argv)   # --config configs/repro/stn.py
  os.makedirs(args.workdir, exist_ok=True)
  data = load(args.train, args.val, args.test)
  train, val, test = data
  total = args.warmup + 2 * args.cycles

  def batches(split, steps, seed):
    idx = jax.random.randint(jax.random.key(seed), (steps, args.batch), 0, split[0].shape[0])
    return split[0][idx], split[1][idx]

  best_response, final, schedule, history = run_stn(args, data, batches)
  rows = [("STN (best response at the final values)", final, evaluate(best_response, val),
           evaluate(best_response, test))]
  train_plain = make_train_plain(args.batch, args.lr)
  random_configs, grid_configs = search_configs(args.trials, seed=0)
  best_search = None
  for name, configs in (("random search", random_configs), ("grid search", grid_configs)):
    steps = total // len(configs)
    trials = [(c, train_plain(train, np.tile(c, (steps, 1)), i + 1))
              for i, c in enumerate(configs)]
    scored = [(c, evaluate(p, val), p) for c, p in trials]
    c, v, p = min(scored, key=lambda t: t[1][0])
    rows.append((f"{name} ({len(configs)} x {steps} steps)", c, v, evaluate(p, test)))
    if best_search is None or v[0] < best_search[1][0]:
      best_search = (c, v)
  for name, sched in (("retrain: STN schedule", schedule),
                      ("retrain: STN final values fixed", np.tile(final, (total, 1))),
                      ("retrain: best search values fixed", np.tile(best_search[0], (total, 1)))):
    params = train_plain(train, sched, 99)
    rows.append((f"{name} ({total} steps)", sched[-1], evaluate(params, val),
                 evaluate(params, test)))

  names = [h.name for h in HYPERPARAMETERS]
  print(f"Fashion-MNIST CNN, {args.train} train / {args.val} val / {args.test} test images; STN: "
        f"{args.warmup} warm-up steps + {args.cycles} cycles x (2 train + 1 hyper) = {total} "
        f"training steps of batch {args.batch}")
  print("schedule every 20% of the cycles: " + " ".join(names))
  for i in np.linspace(0, args.cycles, 6).astype(int):
    print(f"  cycle {i:4d}: " + " ".join(f"{v:.4g}" for v in history[i]))
  header = ["run", *names, "val_loss", "val_acc", "test_loss", "test_acc"]
  print(f"{'run':44s} " + " ".join(f"{n[:7]:>7s}" for n in names[:5]) + "      wd"
        + f" {'val loss':>9s} {'val acc':>8s} {'test loss':>9s} {'test acc':>8s}")
  with open(os.path.join(args.workdir, "results.csv"), "w", newline="") as f:
    out = csv.writer(f)
    out.writerow(header)
    for name, c, (vl, va), (tl, ta) in rows:
      print(f"{name:44s} " + " ".join(f"{v:7.3f}" for v in c[:5]) + f" {c[5]:7.1e}"
            + f" {vl:9.4f} {va:8.4f} {tl:9.4f} {ta:8.4f}")
      out.writerow([name, *[f"{v:.6g}" for v in c], vl, va, tl, ta])
  stn_digits.plot_schedule(history, os.path.join(args.workdir, "schedule.png"),
                           names=[f"{n} / {h:g}" for n, h in zip(names, HIGH)],
                           scale=1.0 / HIGH)


if __name__ == "__main__":
  main()
