"""End-to-end tests of `python -m experiments.run` / `experiments.sweep` as real subprocesses.

The resume test kills a run with SIGKILL after its first checkpoint and checks that rerunning it
in the same workdir ends with parameters bitwise equal to an uninterrupted run (CPU).
"""
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import safetensors.numpy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/digits_lora.py:runlocal"
LONG = ["--config.total_steps=200", "--config.ckpt_every=20", "--config.keep_ckpts=3",
        "--config.eval_every=0", "--config.log_every=50"]


def _cmd(workdir, *extra, config=CONFIG):
  return [sys.executable, "-m", "experiments.run", f"--config={config}", f"--workdir={workdir}",
          *extra]


def _env(**kw):
  env = dict(os.environ)
  env.pop("LOWRANK_JAX_TRACEBACK", None)
  env.update(kw)
  return env


def _run(cmd, **kw):
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env(),
                        **kw)


def _adapter_arrays(workdir):
  return safetensors.numpy.load_file(os.path.join(workdir, "adapter", "adapter.safetensors"))


def test_kill_and_resume_is_bitwise_identical():
  ref, wd = tempfile.mkdtemp(), tempfile.mkdtemp()
  out = _run(_cmd(ref, *LONG))
  assert out.returncode == 0, out.stderr[-3000:]
  assert "eval accuracy" in out.stdout

  proc = subprocess.Popen(_cmd(wd, *LONG), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  first = os.path.join(wd, "ckpt", "20")
  deadline = time.time() + 240
  while not os.path.isdir(first) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert os.path.isdir(first), "no checkpoint was written before the kill"
  assert not os.path.exists(os.path.join(wd, "results.json")), (
      "the run finished before it could be killed; make it longer")

  out = _run(_cmd(wd, *LONG))
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Resumed from the checkpoint at step" in out.stderr
  a, b = _adapter_arrays(ref), _adapter_arrays(wd)
  assert sorted(a) == sorted(b)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert a[name].tobytes() == b[name].tobytes(), name


def test_bad_input_messages():
  wd = tempfile.mkdtemp()
  out = _run(_cmd(wd, "--config.optimizer.lrr=0.1"))
  assert out.returncode != 0
  assert "lrr" in out.stderr

  out = _run(_cmd(wd, "--config.adapter.method=nope"))
  assert out.returncode == 1
  assert "Unknown adapter method 'nope'; valid names: [" in out.stderr
  assert "Traceback" not in out.stderr

  out = _run(_cmd(wd, "--config.total_steps=4", "--config.progress=False"))
  assert out.returncode == 0, out.stderr[-3000:]
  out = _run(_cmd(wd, "--config.total_steps=4", "--config.seed=1"))
  assert out.returncode == 1
  assert "holds a run of a different config" in out.stderr
  assert "seed: 0 -> 1" in out.stderr
  out = _run(_cmd(wd, "--config.total_steps=4", "--config.seed=1", "--overwrite"))
  assert out.returncode == 0, out.stderr[-3000:]

  out = _run(_cmd(wd, config="configs/digits_lora.py:rnak=2"))
  assert out.returncode != 0
  assert "Unhandled config arg 'rnak'" in out.stderr


def test_two_device_data_parallel():
  wd = tempfile.mkdtemp()
  env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=2")
  out = subprocess.run(_cmd(wd, "--config.total_steps=6", "--config.progress=False"), cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "eval accuracy" in out.stdout


def test_sweep_runs_skips_and_plots():
  wd = tempfile.mkdtemp()
  cmd = [sys.executable, "-m", "experiments.sweep", "--config=configs/digits_lora.py",
         f"--workdir={wd}"]
  out = _run(cmd)
  assert out.returncode == 0, out.stderr[-3000:]
  for f in ("results.csv", "accuracy_vs_params.png", "loss_curves.png"):
    assert os.path.exists(os.path.join(wd, f)), f
  with open(os.path.join(wd, "results.csv")) as f:
    lines = f.read().splitlines()
  assert len(lines) == 3   # header + 2 points
  assert lines[0].startswith("name,method,rank,seed,accuracy")
  out = _run(cmd)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.count("finished, skipped") == 2

