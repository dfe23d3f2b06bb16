"""experiments.repro_bilevel at a tiny setting: the compute accounting (recounted here, and the
training gradients counted at run time), the equal budgets, and the outputs."""
import csv
import json
import os

import jax
import numpy as np
import pytest

from configs.repro import bilevel as bilevel_config
from experiments import bilevel_digits
from experiments import repro_bilevel as rb

GRAD, HVP = 1.0, 2.0          # the unit weights, written out again


def _config(**kw):
  c = bilevel_config.get_config("runlocal").unlock()
  c.methods = ("grid", "random_pf", "ift_pf", "unrolled")
  c.timing_steps = 2
  for k, v in kw.items():
    setattr(c, k, v)
  return c.lock()


@pytest.fixture(scope="module")
def counted_run():
  """The tiny run, with every evaluation of the training loss counted on the host at run time
  (one per training gradient, inner step or IFT linearisation point)."""
  count = {"n": 0}
  original = bilevel_digits.inner_loss

  def counting(params, lam, x, y):
    # The operand ties the callback to this evaluation (an operand-free one is loop-invariant).
    jax.debug.callback(lambda _: count.__setitem__("n", count["n"] + 1), params["w"])
    return original(params, lam, x, y)

  bilevel_digits.inner_loss = counting
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    config = _config()
    with jax.enable_x64(True):
      problem = rb.load_problem(config, 0)
      fns = rb.make_fns(config, problem["dim"])
      counts, rows, retrain = {}, [], {}
      for method in config.methods:
        before = count["n"]
        if method in rb.SEARCH:
          rows += rb.run_search(config, fns, problem, method, 0)
        else:
          mine, lam = rb.run_hypergradient(config, fns, problem, method, 0)
          counts[method] = count["n"] - before
          rows += mine
          retrain[(method, 0)] = rb.retrain_at(config, fns, problem, lam)
        counts.setdefault(method, count["n"] - before)
  finally:
    bilevel_digits.inner_loss = original
    jax.config.update("jax_disable_most_optimizations", False)
  return config, rows, counts, retrain


def _mine(rows, method):
  return [r for r in rows if r["method"] == method]


def test_search_spends_the_budget_in_whole_points(counted_run):
  config, rows, counts, _ = counted_run
  for method in ("grid", "random_pf"):
    mine = _mine(rows, method)
    assert len(mine) == config.budget // config.train_steps == 3
    np.testing.assert_allclose([r["units"] for r in mine],
                               [config.train_steps * (i + 1) for i in range(3)])
    assert counts[method] == 3 * config.train_steps       # gradients actually evaluated


def test_unrolled_gets_the_same_budget_counted_independently(counted_run):
  config, rows, counts, _ = counted_run
  step = config.phase_steps * (GRAD + HVP) + GRAD
  mine = _mine(rows, "unrolled")
  expected = config.warmup_steps * GRAD + step * np.arange(len(mine))
  np.testing.assert_allclose([r["units"] for r in mine], expected)
  spent = mine[-1]["units"]
  assert spent <= config.budget < spent + step             # it stops before overspending only
  assert abs(spent - _mine(rows, "grid")[-1]["units"]) < step
  # At run time: the warm-up, then per outer step the forward steps and their recomputation in
  # the backward pass (jax.checkpoint); the backward products are what the HVP weight prices.
  outer = len(mine) - 1
  assert counts["unrolled"] == config.warmup_steps + 2 * config.phase_steps * outer


def test_ift_counts_its_adjoint_iterations(counted_run):
  config, rows, counts, _ = counted_run
  mine = _mine(rows, "ift_pf")
  its = [r["adjoint_iterations"] for r in mine[1:]]
  assert all(0 < i <= config.cg_maxiter for i in its)
  steps = [config.phase_steps * GRAD + 2 * GRAD + (i + 3) * HVP for i in its]
  np.testing.assert_allclose([r["units"] for r in mine],
                             config.warmup_steps + np.concatenate([[0], np.cumsum(steps)]))
  worst = config.phase_steps * GRAD + 2 * GRAD + (config.cg_maxiter + 3) * HVP
  assert mine[-1]["units"] <= config.budget < mine[-1]["units"] + worst
  # Training-loss evaluations at run time: the inner steps, plus two per outer step (the
  # linearisation point and the mixed-derivative product), which the IFT weights price as the
  # gradient at the linearisation point and one HVP.
  assert counts["ift_pf"] == config.warmup_steps + (config.phase_steps + 2) * len(its)


def test_outputs_and_summary(counted_run, tmp_path):
  config, rows, _, retrain = counted_run
  result = {"digits": {"rows": rows, "curve": rb.curves(config, rows),
                       "summary": rb.summarize(config, rows, retrain)}}
  paths = rb.write_outputs(str(tmp_path), config, result)
  assert sorted(os.path.basename(p) for p in paths) == [
      "bilevel.csv", "bilevel.png", "bilevel_curve.csv", "summary.json"]
  assert all(os.path.getsize(p) > 0 for p in paths)
  with open(tmp_path / "bilevel.csv") as f:
    assert {r["method"] for r in csv.DictReader(f)} == set(config.methods)
  with open(tmp_path / "bilevel_curve.csv") as f:
    curve = list(csv.DictReader(f))
  summary = json.loads((tmp_path / "summary.json").read_text())["summary"]["digits"]
  for method in config.methods:
    mine = [r for r in curve if r["method"] == method]
    best = min(r["val_loss"] for r in _mine(rows, method))
    assert float(mine[-1]["mean"]) == pytest.approx(best)        # the curve ends at the best
    means = [float(r["mean"]) for r in mine if r["mean"] != "nan"]
    assert means == sorted(means, reverse=True)                  # and never goes up
    m = summary["methods"][method]
    assert m["selected_val_loss"]["mean"] == pytest.approx(best)
    assert m["units_spent"]["mean"] == _mine(rows, method)[-1]["units"] <= config.budget
  grid = summary["methods"]["grid"]
  assert grid["units_to_match_grid_best"]["per_seed"][0] <= config.budget
  assert grid["selected_val_loss_minus_grid"]["mean"] == 0.0
  assert float([r for r in curve if r["method"] == "grid"][-1]["diff_mean"]) == 0.0


def test_run_composes_the_parts():
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    result = rb.run(_config(methods=("grid",), budget=100, timing_steps=0))
  finally:
    jax.config.update("jax_disable_most_optimizations", False)
  assert list(result) == ["digits"]
  summary = result["digits"]["summary"]
  assert summary["search_points"] == 1 and summary["measured_unit_ratios"] is None
  assert len(result["digits"]["rows"]) == 1


def test_coarse_to_fine_is_a_permutation_that_halves_the_gaps():
  assert rb.coarse_to_fine(8).tolist() == [0, 4, 2, 6, 1, 5, 3, 7]
  order = rb.coarse_to_fine(16)
  assert sorted(order.tolist()) == list(range(16))
  assert order[:3].tolist() == [0, 8, 4]


def test_bad_config_is_refused_before_work():
  with pytest.raises(ValueError, match=r"config.methods: unknown \['bayes'\]"):
    rb.run_digits(_config(methods=("grid", "bayes")))
  with pytest.raises(ValueError, match="config.budget=50 is below one search point"):
    rb.run_digits(_config(budget=50))
  with pytest.raises(ValueError, match="config.parts: unknown"):
    rb.run(_config(parts=("vision",)))
