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

from absl.testing import absltest

from experiments import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = "configs/digits_lora.py:runlocal"

_SWEEP_CONFIG = """\
def get_config(arg=None):
  raise ValueError(f"point {{arg}} is not finished and cannot run here")

def sweep(add):
  for method in {methods}:
    add(arg=f"method={{method}}")
"""


def _run(*args):
  env = dict(os.environ)
  env.pop("LOWRANK_JAX_TRACEBACK", None)
  return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300, env=env)


def _error_line(out):
  """The one `error:` line of a failed run (asserts exit status 1 and no traceback)."""
  assert out.returncode == 1, (out.returncode, out.stderr[-2000:])
  assert "Traceback" not in out.stderr, out.stderr[-2000:]
  lines = [l for l in out.stderr.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1, out.stderr[-2000:]
  return lines[0]


class RunErrorTest(absltest.TestCase):

  def test_unknown_top_level_field_lists_valid_names(self):
    line = _error_line(_run(f"--config={CONFIG}", "--workdir=" + tempfile.mkdtemp(),
                            "--config.foo=1"))
    self.assertStartsWith(line, "error: unknown config field 'foo'; valid names: ['adapter', ")
    self.assertIn("'total_steps'", line)

  def test_unknown_nested_field_lists_names_at_its_level(self):
    line = _error_line(_run(f"--config={CONFIG}", "--workdir=" + tempfile.mkdtemp(),
                            "--config.optimizer.lrr=0.1"))
    self.assertStartsWith(line, "error: unknown config field 'optimizer.lrr'; valid names under "
                          "'optimizer': [")
    self.assertIn("'lr'", line)

  def test_missing_config_file(self):
    line = _error_line(_run("--config=configs/nope.py:runlocal",
                            "--workdir=" + tempfile.mkdtemp()))
    self.assertStartsWith(line, "error: config file 'configs/nope.py' not found; configs: [")
    self.assertIn("'configs/digits_lora.py'", line)

  def test_workdir_is_a_file(self):
    path = os.path.join(tempfile.mkdtemp(), "file")
    open(path, "w").close()
    line = _error_line(_run(f"--config={CONFIG}", f"--workdir={path}"))
    self.assertEqual(line, f"error: --workdir {path!r} is a file, not a directory")

  def test_workdir_below_a_file(self):
    path = os.path.join(tempfile.mkdtemp(), "file")
    open(path, "w").close()
    line = _error_line(_run(f"--config={CONFIG}", f"--workdir={path}/sub"))
    self.assertEqual(line, f"error: --workdir '{path}/sub' cannot be written: Not a directory")

  def test_workdir_cannot_be_created(self):
    line = _error_line(_run(f"--config={CONFIG}", "--workdir=/proc/lowrank_jax_run"))
    self.assertStartsWith(line, "error: --workdir '/proc/lowrank_jax_run' cannot be written: ")

  def test_read_only_workdir(self):
    path = tempfile.mkdtemp()
    os.chmod(path, 0o500)
    if os.access(path, os.W_OK):
      # Root writes through permission bits; sysfs directories refuse new files even to root.
      path = "/sys/kernel"
    line = _error_line(_run(f"--config={CONFIG}", f"--workdir={path}"))
    self.assertEqual(line, f"error: --workdir {path!r} cannot be written: Permission denied")

  def test_bad_targets_literal(self):
    line = _error_line(_run(f"--config={CONFIG}", "--workdir=" + tempfile.mkdtemp(),
                            "--config.adapter.targets=['a', 1]"))
    self.assertIn("every target must be a string regex", line)


class ListTest(absltest.TestCase):

  def test_list_shows_configs_args_and_registered_names(self):
    out = _run("--list")
    self.assertEqual(out.returncode, 0, out.stderr[-2000:])
    lines = out.stdout.splitlines()
    self.assertIn("  configs/digits_lora.py  Args (after `:`): method (lora), rank (4), seed (0), "
                  "steps (300), runlocal (False: 30 steps).", lines)
    by_key = dict(l.split(": ", 1) for l in lines if not l.startswith(" ") and ": " in l)
    self.assertContainsSubset({"lora", "pissa", "adalora", "none"}, by_key["methods"].split(", "))
    self.assertContainsSubset({"mlp_digits", "minilm"}, by_key["models"].split(", "))
    self.assertContainsSubset({"digits", "fashion_mnist", "wordnet_supersense"},
                              by_key["datasets"].split(", "))


class TargetsTest(absltest.TestCase):

  def test_list_literal_reaches_the_adapter(self):
    line = _error_line(_run(f"--config={CONFIG}", "--workdir=" + tempfile.mkdtemp(),
                            '--config.adapter.targets=["dense_0/kernel", "nomatch/kernel"]'))
    self.assertIn("nomatch/kernel", line)

  def test_unparsable_literal(self):
    line = _error_line(_run(f"--config={CONFIG}", "--workdir=" + tempfile.mkdtemp(),
                            "--config.adapter.targets=[a/kernel"))
    self.assertIn("is not a list literal of regexes", line)


class QuietRunTest(absltest.TestCase):
  """One short run with `adapter.targets` set on the command line."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.workdir = tempfile.mkdtemp()
    cls.out = _run(f"--config={CONFIG}", f"--workdir={cls.workdir}", "--config.total_steps=2",
                   "--config.adapter.targets=dense_0/k.*")

  def test_targets_override_reaches_the_run(self):
    self.assertEqual(self.out.returncode, 0, self.out.stderr[-2000:])
    with open(os.path.join(self.workdir, "results.json")) as f:
      self.assertEqual(json.load(f)["config"]["adapter"]["targets"], ["dense_0/k.*"])

  def test_third_party_info_goes_to_the_log_file(self):
    self.assertEqual(self.out.returncode, 0, self.out.stderr[-2000:])
    with open(os.path.join(self.workdir, "run.log")) as f:
      log = f.read()
    self.assertIn("orbax", log.lower())
    self.assertNotIn("orbax", self.out.stderr.lower())
    self.assertNotIn("config:", self.out.stderr)
    self.assertIn("eval accuracy", self.out.stdout)


def _finished_sweep(unfinished=()):
  """A sweep directory whose points lora and dora are finished (hand-written results.json); the
  `unfinished` methods are points that fail when run."""
  wd = tempfile.mkdtemp()
  config = os.path.join(wd, "sweep_config.py")
  with open(config, "w") as f:
    f.write(_SWEEP_CONFIG.format(methods=["lora", "dora", *unfinished]))
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

  def test_failed_point_keeps_the_others_and_reports(self):
    config, wd = _finished_sweep(unfinished=["bad"])
    with self.assertRaisesRegex(ValueError, r"1 point\(s\) failed: \['method-bad'\]; results.csv "
                                r"and the plots hold the 2 finished point\(s\)"):
      sweep.run_sweep(config, wd)
    self.assertEqual(sorted(_csv_rows(wd)), ["method-dora", "method-lora"])

  def test_results_csv_written_atomically(self):
    config, wd = _finished_sweep()
    sweep.run_sweep(config, wd)
    self.assertFalse(os.path.exists(os.path.join(wd, "results.csv.tmp")))
    self.assertLen(_csv_rows(wd), 2)


if __name__ == "__main__":
  absltest.main()
