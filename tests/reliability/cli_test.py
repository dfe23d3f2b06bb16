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

import pytest

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


def test_unknown_top_level_field_lists_valid_names():
  line = _error_line(_run(f"--config={CONFIG}", "--workdir=" + tempfile.mkdtemp(),
                          "--config.foo=1"))
  assert line.startswith("error: unknown config field 'foo'; valid names: ['adapter', ")
  assert "'total_steps'" in line


def test_unknown_nested_field_lists_names_at_its_level():
  line = _error_line(_run(f"--config={CONFIG}", "--workdir=" + tempfile.mkdtemp(),
                          "--config.optimizer.lrr=0.1"))
  assert line.startswith("error: unknown config field 'optimizer.lrr'; valid names under "
                         "'optimizer': [")
  assert "'lr'" in line


def test_missing_config_file():
  line = _error_line(_run("--config=configs/nope.py:runlocal",
                          "--workdir=" + tempfile.mkdtemp()))
  assert line.startswith("error: config file 'configs/nope.py' not found; configs: [")
  assert "'configs/digits_lora.py'" in line


def test_workdir_is_a_file():
  path = os.path.join(tempfile.mkdtemp(), "file")
  open(path, "w").close()
  line = _error_line(_run(f"--config={CONFIG}", f"--workdir={path}"))
  assert line == f"error: --workdir {path!r} is a file, not a directory"


def test_workdir_below_a_file():
  path = os.path.join(tempfile.mkdtemp(), "file")
  open(path, "w").close()
  line = _error_line(_run(f"--config={CONFIG}", f"--workdir={path}/sub"))
  assert line == f"error: --workdir '{path}/sub' cannot be written: Not a directory"


def test_workdir_cannot_be_created():
  line = _error_line(_run(f"--config={CONFIG}", "--workdir=/proc/lowrank_jax_run"))
  assert line.startswith("error: --workdir '/proc/lowrank_jax_run' cannot be written: ")


def test_read_only_workdir():
  path = tempfile.mkdtemp()
  os.chmod(path, 0o500)
  if os.access(path, os.W_OK):
    # Root writes through permission bits; sysfs directories refuse new files even to root.
    path = "/sys/kernel"
  line = _error_line(_run(f"--config={CONFIG}", f"--workdir={path}"))
  assert line == f"error: --workdir {path!r} cannot be written: Permission denied"


def test_bad_targets_literal():
  line = _error_line(_run(f"--config={CONFIG}", "--workdir=" + tempfile.mkdtemp(),
                          "--config.adapter.targets=['a', 1]"))
  assert "every target must be a string regex" in line


def test_list_shows_configs_args_and_registered_names():
  out = _run("--list")
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.splitlines()
  assert ("  configs/digits_lora.py  Args (after `:`): method (lora), rank (4), seed (0), "
          "steps (300), runlocal (False: 30 steps).") in lines
  by_key = dict(l.split(": ", 1) for l in lines if not l.startswith(" ") and ": " in l)
  assert {"lora", "pissa", "adalora", "none"} <= set(by_key["methods"].split(", "))
  assert {"mlp_digits", "minilm"} <= set(by_key["models"].split(", "))
  assert ({"digits", "fashion_mnist", "wordnet_supersense"}
          <= set(by_key["datasets"].split(", ")))


def test_list_literal_reaches_the_adapter():
  line = _error_line(_run(f"--config={CONFIG}", "--workdir=" + tempfile.mkdtemp(),
                          '--config.adapter.targets=["dense_0/kernel", "nomatch/kernel"]'))
  assert "nomatch/kernel" in line


def test_unparsable_literal():
  line = _error_line(_run(f"--config={CONFIG}", "--workdir=" + tempfile.mkdtemp(),
                          "--config.adapter.targets=[a/kernel"))
  assert "is not a list literal of regexes" in line


@pytest.fixture(scope="module")
def quiet_run():
  """One short run with `adapter.targets` set on the command line: (workdir, completed process)."""
  workdir = tempfile.mkdtemp()
  out = _run(f"--config={CONFIG}", f"--workdir={workdir}", "--config.total_steps=2",
             "--config.adapter.targets=dense_0/k.*")
  return workdir, out


def test_targets_override_reaches_the_run(quiet_run):
  workdir, out = quiet_run
  assert out.returncode == 0, out.stderr[-2000:]
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["config"]["adapter"]["targets"] == ["dense_0/k.*"]


def test_third_party_info_goes_to_the_log_file(quiet_run):
  workdir, out = quiet_run
  assert out.returncode == 0, out.stderr[-2000:]
  with open(os.path.join(workdir, "run.log")) as f:
    log = f.read()
  assert "orbax" in log.lower()
  assert "orbax" not in out.stderr.lower()
  assert "config:" not in out.stderr
  assert "eval accuracy" in out.stdout


def test_progress_shows_the_compile_before_the_first_step(quiet_run):
  _, out = quiet_run
  lines = out.stderr.splitlines()
  compiling = [i for i, l in enumerate(lines) if "0/2 compiling the train step..." in l]
  first_step = [i for i, l in enumerate(lines) if " 2/2 loss=" in l]
  assert compiling and first_step and compiling[0] < first_step[0], out.stderr[-2000:]


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


def test_only_subset_keeps_every_finished_point():
  config, wd = _finished_sweep()
  sweep.run_sweep(config, wd, only="lora")
  rows = _csv_rows(wd)
  assert sorted(rows) == ["method-dora", "method-lora"]
  assert rows["method-dora"]["accuracy"] == "0.5"
  assert rows["method-lora"]["accuracy"] == "0.75"


def test_only_matching_nothing_is_an_error_and_keeps_results():
  config, wd = _finished_sweep()
  sweep.run_sweep(config, wd)
  with open(os.path.join(wd, "results.csv")) as f:
    before = f.read()
  with pytest.raises(ValueError, match=r"--only 'nomatch' matches no point; points: "
                                       r"\['method-lora', 'method-dora'\]"):
    sweep.run_sweep(config, wd, only="nomatch")
  with open(os.path.join(wd, "results.csv")) as f:
    assert f.read() == before


def test_only_invalid_regex_is_an_error():
  config, wd = _finished_sweep()
  with pytest.raises(ValueError, match=r"--only '\(' is not a valid regex"):
    sweep.run_sweep(config, wd, only="(")


def test_stale_plot_is_removed():
  config, wd = _finished_sweep()
  stale = os.path.join(wd, "rank_allocation.png")   # no point logged ranks.jsonl
  with open(stale, "wb") as f:
    f.write(b"stale")
  sweep.run_sweep(config, wd, only="dora")
  assert not os.path.exists(stale)
  for name in ("accuracy_vs_params.png", "loss_curves.png"):
    assert os.path.exists(os.path.join(wd, name)), name


def test_failed_point_keeps_the_others_and_reports():
  config, wd = _finished_sweep(unfinished=["bad"])
  with pytest.raises(ValueError, match=r"1 point\(s\) failed: \['method-bad'\]; results.csv "
                                       r"and the plots hold the 2 finished point\(s\)"):
    sweep.run_sweep(config, wd)
  assert sorted(_csv_rows(wd)) == ["method-dora", "method-lora"]


def test_results_csv_written_atomically():
  config, wd = _finished_sweep()
  sweep.run_sweep(config, wd)
  assert not os.path.exists(os.path.join(wd, "results.csv.tmp"))
  assert len(_csv_rows(wd)) == 2
