r"""Bilevel hyperparameter tuning at equal compute: IFT and unrolled hypergradients vs grid and
random search (weight decay on digits, float64; weight decay and LoRA scale of a LoRA run on
MiniLM, float32); see `configs/repro/bilevel.py` for the setup and the compute unit.

Run: ``python -m experiments.repro_bilevel --config configs/repro/bilevel.py
--workdir /tmp/repro_bilevel`` (both parts; the figures below come from ``:parts=digits`` and
``:parts=lora`` run separately; ``:runlocal`` for a seconds-long digits check).

`run(config)` returns, per part of ``config.parts``, the candidate rows (every model a method
produced, with the compute spent so far and its validation and test loss / accuracy), the curves
(best validation loss found against compute) and the summary; `write_outputs` writes
``bilevel.csv``, ``bilevel_curve.csv``, ``bilevel.png`` (digits), ``bilevel_lora.csv``,
``bilevel_lora.png`` (LoRA) and ``summary.json`` to the workdir.

Measured 2026-12-02 on the shared 2-core AMD EPYC CPU (load ~35), Python 3.11.7, jax 0.10.2,
numpy 2.4.6, optax 0.2.8. ``:parts=digits`` (1 min 16 s CPU, 9 min 47 s wall), per seed 0 / 1 / 2:
the grid's best validation loss 0.2364 / 0.2358 / 0.1304 (test 0.1778 / 0.2055 / 0.1900); IFT
(shared) 0.2349 / 0.2316 / 0.1296 (test 0.1748 / 0.2028 / 0.1883), reaching the grid's best
after 3,152 / 1,928 / 5,464 units of 32,000; unrolled (shared) 0.2349 / 0.2319 / 0.1302 (test
0.1751 / 0.2031 / 0.1888) after 3,001 / 1,842 / 6,722; random (shared) 0.2446 / 0.2361 / 0.1304;
per-feature: random 0.2846 / 0.2873 / 0.1843, IFT 0.2187 / 0.1708 / 0.1023 (test 0.3050 /
0.2288 / 0.2635), unrolled 0.2340 / 0.1748 / 0.1004 (test 0.1978 / 0.2519 / 0.2516). Timed unit
ratios: HVP 1.16, unrolled step 3.44 inner steps (charged 2 and 3). ``:parts=lora`` (seed 0; 3 min
7 s CPU, 21 min 30 s wall): best validation loss / test loss / test accuracy of the selected model:
grid 1.9885 / 2.1642 / 0.451, random 2.0463 / 2.2492 / 0.419, IFT 1.9925 / 2.0935 / 0.461 (reached
at 1,152 of 1,800 units; Neumann adjoint relative residual 0.16 to 0.69). ``lora_seed=1`` (2 min
56 s CPU, 15 min 8 s wall): grid 1.9385 / 1.9711 / 0.503, random 1.9857 / 2.0512 / 0.477, IFT
1.9028 / 1.9710 / 0.505 (at 1,392 units; residual 0.28 to 0.78).

The hypergradient loops are written here from `lowrank_jax.bilevel.ift_hypergradient` and
`lowrank_jax.bilevel.unrolled_hypergradient` rather than with `tune_hyperparameters`, because the
comparison needs every intermediate model (its validation and test loss) and the exact compute
of every outer step, and a search range to project onto.
"""
from __future__ import annotations

import csv
import functools
import json
import os
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import config_flags

from experiments import bilevel_digits as digits
from lowrank_jax import bilevel
from lowrank_jax.implicit import AdjointConfig

SEARCH = ("grid", "random", "random_pf")
HYPERGRADIENT = ("ift", "ift_pf", "unrolled", "unrolled_pf")


# ----------------------------------------------------------------------------------------------
# The compute unit.
# ----------------------------------------------------------------------------------------------


def cost_train(config, steps: int) -> float:
  """Inner training: one full-batch training gradient per (Nesterov) step."""
  return steps * config.cost.grad


def cost_ift(config, iterations: int) -> float:
  """One IFT outer step: the inner phase, the validation gradient, the gradient at the
  linearisation point, and ``iterations + 3`` Hessian-vector products (CG's initial and final
  residuals, its iterations, and the mixed ``d_lam d_w L_T`` product)."""
  return (cost_train(config, config.phase_steps) + 2 * config.cost.grad
          + (iterations + 3) * config.cost.hvp)


def cost_unrolled(config) -> float:
  """One unrolled outer step: each of the ``phase_steps`` steps forward (a gradient) and backward
  (a Hessian-vector-product equivalent, including the `jax.checkpoint` recompute), plus the
  validation gradient."""
  return config.phase_steps * (config.cost.grad + config.cost.hvp) + config.cost.grad


def search_points(config) -> int:
  """Grid / random-search points that fit the budget."""
  return int(config.budget // cost_train(config, config.train_steps))


def _check(config):
  unknown = sorted(set(config.methods) - set(SEARCH + HYPERGRADIENT))
  if unknown:
    raise ValueError(f"config.methods: unknown {unknown}; valid: {list(SEARCH + HYPERGRADIENT)}")
  if not 0 < config.lam_low < config.lam0 < config.lam_high:
    raise ValueError(f"config: need 0 < lam_low < lam0 < lam_high, got {config.lam_low}, "
                     f"{config.lam0}, {config.lam_high}")
  if search_points(config) < 1:
    raise ValueError(f"config.budget={config.budget} is below one search point "
                     f"(train_steps={config.train_steps})")
  first = cost_train(config, config.warmup_steps) + max(cost_ift(config, config.cg_maxiter),
                                                        cost_unrolled(config))
  if config.budget < first:
    raise ValueError(f"config.budget={config.budget} is below the warm-up plus one outer step "
                     f"({first} units)")


# ----------------------------------------------------------------------------------------------
# The problem and its compiled pieces.
# ----------------------------------------------------------------------------------------------


def load_problem(config, seed: int) -> dict:
  """The digits split of `seed` (float64) and the inner step size ``1 / L``."""
  (xt, yt), (xv, yv), (xs, ys) = digits.load_split(seed, config.n_train, config.n_val)
  aug = np.concatenate([xt, np.ones((len(xt), 1))], axis=1)
  # Softmax cross-entropy has Hessian <= 0.5 (X~ᵀX~ / n) (kron) I; the decay adds at most lam_high.
  lipschitz = 0.5 * np.linalg.eigvalsh(aug.T @ aug / len(xt)).max() + config.lam_high
  f = lambda a: jnp.asarray(a, jnp.float64)
  return {"train": (f(xt), jnp.asarray(yt)), "val": (f(xv), jnp.asarray(yv)),
          "test": (f(xs), jnp.asarray(ys)), "eta": 1.0 / lipschitz, "dim": xt.shape[1]}


def nesterov_step(state, lam, x, y, eta, momentum):
  """One Nesterov step on the training loss: one gradient, at the look-ahead point."""
  p, v = state
  look = jax.tree.map(lambda a, b: a + momentum * b, p, v)
  g = jax.grad(digits.inner_loss)(look, lam, x, y)
  v = jax.tree.map(lambda b, gg: momentum * b - eta * gg, v, g)
  return jax.tree.map(jnp.add, p, v), v


def _lam_of(phi, dim):
  """Hyperparameters from ``phi = log lam`` (a scalar for a shared decay, or per feature)."""
  return jnp.broadcast_to(jnp.exp(phi), (dim,))


def make_fns(config, dim: int) -> dict:
  """Compiled inner training, IFT and unrolled outer steps and the evaluation."""
  mu = config.momentum
  adjoint = AdjointConfig(method="cg", tol=config.cg_tol, maxiter=config.cg_maxiter,
                          on_nonconvergence="ignore")

  @functools.partial(jax.jit, static_argnums=5)
  def train(state, lam, x, y, eta, steps):
    body = lambda s, _: (nesterov_step(s, lam, x, y, eta, mu), None)
    return jax.lax.scan(body, state, None, length=steps)[0]

  @jax.jit
  def ift_step(params, phi, u0, train_data, val_data):
    lam, vjp = jax.vjp(lambda z: _lam_of(z, dim), phi)
    g, info = bilevel.ift_hypergradient(digits.inner_loss, digits.outer_loss, params, lam,
                                        inner_args=train_data, outer_args=val_data,
                                        config=adjoint, u0=u0)
    return vjp(g)[0], info

  @jax.jit
  def unrolled_step(state, phi, train_data, eta, val_data):
    step = lambda s, z, x, y, e: nesterov_step(s, _lam_of(z, dim), x, y, e, mu)
    outer = lambda s, z, x, y: digits.outer_loss(s[0], z, x, y)
    _, g, new_state = bilevel.unrolled_hypergradient(
        step, outer, state, phi, config.phase_steps, inner_args=(*train_data, eta),
        outer_args=val_data)
    return g, new_state

  outer_tx = optax.adam(config.outer_lr)
  lo, hi = np.log(config.lam_low), np.log(config.lam_high)

  @jax.jit
  def outer_update(phi, ostate, g):
    upd, ostate = outer_tx.update(g, ostate, phi)
    return jnp.clip(optax.apply_updates(phi, upd), lo, hi), ostate

  @jax.jit
  def evaluate(params, val_data, test_data):
    out = []
    for x, y in (val_data, test_data):
      logits = x @ params["w"] + params["b"]
      out += [jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y)),
              jnp.mean(jnp.argmax(logits, -1) == y)]
    return jnp.stack(out)

  return {"train": train, "ift_step": ift_step, "unrolled_step": unrolled_step,
          "outer_update": outer_update, "outer_init": outer_tx.init, "evaluate": evaluate}


def _zeros(dim):
  p = {"w": jnp.zeros((dim, 10), jnp.float64), "b": jnp.zeros((10,), jnp.float64)}
  return p, jax.tree.map(jnp.zeros_like, p)


def _row(method, seed, index, units, ev, lam, **extra):
  lam = np.asarray(lam, np.float64)
  return dict(method=method, seed=seed, index=index, units=float(units),
              val_loss=float(ev[0]), val_acc=float(ev[1]), test_loss=float(ev[2]),
              test_acc=float(ev[3]), lam_gmean=float(np.exp(np.mean(np.log(lam)))),
              lam_min=float(lam.min()), lam_max=float(lam.max()), **extra)


# ----------------------------------------------------------------------------------------------
# The methods. Each returns its candidate rows (cumulative units) and the hyperparameters of the
# last candidate.
# ----------------------------------------------------------------------------------------------


def coarse_to_fine(n: int) -> np.ndarray:
  """A visiting order of ``n`` grid points that halves the gaps as it goes (bit-reversed
  indices, i.e. van der Corput), so a grid search is anytime: an ascending sweep would find an
  optimum at the low end first and one at the high end last.

  >>> coarse_to_fine(8).tolist()
  [0, 4, 2, 6, 1, 5, 3, 7]
  """
  def radical_inverse(i):
    x, f = 0.0, 0.5
    while i:
      x, i, f = x + f * (i & 1), i >> 1, f / 2
    return x
  return np.argsort([radical_inverse(i) for i in range(n)], kind="stable")


def search_lams(config, method: str, seed: int, dim: int) -> np.ndarray:
  """The (points, dim) decays tried by grid / random search."""
  n = search_points(config)
  lo, hi = np.log10(config.lam_low), np.log10(config.lam_high)
  if method == "grid":
    grid = np.logspace(lo, hi, n)[coarse_to_fine(n)]
    return np.repeat(grid[:, None], dim, axis=1)
  rng = np.random.default_rng([seed, SEARCH.index(method)])
  shape = (n, 1) if method == "random" else (n, dim)
  return np.broadcast_to(10.0 ** rng.uniform(lo, hi, shape), (n, dim)).copy()


def run_search(config, fns, problem, method: str, seed: int) -> list[dict]:
  """Grid or random search: every point trained from zero for ``train_steps``."""
  rows, units = [], 0.0
  for i, lam in enumerate(search_lams(config, method, seed, problem["dim"])):
    state = fns["train"](_zeros(problem["dim"]), jnp.asarray(lam), *problem["train"],
                         problem["eta"], config.train_steps)
    units += cost_train(config, config.train_steps)
    ev = np.asarray(fns["evaluate"](state[0], problem["val"], problem["test"]))
    rows.append(_row(method, seed, i, units, ev, lam))
  return rows


def run_hypergradient(config, fns, problem, method: str, seed: int) -> tuple[list[dict], jax.Array]:
  """IFT or unrolled tuning from ``lam0`` until the next outer step could exceed the budget.

  Returns the candidate rows (the model after each inner phase, at the hyperparameters it was
  trained with) and the hyperparameters of the last candidate."""
  dim = problem["dim"]
  phi = jnp.full(() if method in ("ift", "unrolled") else (dim,), np.log(config.lam0))
  ostate = fns["outer_init"](phi)
  state = fns["train"](_zeros(dim), _lam_of(phi, dim), *problem["train"], problem["eta"],
                       config.warmup_steps)
  units = cost_train(config, config.warmup_steps)
  rows = [_row(method, seed, 0, units, fns["evaluate"](state[0], problem["val"],
                                                       problem["test"]), _lam_of(phi, dim))]
  ift = method.startswith("ift")
  worst = cost_ift(config, config.cg_maxiter) if ift else cost_unrolled(config)
  u = jax.tree.map(jnp.zeros_like, state[0])
  lam = _lam_of(phi, dim)
  while units + worst <= config.budget:
    extra = {}
    if ift:
      state = fns["train"](state, _lam_of(phi, dim), *problem["train"], problem["eta"],
                           config.phase_steps)
      g, info = fns["ift_step"](state[0], phi, u, problem["train"], problem["val"])
      u = info.u
      units += cost_ift(config, int(info.iterations))
      extra = dict(adjoint_iterations=int(info.iterations),
                   adjoint_residual=float(info.residual),
                   inner_grad_norm=float(info.inner_grad_norm))
    else:
      g, state = fns["unrolled_step"](state, phi, problem["train"], problem["eta"],
                                      problem["val"])
      units += cost_unrolled(config)
    ev = fns["evaluate"](state[0], problem["val"], problem["test"])
    lam = _lam_of(phi, dim)
    rows.append(_row(method, seed, len(rows), units, ev, lam, **extra))
    phi, ostate = fns["outer_update"](phi, ostate, g)
  return rows, lam


def retrain_at(config, fns, problem, lam) -> dict:
  """Trains from zero for ``train_steps`` at ``lam`` (as a search point would be; outside the
  budget): separates the quality of the hyperparameters from the warm-started training."""
  state = fns["train"](_zeros(problem["dim"]), lam, *problem["train"], problem["eta"],
                       config.train_steps)
  ev = np.asarray(fns["evaluate"](state[0], problem["val"], problem["test"]))
  return {"val_loss": float(ev[0]), "val_acc": float(ev[1]), "test_loss": float(ev[2]),
          "test_acc": float(ev[3])}


# ----------------------------------------------------------------------------------------------
# Timing of the units and the summary.
# ----------------------------------------------------------------------------------------------


def _best_time(fn, *args, repeats=3):
  jax.block_until_ready(fn(*args))        # compile
  best = np.inf
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return best


def measure_unit_ratios(config, problem) -> dict:
  """Wall time of a Hessian-vector product (as CG uses it: `jax.linearize` of the gradient) and
  of one differentiated unrolled step, each relative to one inner step, over scans of
  ``timing_steps`` (best of 3, after compiling; ``timing_steps = 0`` skips it). Shows how far
  the unit weights are from this machine's costs."""
  dim, n, mu = problem["dim"], config.timing_steps, config.momentum
  x, y = problem["train"]
  lam = jnp.full((dim,), config.lam0)
  state = _zeros(dim)
  eta = problem["eta"]

  @jax.jit
  def steps(s):
    return jax.lax.scan(lambda c, _: (nesterov_step(c, lam, x, y, eta, mu), None), s, None,
                        length=n)[0]

  @jax.jit
  def hvps(p):
    _, hvp = jax.linearize(lambda q: jax.grad(digits.inner_loss)(q, lam, x, y), p)
    return jax.lax.scan(lambda v, _: (hvp(v), None), p, None, length=n)[0]

  @jax.jit
  def unrolled(s):
    step = lambda c, z: nesterov_step(c, jnp.broadcast_to(jnp.exp(z), (dim,)), x, y, eta, mu)
    outer = lambda c, z: digits.outer_loss(c[0], z, *problem["val"])
    return bilevel.unrolled_hypergradient(step, outer, s, jnp.log(config.lam0), n)[1]

  p1 = jax.tree.map(lambda a: a + 0.01, state[0])
  t_step = _best_time(steps, state)
  return {"hvp_over_step": _best_time(hvps, p1) / t_step,
          "unrolled_step_over_step": _best_time(unrolled, state) / t_step,
          "seconds_per_step": t_step / n}


def _stats(values) -> dict:
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
          "max": float(v.max()), "per_seed": v.tolist()}


def best_so_far(rows, grid) -> np.ndarray:
  """Best validation loss among the candidates whose cumulative units are <= each grid value
  (NaN before the first candidate)."""
  units = np.array([r["units"] for r in rows])
  vals = np.minimum.accumulate(np.array([r["val_loss"] for r in rows]))
  idx = np.searchsorted(units, grid, side="right") - 1
  return np.where(idx >= 0, vals[np.maximum(idx, 0)], np.nan)


def _grid_best(config, rows) -> dict:
  """Per seed, the best validation loss of the full grid search (NaN without a grid)."""
  return {s: min((r["val_loss"] for r in rows if r["method"] == "grid" and r["seed"] == s),
                 default=np.nan) for s in config.seeds}


def curves(config, rows) -> list[dict]:
  """Best validation loss against compute per method: mean, min and max over seeds, and the
  same for its difference to the full grid's best on the same split (``diff_*``; the splits
  differ more from each other than the methods do)."""
  grid = np.linspace(0.0, config.budget, config.curve_points)
  ref = _grid_best(config, rows)
  out = []
  for method in config.methods:
    per_seed = np.stack([best_so_far([r for r in rows if r["method"] == method
                                      and r["seed"] == s], grid) for s in config.seeds])
    diff = per_seed - np.array([ref[s] for s in config.seeds])[:, None]
    with np.errstate(all="ignore"):
      for j, u in enumerate(grid):
        row = dict(method=method, units=float(u), seeds=int((~np.isnan(per_seed[:, j])).sum()))
        for prefix, values in (("", per_seed[:, j]), ("diff_", diff[:, j])):
          ok = ~np.isnan(values)
          row.update({f"{prefix}mean": float(values.mean()) if ok.all() else np.nan,
                      f"{prefix}min": float(values[ok].min()) if ok.any() else np.nan,
                      f"{prefix}max": float(values[ok].max()) if ok.any() else np.nan})
        out.append(row)
  return out


def units_to_match(rows, target: float) -> float:
  """Compute spent when the best validation loss found first reaches ``target`` (NaN: never)."""
  for r, best in zip(rows, np.minimum.accumulate([r["val_loss"] for r in rows])):
    if best <= target:
      return r["units"]
  return np.nan


def summarize(config, rows, retrain) -> dict:
  """Per method over seeds: the selected candidate (lowest validation loss) and its test figures,
  also as differences to the grid's selection on the same split; the units spent, the units at
  which the method first matches the full grid's best validation loss, the best validation loss
  at 1/4 and 1/2 of the budget, and (hypergradient
  methods) the last hyperparameters retrained from zero for ``train_steps`` (outside the
  budget)."""
  summary = {"methods": {}, "budget": config.budget, "search_points": search_points(config)}
  ref = _grid_best(config, rows)
  for method in config.methods:
    sel, spent, quarter, half, count, match = [], [], [], [], [], []
    for s in config.seeds:
      mine = [r for r in rows if r["method"] == method and r["seed"] == s]
      sel.append(min(mine, key=lambda r: r["val_loss"]))
      match.append(units_to_match(mine, ref[s]))
      spent.append(mine[-1]["units"])
      count.append(len(mine))
      q, h = best_so_far(mine, np.array([config.budget / 4, config.budget / 2]))
      quarter.append(q)
      half.append(h)
    m = {"units_spent": _stats(spent), "candidates": _stats(count),
         "best_val_loss_at_quarter_budget": _stats(quarter),
         "best_val_loss_at_half_budget": _stats(half)}
    for key in ("val_loss", "val_acc", "test_loss", "test_acc", "lam_gmean"):
      m[f"selected_{key}"] = _stats([r[key] for r in sel])
    if "grid" in config.methods:
      grid_sel = [min((r for r in rows if r["method"] == "grid" and r["seed"] == s),
                      key=lambda r: r["val_loss"]) for s in config.seeds]
      m["units_to_match_grid_best"] = {"per_seed": [float(u) for u in match],
                                       "matched": int(np.sum(~np.isnan(match)))}
      for key in ("val_loss", "test_loss", "test_acc"):
        m[f"selected_{key}_minus_grid"] = _stats([a[key] - b[key]
                                                  for a, b in zip(sel, grid_sel)])
    if method in HYPERGRADIENT:
      last = [[r for r in rows if r["method"] == method and r["seed"] == s][-1]
              for s in config.seeds]
      m["last_lam_gmean"] = _stats([r["lam_gmean"] for r in last])
      for key in ("val_loss", "test_loss", "test_acc"):
        m[f"retrained_{key}"] = _stats([retrain[(method, s)][key] for s in config.seeds])
    if method.startswith("ift"):
      mine = [r for r in rows if r["method"] == method and "adjoint_iterations" in r]
      m["adjoint_iterations"] = _stats([r["adjoint_iterations"] for r in mine])
      m["max_adjoint_residual"] = float(max(r["adjoint_residual"] for r in mine))
      m["median_inner_grad_norm"] = float(np.median([r["inner_grad_norm"] for r in mine]))
    summary["methods"][method] = m
  return summary


def run_digits(config) -> dict:
  """Every method on every seed. Returns {"rows", "curve", "summary"}."""
  _check(config)
  t0, c0 = time.time(), time.process_time()
  rows, retrain = [], {}
  with jax.enable_x64(True):
    ratios = None
    for seed in config.seeds:
      problem = load_problem(config, seed)
      fns = make_fns(config, problem["dim"])
      if ratios is None and config.timing_steps > 0:
        ratios = measure_unit_ratios(config, problem)
      for method in config.methods:
        if method in SEARCH:
          rows += run_search(config, fns, problem, method, seed)
          continue
        mine, lam = run_hypergradient(config, fns, problem, method, seed)
        rows += mine
        retrain[(method, seed)] = retrain_at(config, fns, problem, lam)
  summary = summarize(config, rows, retrain)
  summary["measured_unit_ratios"] = ratios
  summary["seconds"] = {"wall": time.time() - t0, "cpu": time.process_time() - c0}
  return {"rows": rows, "curve": curves(config, rows), "summary": summary}


# ----------------------------------------------------------------------------------------------
# LoRA on MiniLM: weight decay and LoRA scaling, IFT vs grid and random search (float32).
# ----------------------------------------------------------------------------------------------


def load_lora_problem(lc) -> dict:
  """Cached inputs of the adapted kernel (`experiments.bilevel_lora`), the LoRA factors' and the
  head's initial values, and the frozen layer norm."""
  from experiments import bilevel_lora  # pylint: disable=g-import-not-at-top
  import lowrank_jax as lj  # pylint: disable=g-import-not-at-top
  from lowrank_jax.models import minilm  # pylint: disable=g-import-not-at-top
  params, cfg = minilm.load_pretrained()
  tok = minilm.load_tokenizer(lc.seq_len)
  splits = bilevel_lora.load_examples(lc.n_train, lc.n_val, lc.n_test, lc.seed)
  feats = {}
  for name, (texts, y) in zip(("train", "val", "test"), splits):
    feats[name] = bilevel_lora.frozen_features(params, cfg, minilm.tokenize(tok, texts)) + (
        jnp.asarray(y),)
  last = params["encoder"][f"layer_{cfg.num_layers - 1}"]["mlp"]
  sub = {"encoder": {"layer_5": {"mlp": {"output": {"kernel": last["output"]["kernel"]}}}}}
  _, state = lj.lora(lc.rank, 1.0, bilevel_lora.TARGET).init(jax.random.key(lc.seed), sub)
  f = state.trainable["encoder"]["layer_5"]["mlp"]["output"]["kernel"]
  head = minilm.add_classifier_head(jax.random.key(lc.seed + 1), params, 41)["head"]
  return {"feats": feats, "w0": {"a": f.a, "b": f.b, "head": head}, "norm": last["norm"],
          "eps": cfg.layer_norm_eps}


def make_lora_fns(lc, problem) -> dict:
  """The cached-feature model ``head(mean_pool(LN(out + s (h A) B)))`` with hyperparameters
  ``hp = (weight decay, LoRA scale s)``; compiled Adam training, IFT step (Neumann adjoint) and
  evaluation."""
  from lowrank_jax.models import _layers as L  # pylint: disable=g-import-not-at-top
  from lowrank_jax.models import minilm  # pylint: disable=g-import-not-at-top
  norm, eps = problem["norm"], problem["eps"]

  def logits(w, hp, h, out, mask):
    branch = hp[1] * jnp.einsum("btr,ro->bto", jnp.einsum("bti,ir->btr", h, w["a"]), w["b"])
    return L.dense(w["head"], minilm.mean_pool(L.layer_norm(norm, out + branch, eps), mask))

  def ce(w, hp, h, out, mask, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits(w, hp, h, out, mask), y))

  def inner_loss(w, hp, *data):
    reg = jnp.sum(w["a"] ** 2) + jnp.sum(w["b"] ** 2) + jnp.sum(w["head"]["kernel"] ** 2)
    return ce(w, hp, *data) + 0.5 * hp[0] * reg

  tx = optax.adam(lc.inner_lr)

  @functools.partial(jax.jit, static_argnums=3)
  def train(state, hp, data, steps):
    def body(st, _):
      g = jax.grad(inner_loss)(st[0], hp, *data)
      upd, opt = tx.update(g, st[1], st[0])
      return (optax.apply_updates(st[0], upd), opt), None
    return jax.lax.scan(body, state, None, length=steps)[0]

  @functools.partial(jax.jit, static_argnames="adjoint")
  def ift_step(w, phi, u0, train_data, val_data, adjoint):
    hp, vjp = jax.vjp(jnp.exp, phi)
    g, info = bilevel.ift_hypergradient(inner_loss, ce, w, hp, inner_args=train_data,
                                        outer_args=val_data, config=adjoint, u0=u0)
    return vjp(g)[0], info

  @jax.jit
  def hvp(w, hp, v, train_data):
    return jax.jvp(lambda q: jax.grad(inner_loss)(q, hp, *train_data), (w,), (v,))[1]

  @jax.jit
  def evaluate(w, hp, val_data, test_data):
    out = []
    for h, o, mask, y in (val_data, test_data):
      z = logits(w, hp, h, o, mask)
      out += [jnp.mean(optax.softmax_cross_entropy_with_integer_labels(z, y)),
              jnp.mean(jnp.argmax(z, -1) == y)]
    return jnp.stack(out)

  return {"train": train, "ift_step": ift_step, "hvp": hvp, "evaluate": evaluate,
          "init": lambda: (problem["w0"], tx.init(problem["w0"]))}


def lora_search_points(lc) -> np.ndarray:
  """The (points, 2) hyperparameters of the LoRA grid (the outer product of ``grid_decays`` and
  ``grid_scales``)."""
  return np.array([(d, s) for d in lc.grid_decays for s in lc.grid_scales], np.float64)


def lora_budget(lc) -> float:
  """The LoRA budget: the grid's cost (every method gets it)."""
  return len(lora_search_points(lc)) * lc.train_steps * lc.cost_grad


def _lora_row(method, index, units, ev, hp, **extra):
  return dict(method=method, index=index, units=float(units), val_loss=float(ev[0]),
              val_acc=float(ev[1]), test_loss=float(ev[2]), test_acc=float(ev[3]),
              weight_decay=float(hp[0]), scale=float(hp[1]), **extra)


def _lora_step_cost(lc, iterations: int) -> float:
  """One IFT outer step of the LoRA run (as `cost_ift`, with the Neumann adjoint)."""
  return (lc.phase_steps + 2) * lc.cost_grad + (iterations + 3) * lc.cost_hvp


def _check_lora(lc):
  first = ((lc.warmup_steps + 0.0) * lc.cost_grad + lc.power_iterations * lc.cost_hvp
           + _lora_step_cost(lc, lc.neumann_terms))
  if lora_budget(lc) < first:
    raise ValueError(f"config.lora: the budget ({lora_budget(lc)} units = grid points x "
                     f"train_steps) is below the IFT's warm-up, power iteration and one outer "
                     f"step ({first} units)")


def run_lora(lc) -> dict:
  """Grid, random search and IFT tuning of (weight decay, LoRA scale) at the grid's compute."""
  _check_lora(lc)
  t0, c0 = time.time(), time.process_time()
  problem = load_lora_problem(lc)
  fns = make_lora_fns(lc, problem)
  feats = problem["feats"]
  budget = lora_budget(lc)
  lo = np.log([lc.decay_range[0], lc.scale_range[0]])
  hi = np.log([lc.decay_range[1], lc.scale_range[1]])
  rows = []
  rng = np.random.default_rng(lc.seed)
  draws = np.exp(rng.uniform(lo, hi, (len(lora_search_points(lc)), 2)))
  for method, points in (("grid", lora_search_points(lc)), ("random", draws)):
    units = 0.0
    for i, hp in enumerate(points):
      hp = jnp.asarray(hp, jnp.float32)
      state = fns["train"](fns["init"](), hp, feats["train"], lc.train_steps)
      units += lc.train_steps * lc.cost_grad
      rows.append(_lora_row(method, i, units, fns["evaluate"](state[0], hp, feats["val"],
                                                              feats["test"]), hp))
  # IFT: warm-up, the Neumann step size from a power iteration (counted), then outer steps.
  phi = jnp.log(jnp.asarray([lc.decay0, lc.scale0], jnp.float32))
  hp = jnp.exp(phi)
  state = fns["train"](fns["init"](), hp, feats["train"], lc.warmup_steps)
  units = lc.warmup_steps * lc.cost_grad
  rows.append(_lora_row("ift", 0, units, fns["evaluate"](state[0], hp, feats["val"],
                                                         feats["test"]), hp))
  v = jax.tree.map(lambda x: jax.random.normal(jax.random.key(lc.seed + 2), x.shape, x.dtype),
                   state[0])
  for _ in range(lc.power_iterations):
    hv = fns["hvp"](state[0], hp, v, feats["train"])
    lmax = float(optax.tree_utils.tree_norm(hv)) / float(optax.tree_utils.tree_norm(v))
    v = hv
  units += lc.power_iterations * lc.cost_hvp
  adjoint = AdjointConfig(method="neumann", neumann_alpha=0.5 / lmax, tol=0.0,
                          maxiter=lc.neumann_terms, on_nonconvergence="ignore")
  step_cost = _lora_step_cost(lc, lc.neumann_terms)
  outer_tx = optax.adam(lc.outer_lr)
  ostate = outer_tx.init(phi)
  u = jax.tree.map(jnp.zeros_like, state[0])
  while units + step_cost <= budget:
    state = fns["train"](state, hp, feats["train"], lc.phase_steps)
    g, info = fns["ift_step"](state[0], phi, u, feats["train"], feats["val"], adjoint=adjoint)
    u = info.u
    units += _lora_step_cost(lc, int(info.iterations))
    rows.append(_lora_row("ift", len([r for r in rows if r["method"] == "ift"]), units,
                          fns["evaluate"](state[0], hp, feats["val"], feats["test"]), hp,
                          adjoint_residual=float(info.residual),
                          inner_grad_norm=float(info.inner_grad_norm)))
    upd, ostate = outer_tx.update(g, ostate, phi)
    phi = jnp.clip(optax.apply_updates(phi, upd), lo, hi)
    hp = jnp.exp(phi)
  summary = {"budget": budget, "hessian_lmax": lmax, "methods": {}}
  for method in ("grid", "random", "ift"):
    mine = [r for r in rows if r["method"] == method]
    best = min(mine, key=lambda r: r["val_loss"])
    summary["methods"][method] = {
        "units_spent": mine[-1]["units"], "candidates": len(mine),
        "best_val_loss_at_half_budget": float(best_so_far(mine, np.array([budget / 2]))[0]),
        **{f"selected_{k}": best[k] for k in ("val_loss", "val_acc", "test_loss", "test_acc",
                                               "weight_decay", "scale")}}
  ift_rows = [r for r in rows if r["method"] == "ift"][1:]
  summary["methods"]["ift"]["last_hyperparameters"] = [ift_rows[-1]["weight_decay"],
                                                       ift_rows[-1]["scale"]]
  summary["methods"]["ift"]["max_adjoint_residual"] = max(r["adjoint_residual"]
                                                          for r in ift_rows)
  summary["seconds"] = {"wall": time.time() - t0, "cpu": time.process_time() - c0}
  return {"rows": rows, "summary": summary}


def run(config) -> dict:
  """The parts of ``config.parts``: ``{"digits": run_digits(...), "lora": run_lora(...)}``."""
  unknown = sorted(set(config.parts) - {"digits", "lora"})
  if unknown:
    raise ValueError(f"config.parts: unknown {unknown}; valid: ['digits', 'lora']")
  out = {}
  if "digits" in config.parts:
    out["digits"] = run_digits(config)
  if "lora" in config.parts:
    out["lora"] = run_lora(config.lora)
  return out


# ----------------------------------------------------------------------------------------------
# Outputs.
# ----------------------------------------------------------------------------------------------

FIELDS = ("method", "seed", "index", "units", "val_loss", "val_acc", "test_loss", "test_acc",
          "lam_gmean", "lam_min", "lam_max", "adjoint_iterations", "adjoint_residual",
          "inner_grad_norm")
CURVE_FIELDS = ("method", "units", "seeds", "mean", "min", "max", "diff_mean", "diff_min",
                "diff_max")


LORA_FIELDS = ("method", "index", "units", "val_loss", "val_acc", "test_loss", "test_acc",
               "weight_decay", "scale", "adjoint_residual", "inner_grad_norm")


def _write_csv(path, fields, rows):
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fields, restval="")
    w.writeheader()
    w.writerows(rows)


def write_outputs(workdir: str, config, result: dict) -> list[str]:
  """Writes each part's CSVs and PNG, and one summary JSON; returns their paths."""
  os.makedirs(workdir, exist_ok=True)
  paths = []
  if "digits" in result:
    d = result["digits"]
    for name, fields, rows in (("bilevel.csv", FIELDS, d["rows"]),
                               ("bilevel_curve.csv", CURVE_FIELDS, d["curve"])):
      paths.append(os.path.join(workdir, name))
      _write_csv(paths[-1], fields, rows)
    paths.append(os.path.join(workdir, "bilevel.png"))
    plot(config, d, paths[-1])
  if "lora" in result:
    paths.append(os.path.join(workdir, "bilevel_lora.csv"))
    _write_csv(paths[-1], LORA_FIELDS, result["lora"]["rows"])
    paths.append(os.path.join(workdir, "bilevel_lora.png"))
    plot_lora(config.lora, result["lora"], paths[-1])
  paths.append(os.path.join(workdir, "summary.json"))
  with open(paths[-1], "w") as f:
    json.dump({"config": config.to_dict(),
               "summary": {k: v["summary"] for k, v in result.items()}}, f, indent=1)
  return paths


LABELS = {"grid": "grid (shared)", "random": "random (shared)", "random_pf": "random (per-feature)",
          "ift": "IFT (shared)", "ift_pf": "IFT (per-feature)", "unrolled": "unrolled (shared)",
          "unrolled_pf": "unrolled (per-feature)"}


def plot(config, result, path: str) -> None:
  """Left: best validation loss found against compute (mean over seeds, band min-max). Middle and
  right: test loss and accuracy of each method's selected model (dots: seeds)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.4), gridspec_kw={"width_ratios": [1.6, 1, 1]})
  ax = axes[0]
  for method in config.methods:
    pts = [c for c in result["curve"] if c["method"] == method]
    u = np.array([c["units"] for c in pts])
    style = "--" if method.endswith("_pf") else "-"
    line, = ax.plot(u, [c["diff_mean"] for c in pts], style, label=LABELS[method])
    ax.fill_between(u, [c["diff_min"] for c in pts], [c["diff_max"] for c in pts], alpha=0.12,
                    color=line.get_color())
  ax.axhline(0.0, color="k", lw=0.5)
  ax.set_yscale("symlog", linthresh=1e-3)
  ax.set(xlabel="compute spent (training-gradient units)",
         ylabel="best val. loss found − full grid's best (same split)",
         title=f"best validation loss vs compute, {len(config.seeds)} splits (band: min-max)")
  ax.title.set_fontsize(10)
  ax.legend(fontsize=8)
  summary = result["summary"]["methods"]
  for ax, key, label in ((axes[1], "selected_test_loss", "test loss"),
                         (axes[2], "selected_test_acc", "test accuracy")):
    for i, method in enumerate(config.methods):
      st = summary[method][key]
      ax.bar(i, st["mean"], color=f"C{i}", alpha=0.5)
      ax.plot([i] * len(st["per_seed"]), st["per_seed"], "k.")
    ax.set_xticks(range(len(config.methods)))
    ax.set_xticklabels([LABELS[m] for m in config.methods], rotation=40, ha="right", fontsize=8)
    vals = [v for m in config.methods for v in summary[m][key]["per_seed"]]
    pad = 0.1 * (max(vals) - min(vals) + 1e-9)
    ax.set_ylim(min(vals) - 3 * pad, max(vals) + pad)
    ax.set(title=f"{label} of the selected model")
  fig.suptitle(f"weight decay tuned at equal compute ({config.budget} units: "
               f"{result['summary']['search_points']} search points of {config.train_steps} "
               "steps)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_lora(lc, result, path: str) -> None:
  """Left: best validation loss found against compute. Right: the hyperparameters each method
  tried (grid, random draws, the IFT path), coloured by validation loss."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
  rows = result["rows"]
  grid = np.linspace(0.0, result["summary"]["budget"], 101)
  vals = [r["val_loss"] for r in rows]
  for method, marker in (("grid", "s"), ("random", "o"), ("ift", ".")):
    mine = [r for r in rows if r["method"] == method]
    axes[0].plot(grid, best_so_far(mine, grid), label=method)
    sc = axes[1].scatter([r["weight_decay"] for r in mine], [r["scale"] for r in mine],
                         c=[r["val_loss"] for r in mine], marker=marker, label=method,
                         vmin=min(vals), vmax=np.percentile(vals, 90), cmap="viridis")
  path_ift = [r for r in rows if r["method"] == "ift"]
  axes[1].plot([r["weight_decay"] for r in path_ift], [r["scale"] for r in path_ift], "k-",
               lw=0.5)
  fig.colorbar(sc, ax=axes[1], label="validation loss")
  axes[0].set(xlabel="compute spent (training-gradient units)",
              ylabel="best validation loss found",
              title=f"LoRA r{lc.rank} on MiniLM, WordNet supersenses (seed {lc.seed})")
  axes[0].legend()
  axes[1].set(xscale="log", yscale="log", xlabel="weight decay", ylabel="LoRA scale s",
              title="hyperparameters tried")
  axes[1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  del argv
  config = flags.FLAGS.config
  result = run(config)
  for path in write_outputs(flags.FLAGS.workdir, config, result):
    print("wrote", path)
  print(json.dumps({k: v["summary"] for k, v in result.items()}, indent=1))


if __name__ == "__main__":
  # Flags are defined here, not at import, so that `run` can be imported next to other modules
  # that define `--config`.
  config_flags.DEFINE_config_file("config", None, "configs/repro/bilevel.py[:arg]",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Output directory (CSVs, JSON, PNG).")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
