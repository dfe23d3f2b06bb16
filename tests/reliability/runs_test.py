"""Reliability of a run: values that cannot be meant are refused up front, overwrite leaves a clean
workdir, one run at a time per workdir, every file reported written is whole."""
import json
import os
import subprocess
import sys
import tempfile
from unittest import mock

import pytest

from configs import quickstart
from lowrank_jax import adapter_io
from lowrank_jax import checkpoint as ckpt_lib
from lowrank_jax import registry
from lowrank_jax import train
from tests.reliability.logs import warnings_logged

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from train_test import _config  # pylint: disable=g-import-not-at-top,wrong-import-position


def _dead_pid() -> int:
  """The pid of a process that has ended."""
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


# Range: each bad value: one ValueError naming the field and its valid range, before any work.

_BAD_VALUES = [
    ("lr_negative", "optimizer.lr", -1e-3, r"optimizer\.lr=-0\.001 is out of range; valid: "
                                           r"\(0\.0, 10\.0\]"),
    ("lr_zero", "optimizer.lr", 0.0, r"optimizer\.lr=0\.0 is out of range; valid: \(0\.0"),
    ("lr_absurd", "optimizer.lr", 1e3, r"optimizer\.lr=1000\.0 is out of range"),
    ("lr_nan", "optimizer.lr", float("nan"), r"optimizer\.lr must be a finite number"),
    ("head_lr_inf", "optimizer.head_lr", float("inf"), r"optimizer\.head_lr must be a finite "
                                                       r"number, got inf"),
    ("head_lr_negative", "optimizer.head_lr", -1.0, r"optimizer\.head_lr=-1\.0 is out of range"),
    ("keep_ckpts_zero", "keep_ckpts", 0, r"keep_ckpts=0 is out of range; valid: \[1, inf\]"),
    ("eval_every_negative", "eval_every", -1, r"config\.eval_every=-1 is out of range; valid: "
                                              r"\[0, inf\]"),
    ("log_every_negative", "log_every", -5, r"config\.log_every=-5 is out of range"),
    ("ckpt_every_negative", "ckpt_every", -2, r"config\.ckpt_every=-2 is out of range"),
    ("eval_batch_zero", "eval_batch_size", 0, r"config\.eval_batch_size=0 is out of range; "
                                              r"valid: \[1, inf\]"),
    ("nonfinite_unknown", "nonfinite", "ignore", r"config\.nonfinite='ignore'; valid: "
                                                 r"\['stop', 'skip'\]"),
]


@pytest.mark.parametrize("field,value,message", [b[1:] for b in _BAD_VALUES],
                         ids=[b[0] for b in _BAD_VALUES])
def test_refused_before_any_work(field, value, message):
  wd = os.path.join(tempfile.mkdtemp(), "run")
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(_config(**{field: value}), wd)
  assert not os.path.exists(wd)   # nothing created, nothing to refuse later


def test_seq_len_beyond_the_model_positions():
  c = quickstart.get_config("runlocal")
  c.model.name = "minilm_tiny"
  c.dataset.seq_len = 4096
  with pytest.raises(ValueError, match=r"dataset\.seq_len=4096 exceeds the 128 positions of "
                                       r"model 'minilm_tiny'; valid: 0 < seq_len <= 128"):
    train.check_config(c)


def test_export_the_method_cannot_do():
  method = next(m for m in registry.list_methods() if not registry.facts(m).peft_exportable)
  c = quickstart.get_config("runlocal")
  c.model.name = "minilm_tiny"
  c.adapter.method, c.export_peft = method, True
  with pytest.raises(ValueError, match=f"export_peft=True: method '{method}' has no PEFT "
                                       f"layout; exportable methods: .*'lora'"):
    train.check_config(c)


def test_export_the_model_cannot_do():
  with pytest.raises(ValueError, match=r"export_peft=True: model 'mlp_digits' has no "
                                       r"Hugging Face checkpoint"):
    train.check_config(_config(export_peft=True))


# Workdir.

def test_workdir_that_is_a_file():
  path = os.path.join(tempfile.mkdtemp(), "results")
  open(path, "w").close()
  with pytest.raises(ValueError, match=f"workdir {path} is a file, not a directory"):
    train.train_and_evaluate(_config(total_steps=2), path)


def test_workdir_under_a_file():
  path = os.path.join(tempfile.mkdtemp(), "results")
  open(path, "w").close()
  with pytest.raises(ValueError, match=f"workdir {path}/run cannot be written \\(Not a "
                                       f"directory\\); pass a writable directory"):
    train.train_and_evaluate(_config(total_steps=2), os.path.join(path, "run"))


def test_overwrite_leaves_a_clean_workdir_and_keeps_the_users_files():
  wd = tempfile.mkdtemp()
  train.train_and_evaluate(_config(total_steps=4, eval_every=0), wd)
  for d in ("peft", "hf"):   # exports an earlier run of another config wrote
    os.makedirs(os.path.join(wd, d))
    with open(os.path.join(wd, d, "adapter_model.safetensors"), "w") as f:
      f.write("old")
  with open(os.path.join(wd, "notes.txt"), "w") as f:
    f.write("mine")
  with warnings_logged() as logs:
    r = train.train_and_evaluate(_config(total_steps=6, eval_every=0, overwrite=True), wd)
  assert r["resumed_from"] == 0
  assert sorted(os.listdir(wd)) == sorted(
      ["adapter", "ckpt", "config.json", "metrics.jsonl", "notes.txt", "results.json", "tb"])
  assert sorted(os.listdir(os.path.join(wd, "ckpt"))) == ["6"]
  with open(os.path.join(wd, "notes.txt")) as f:
    assert f.read() == "mine"
  removed = [m for m in logs if "Removed the previous run's" in m]
  assert len(removed) == 1
  for name in ("ckpt", "peft", "hf", "adapter", "metrics.jsonl", "results.json", "tb"):
    assert f"'{name}'" in removed[0]
  assert "notes.txt" not in removed[0]


def test_overwrite_of_the_same_config_starts_anew():
  wd = tempfile.mkdtemp()
  train.train_and_evaluate(_config(total_steps=4, eval_every=0), wd)
  with warnings_logged() as logs:
    r = train.train_and_evaluate(_config(total_steps=4, eval_every=0, overwrite=True), wd)
  assert r["resumed_from"] == 0   # trained again, not reported as finished nor resumed
  assert any("Overwriting the run in" in m and "same config" in m for m in logs), logs
  assert sorted(os.listdir(os.path.join(wd, "ckpt"))) == ["4"]


def test_temporaries_of_a_killed_run_are_removed_and_others_kept():
  wd = tempfile.mkdtemp()
  dead, alive = _dead_pid(), os.getppid()
  made = {f"results.json.tmp{dead}": "file", f"hf.tmp{dead}": "dir",
          f"adapter/adapter.safetensors.tmp{dead}": "file",
          f"adapter/adapter_config.json.tmp{alive}": "file",   # a live writer's: kept
          f"notes.tmp{dead}": "file",                           # not a run file: kept
          "adapter/adapter.safetensors": "file"}
  for rel, kind in made.items():
    p = os.path.join(wd, rel)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    if kind == "dir":
      os.makedirs(os.path.join(p, "sub"))
    else:
      open(p, "w").close()
  with warnings_logged() as logs, ckpt_lib.workdir_lock(wd):
    pass
  assert not os.path.exists(os.path.join(wd, f"results.json.tmp{dead}"))
  assert not os.path.exists(os.path.join(wd, f"hf.tmp{dead}"))
  assert not os.path.exists(os.path.join(wd, f"adapter/adapter.safetensors.tmp{dead}"))
  for kept in (f"adapter/adapter_config.json.tmp{alive}", f"notes.tmp{dead}",
               "adapter/adapter.safetensors"):
    assert os.path.exists(os.path.join(wd, kept)), kept
  assert len([m for m in logs if "Removed temporary files a killed run left" in m]) == 1


def test_different_config_without_overwrite_is_refused():
  wd = tempfile.mkdtemp()
  train.train_and_evaluate(_config(total_steps=4, eval_every=0), wd)
  with pytest.raises(ckpt_lib.ConfigMismatchError, match=r"total_steps: 4 -> 5"):
    train.train_and_evaluate(_config(total_steps=5, eval_every=0), wd)


def test_second_run_on_a_workdir_in_use_is_refused():
  wd = tempfile.mkdtemp()
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    with open(os.path.join(wd, ckpt_lib.LOCK_FILE), "w") as f:
      f.write(str(holder.pid))
    with pytest.raises(RuntimeError, match=f"a run is already running, pid {holder.pid}"):
      train.train_and_evaluate(_config(total_steps=2, eval_every=0), wd)
    assert os.listdir(wd) == [ckpt_lib.LOCK_FILE]   # the other run's lock is kept
  finally:
    holder.kill()
    holder.wait()


def _assert_stale_lock_recovered(content: str):
  wd = tempfile.mkdtemp()
  with open(os.path.join(wd, ckpt_lib.LOCK_FILE), "w") as f:
    f.write(content)
  with warnings_logged() as logs:
    r = train.train_and_evaluate(_config(total_steps=2, eval_every=0), wd)
  assert r["steps"] == 2
  assert any("stale lock" in m and f"of pid {content or '?'} " in m for m in logs)
  assert [n for n in os.listdir(wd) if n.startswith(ckpt_lib.LOCK_FILE)] == []


def test_stale_lock_of_a_dead_run_is_recovered():
  _assert_stale_lock_recovered(str(_dead_pid()))


def test_lock_of_this_pid_is_stale():   # a restarted container reuses pids
  _assert_stale_lock_recovered(str(os.getpid()))


def test_empty_lock_is_stale():
  _assert_stale_lock_recovered("")


def test_lock_is_released_when_a_run_fails():
  wd = tempfile.mkdtemp()
  with mock.patch.object(train, "save_outputs", side_effect=OSError("disk full")):
    with pytest.raises(OSError, match="disk full"):
      train.train_and_evaluate(_config(total_steps=2, eval_every=0), wd)
  assert not os.path.exists(os.path.join(wd, ckpt_lib.LOCK_FILE))
  r = train.train_and_evaluate(_config(total_steps=2, eval_every=0), wd)   # resumes
  assert r["resumed_from"] == 2


# Atomic writes.

def test_atomic_path_keeps_the_old_file_when_the_write_fails():
  path = os.path.join(tempfile.mkdtemp(), "export.json")
  with open(path, "w") as f:
    f.write("old")
  with pytest.raises(OSError, match="killed"):
    with adapter_io.atomic_path(path) as tmp, open(tmp, "w") as f:
      f.write("half")
      raise OSError("killed")
  with open(path) as f:
    assert f.read() == "old"
  assert os.listdir(os.path.dirname(path)) == ["export.json"]


def test_results_json_is_whole_or_the_old_one():
  wd = tempfile.mkdtemp()
  r = train.train_and_evaluate(_config(total_steps=2, eval_every=0), wd)
  path = os.path.join(wd, train.RESULTS_FILE)
  real_dump = json.dump

  def results_half_then_fail(obj, f, **kw):
    if "accuracy" not in obj:   # other JSON files are written normally
      return real_dump(obj, f, **kw)
    f.write('{"steps": ')
    raise OSError("killed mid-write")
  # Not reported as finished: the run restores its last checkpoint and writes its results again.
  with mock.patch.object(train, "finished_results", return_value=None), \
      mock.patch.object(json, "dump", side_effect=results_half_then_fail):
    with pytest.raises(OSError, match="killed mid-write"):
      train.train_and_evaluate(_config(total_steps=2, eval_every=0), wd)
  with open(path) as f:
    assert json.load(f)["accuracy"] == r["accuracy"]   # the old file, whole
  assert [n for n in os.listdir(wd) if ".tmp" in n] == []


def test_adapter_files_are_whole_or_the_old_ones():
  wd = tempfile.mkdtemp()
  r = train.train_and_evaluate(_config(total_steps=2, eval_every=0), wd)
  path = r["adapter_path"]
  old = {n: open(os.path.join(path, n), "rb").read() for n in os.listdir(path)}
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  def write_half_then_fail(arrays, filename, metadata=None):
    with open(filename, "wb") as f:
      f.write(b"\x00" * 10)
    raise OSError("killed mid-write")
  state, meta, head = adapter_io.load_adapter(path)
  with mock.patch.object(safetensors.numpy, "save_file", side_effect=write_half_then_fail):
    with pytest.raises(OSError, match="killed mid-write"):
      adapter_io.save_adapter(path, state, meta, head=head)
  assert {n: open(os.path.join(path, n), "rb").read() for n in os.listdir(path)} == old
