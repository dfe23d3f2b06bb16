"""Self-Tuning Network on sklearn digits: input-noise std and hidden dropout, against random and grid
search.

Run: ``python -m experiments.stn_digits [--plot schedule.png]`` (CPU, about a minute).

Model: a 64-64-10 ReLU MLP; training adds Gaussian noise of std ``noise`` to the standardised
inputs and drops hidden units with rate ``dropout``; validation and test are clean. Splits (fixed
permutation): 1000 train, 397 validation, 400 test images.

* STN: ``--warmup`` train steps, then ``--cycles`` cycles of 2 train steps (per-example perturbed
  hyperparameters) and 1 hyper step (Adam on the validation loss); the final model is the best
  response at the final hyperparameters.
* Random / grid search at equal total training steps: ``--trials`` configurations (random: uniform
  noise in [0, 3], dropout in [0, 0.9]; grid: a square grid), each trained for total/trials steps,
  the best by validation loss reported. Also with the full budget per trial (trials x compute).
* Retraining a plain model for the full budget with the STN's schedule (the per-step mean of the
  values the STN trained with) and with its final values held fixed.
"""
from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

from lowrank_jax import ops
from lowrank_jax import stn
from lowrank_jax.models import mlp

HYPERPARAMETERS = (stn.Hyperparameter("noise", 0.0, 3.0), stn.Hyperparameter("dropout", 0.0, 0.9))
BATCH = 64
LR = 3e-3


def load():
  x, y = load_digits(return_X_y=True)
  x = ((x - x.mean(0)) / (x.std(0) + 1e-6)).astype(np.float32)
  perm = np.random.default_rng(0).permutation(len(x))
  parts = np.split(perm, [1000, 1397])
  return [(jnp.asarray(x[p]), jnp.asarray(y[p])) for p in parts]


def forward(params, x, values=None, key=None):
  """Logits; with per-example ``values`` (B, 2) = (noise std, dropout rate) and a key, the
  training-time noise and dropout are applied."""
  layer = lambda p, h: ops.dense(h, p["kernel"]) + p["bias"]
  if values is not None:
    k_noise, k_drop = jax.random.split(key)
    x = x + values[:, :1] * jax.random.normal(k_noise, x.shape)
  h = jax.nn.relu(layer(params["dense_0"], x))
  if values is not None:
    rate = values[:, 1:]
    keep = jax.random.uniform(k_drop, h.shape) >= rate
    h = jnp.where(keep, h / (1.0 - rate), 0.0)
  return layer(params["dense_1"], h)


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def evaluate(params, data):
  x, y = data
  logits = forward(params, x)
  return float(cross_entropy(logits, y)), float(jnp.mean(jnp.argmax(logits, -1) == y))


def batches(data, steps, seed):
  """(steps, BATCH) examples drawn with replacement, stacked on a leading step axis."""
  idx = jax.random.randint(jax.random.key(seed), (steps, BATCH), 0, data[0].shape[0])
  return data[0][idx], data[1][idx]


@jax.jit
def _train_plain(train, schedule, seed):
  opt = optax.adam(LR)
  params = mlp.init(jax.random.key(0), mlp.MLPConfig(features=(64, 64, 10)))
  xs, ys = batches(train, schedule.shape[0], seed)

  def step(carry, inputs):
    p, o = carry
    xb, yb, values, key = inputs
    vals = jnp.broadcast_to(values, (xb.shape[0], 2))
    g = jax.grad(lambda q: cross_entropy(forward(q, xb, vals, key), yb))(p)
    u, o = opt.update(g, o, p)
    return (optax.apply_updates(p, u), o), None

  keys = jax.random.split(jax.random.key(seed), schedule.shape[0])
  (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), (xs, ys, schedule, keys))
  return params


def train_plain(train, schedule, seed=0):
  """A plain MLP trained for len(schedule) steps; step t uses the (noise, dropout) schedule[t]."""
  schedule = jnp.asarray(schedule, jnp.float32)
  return _train_plain(train, schedule, seed)


def search(name, configs, steps, train, val, test):
  """Trains one plain model per config for `steps` steps; returns the row of the best by val."""
  best = None
  for i, c in enumerate(configs):
    params = train_plain(train, np.tile(c, (steps, 1)), seed=i + 1)
    v = evaluate(params, val)
    if best is None or v[0] < best[1][0]:
      best = (c, v, evaluate(params, test))
  c, v, t = best
  return (f"{name} ({len(configs)} x {steps} steps)", c, v, t)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--warmup", type=int, default=200)
  ap.add_argument("--cycles", type=int, default=400)
  ap.add_argument("--trials", type=int, default=9, help="random/grid search configurations")
  ap.add_argument("--init", type=float, nargs=2, default=(1.5, 0.5), help="noise, dropout")
  ap.add_argument("--plot", default="", help="if set, save the hyperparameter schedule here")
  args = ap.parse_args()
  train, val, test = load()
  total = args.warmup + 2 * args.cycles

  cfg = mlp.MLPConfig(features=(64, 64, 10))
  tuner = stn.STN(
      HYPERPARAMETERS,
      train_loss=lambda p, values, batch, key: cross_entropy(forward(p, batch[0], values, key),
                                                             batch[1]),
      val_loss=lambda p, batch: cross_entropy(forward(p, batch[0]), batch[1]),
      train_optimizer=optax.adam(LR), hyper_optimizer=optax.adam(3e-3))
  state = stn.init(tuner, stn.wrap(mlp.init(jax.random.key(0), cfg), jax.random.key(1), 2),
                   list(args.init))
  state, _ = stn.train_phase(tuner, state, batches(train, args.warmup, 0), jax.random.key(2))
  schedule = [np.tile(args.init, (args.warmup, 1))]
  history = []
  for c in range(args.cycles):
    z = np.asarray(tuner.values(state.hyper))
    schedule.append(np.tile(z, (2, 1)))
    history.append(z)
    val_batch = batches(val, 1, 10_000 + c)
    state, _ = stn.cycle(tuner, state, batches(train, 2, c + 1), val_batch, jax.random.key(c + 3))
  final = np.asarray(tuner.values(state.hyper))
  history = np.array(history + [final])
  best_response = stn.fix(state.params, jnp.zeros(2))

  rows = [("STN (best response at final lam)", final, evaluate(best_response, val),
           evaluate(best_response, test))]
  rng = np.random.default_rng(0)
  random_configs = np.stack([rng.uniform(0, 3, args.trials), rng.uniform(0, 0.9, args.trials)], 1)
  side = int(math.isqrt(args.trials))
  grid_configs = np.array([(a, b) for a in np.linspace(0, 3, side)
                           for b in np.linspace(0, 0.9, side)])
  for name, configs in (("random search", random_configs), ("grid search", grid_configs)):
    rows.append(search(name, configs, total // len(configs), train, val, test))
    rows.append(search(name, configs, total, train, val, test))
  for name, sched in (("retrain: STN schedule", np.concatenate(schedule)),
                      ("retrain: STN final values fixed", np.tile(final, (total, 1)))):
    params = train_plain(train, sched, seed=99)
    rows.append((f"{name} ({total} steps)", final, evaluate(params, val), evaluate(params, test)))

  print(f"digits MLP 64-64-10; STN: {args.warmup} warm-up steps + {args.cycles} cycles x (2 train "
        f"+ 1 hyper) = {total} training steps; start noise={args.init[0]}, dropout={args.init[1]}")
  print("schedule (noise, dropout) every 10% of the cycles:")
  for i in np.linspace(0, args.cycles, 11).astype(int):
    print(f"  cycle {i:4d}: noise {history[i, 0]:.3f}  dropout {history[i, 1]:.3f}")
  print(f"{'run':48s} {'noise':>6s} {'drop':>6s} {'val loss':>9s} {'val acc':>8s} "
        f"{'test loss':>9s} {'test acc':>8s}")
  for name, c, (vl, va), (tl, ta) in rows:
    print(f"{name:48s} {c[0]:6.3f} {c[1]:6.3f} {vl:9.4f} {va:8.4f} {tl:9.4f} {ta:8.4f}")
  if args.plot:
    plot_schedule(history, args.plot)


def plot_schedule(history, path, names=None, scale=None):
  """Plots each column of `history` (cycles, h) times `scale` (h,), labelled by `names`."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = names or [h.name for h in HYPERPARAMETERS]
  history = np.asarray(history) * (1.0 if scale is None else np.asarray(scale))
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for i, name in enumerate(names):
    ax.plot(history[:, i], label=name)
  ax.set_xlabel("STN cycle")
  ax.set_ylabel("hyperparameter value" if scale is None else "value / range")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  print(f"saved {path}")


if __name__ == "__main__":
  main()
