"""Reliability cases of the command-line tools (`experiments.run`, `experiments.sweep`).

Each test is one bad input or fault, and asserts the exact outcome: a one-line error naming the
field or file and what is valid (no traceback), or no result lost.
"""
import csv
import json
import os
import subprocess
import sys
import tempfile
import textwrap

from absl.testing import absltest

from experiments import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = "configs/digits_lora.py:runlocal"

_SWEEP_CONFIG = textwrap.dedent("""\
    def get_config(arg=None):
      raise AssertionError("every point is finished; nothing may run")

    def sweep(add):
      add(arg="method=lora")
      add(arg="method=dora")
""")


def _finished_sweep():
  """A sweep directory whose two points are finished (hand-written results.json)."""
  wd = tempfile.mkdtemp()
  config = os.path.join(wd, "sweep_config.py")
  with open(config, "w") as f:
    f.write(_SWEEP_CONFIG)
  for name, method, acc in (("method-lora", "lora", 0.75), ("method-dora", "dora", 0.5)):
    os.makedirs(os.path.join(wd, name))
    with open(os.path.join(wd, name, "results.json"), "w") as f:
      json.dump({"method": method, "accuracy": acc, "trainable_params": 100, "wall_s": 1.0,
                 "config": {"adapter": {"rank": 2}, "seed": 0}}, f)
  return config, wd


def _csv_rows(wd):
  with open(os.path.join(wd, "results.csv")) as f:
    return {r["name"]: r for r in csv.DictReader(f)}


class SweepTest(absltest.TestCase):

  def test_only_subset_keeps_every_finished_point(self):
    config, wd = _finished_sweep()
    sweep.run_sweep(config, wd, only="lora")
    rows = _csv_rows(wd)
    self.assertEqual(sorted(rows), ["method-dora", "method-lora"])
    self.assertEqual(rows["method-dora"]["accuracy"], "0.5")
    self.assertEqual(rows["method-lora"]["accuracy"], "0.75")

  def test_only_matching_nothing_is_an_error_and_keeps_results(self):
    config, wd = _finished_sweep()
    sweep.run_sweep(config, wd)
    with open(os.path.join(wd, "results.csv")) as f:
      before = f.read()
    with self.assertRaisesRegex(ValueError, r"--only 'nomatch' matches no point; points: "
                                r"\['method-lora', 'method-dora'\]"):
      sweep.run_sweep(config, wd, only="nomatch")
    with open(os.path.join(wd, "results.csv")) as f:
      self.assertEqual(f.read(), before)

  def test_only_invalid_regex_is_an_error(self):
    config, wd = _finished_sweep()
    with self.assertRaisesRegex(ValueError, r"--only '\(' is not a valid regex"):
      sweep.run_sweep(config, wd, only="(")

  def test_stale_plot_is_removed(self):
    config, wd = _finished_sweep()
    stale = os.path.join(wd, "rank_allocation.png")   # no point logged ranks.jsonl
    with open(stale, "wb") as f:
      f.write(b"stale")
    sweep.run_sweep(config, wd, only="dora")
    self.assertFalse(os.path.exists(stale))
    for name in ("accuracy_vs_params.png", "loss_curves.png"):
      self.assertTrue(os.path.exists(os.path.join(wd, name)), name)

  def test_results_csv_written_atomically(self):
    config, wd = _finished_sweep()
    sweep.run_sweep(config, wd)
    self.assertFalse(os.path.exists(os.path.join(wd, "results.csv.tmp")))
    self.assertLen(_csv_rows(wd), 2)


if __name__ == "__main__":
  absltest.main()
