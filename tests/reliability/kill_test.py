"""SIGKILL in the middle of a write: during an (asynchronous) checkpoint write, half-way through the
adapter file, and half-way through results.json. After each kill the same command resumes, the
run ends bitwise identical to an uninterrupted one, and the workdir holds no partial or temporary
file."""
import glob
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import safetensors.numpy

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = ["--config=configs/digits_lora.py:runlocal", "--config.total_steps=60",
        "--config.ckpt_every=20", "--config.keep_ckpts=3", "--config.eval_every=0",
        "--config.log_every=50", "--config.progress=False"]

# Runs experiments.run with one write made fatal: KILL_AT=ckpt:<step> kills the process right
# after the checkpoint save of that step starts (its files are being written in the background);
# KILL_AT=<file name> writes half of that file's bytes to its temporary path, then kills.
DRIVER = """
import builtins, os, signal, sys
import orbax.checkpoint as ocp
kill_at = os.environ["KILL_AT"]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if kill_at.startswith("ckpt:"):
  step_to_kill, save = int(kill_at[5:]), ocp.CheckpointManager.save
  def killing_save(self, step, *a, **k):
    out = save(self, step, *a, **k)
    if step == step_to_kill:
      die()
    return out
  ocp.CheckpointManager.save = killing_save
else:
  real_open = builtins.open
  class HalfFile:
    def __init__(self, f):
      self.f = f
    def write(self, data):
      self.f.write(data[:len(data) // 2])
      self.f.flush()
      os.fsync(self.f.fileno())
      die()
    def __enter__(self):
      return self
    def __exit__(self, *exc):
      return self.f.__exit__(*exc)
    def __getattr__(self, name):
      return getattr(self.f, name)
  def killing_open(file, mode="r", *a, **k):
    f = real_open(file, mode, *a, **k)
    name = os.path.basename(str(file))
    if "w" in mode and name.startswith(kill_at + ".tmp"):
      return HalfFile(f)
    return f
  builtins.open = killing_open
  import safetensors.numpy as stn
  def killing_save_file(arrays, path, metadata=None):
    with open(path, "wb") as f:
      f.write(stn.save(arrays, metadata=metadata))
  stn.save_file = killing_save_file
from absl import app
from experiments import run
sys.argv = ["run"] + sys.argv[1:]
app.run(run.main)
"""


def _run(workdir, kill_at=None):
  env = dict(os.environ)
  env.pop("LOWRANK_JAX_TRACEBACK", None)
  if kill_at:
    cmd = [sys.executable, "-c", DRIVER, *ARGS, f"--workdir={workdir}"]
    env["KILL_AT"] = kill_at
  else:
    cmd = [sys.executable, "-m", "experiments.run", *ARGS, f"--workdir={workdir}"]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _files(workdir):
  return sorted(os.path.relpath(p, workdir)
                for p in glob.glob(os.path.join(workdir, "**"), recursive=True))


def _adapter(workdir):
  return safetensors.numpy.load_file(os.path.join(workdir, "adapter", "adapter.safetensors"))


def test_kill_during_each_write_then_resume_is_bitwise_identical():
  ref, wd = tempfile.mkdtemp(), tempfile.mkdtemp()
  out = _run(ref)
  assert out.returncode == 0, out.stderr[-3000:]

  for kill_at, resumed_from in (("ckpt:40", 20), ("adapter.safetensors", 60),
                                ("results.json", 60)):
    out = _run(wd, kill_at)
    assert out.returncode == -9, (kill_at, out.returncode, out.stderr[-3000:])
    out = _run(wd)
    assert out.returncode == 0, (kill_at, out.stderr[-3000:])
    assert f"Resumed from the checkpoint at step {resumed_from}" in out.stderr, (
        kill_at, out.stderr[-3000:])
    leftovers = [f for f in _files(wd) if ".tmp" in f or "tmp-" in f]
    assert not leftovers, (kill_at, leftovers)
    a, b = _adapter(ref), _adapter(wd)
    assert sorted(a) == sorted(b)
    for name in a:
      assert a[name].tobytes() == b[name].tobytes(), (kill_at, name)
    with open(os.path.join(wd, "results.json")) as f:
      results = json.load(f)
    with open(os.path.join(ref, "results.json")) as f:
      np.testing.assert_array_equal(results["eval_loss"], json.load(f)["eval_loss"])
    # The next kill needs a run that is not finished yet.
    for name in ("results.json", "adapter"):
      subprocess.run(["rm", "-rf", os.path.join(wd, name)], check=True)
