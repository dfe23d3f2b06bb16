"""Checkpoints: workdir config guard, orbax save/restore, and resuming to identical parameters."""
import json
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits_lora
from lowrank_jax import adapter_io
from lowrank_jax import checkpoint as ckpt_lib
from lowrank_jax import metrics as metrics_lib
from lowrank_jax import train


def test_same_config_resumes_different_refused(tmp_path):
  wd = str(tmp_path)
  assert not ckpt_lib.check_workdir_config(wd, {"a": 1, "b": {"c": 2}})
  assert ckpt_lib.check_workdir_config(wd, {"a": 1, "b": {"c": 2}})
  # Fields that do not change results may differ.
  assert ckpt_lib.check_workdir_config(wd, {"a": 1, "b": {"c": 2}, "progress": False})
  with pytest.raises(ckpt_lib.ConfigMismatchError,
                     match=r"different config \(differences: \['b.c: 2 -> 3'\]\).*overwrite"):
    ckpt_lib.check_workdir_config(wd, {"a": 1, "b": {"c": 3}})


def test_overwrite_clears(tmp_path):
  wd = str(tmp_path)
  ckpt_lib.check_workdir_config(wd, {"a": 1})
  os.makedirs(os.path.join(wd, "ckpt", "5"))
  assert not ckpt_lib.check_workdir_config(wd, {"a": 2}, overwrite=True)
  assert not os.path.exists(os.path.join(wd, "ckpt"))
  with open(os.path.join(wd, ckpt_lib.CONFIG_FILE)) as f:
    assert json.load(f) == {"a": 2}


def test_save_restore(tmp_path):
  wd = str(tmp_path)
  state = {"adapter": {"a": jnp.arange(6.0).reshape(2, 3)}, "step": jnp.int32(4),
           "rng": jax.random.key_data(jax.random.key(7)), "opt": (jnp.zeros(2), {})}
  ck = ckpt_lib.Checkpointer(wd, every=2, keep=2)
  assert not ck.maybe_save(3, state, {"next_index": 3})
  for step in (2, 4, 6):
    assert ck.maybe_save(step, state, {"next_index": step})
  ck.wait()
  assert ck.latest_step() == 6
  restored, data_state, step = ck.restore(ckpt_lib.abstract_like(state))
  ck.close()
  assert (step, data_state) == (6, {"next_index": 6})
  chex.assert_trees_all_equal(restored, state)
  assert sorted(os.listdir(os.path.join(wd, "ckpt"))) == ["4", "6"]


def test_resume_gives_identical_parameters(tmp_path):
  """Drop the final checkpoint of a finished run, rerun: it resumes mid-way, ends identical."""
  c = digits_lora.get_config("runlocal")
  c.total_steps, c.ckpt_every, c.eval_every, c.keep_ckpts, c.progress = 16, 5, 0, 5, False
  wd = str(tmp_path)
  r1 = train.train_and_evaluate(c, wd)
  full, _, head_full = adapter_io.load_adapter(r1["adapter_path"])
  shutil.rmtree(os.path.join(wd, "ckpt", "16"))
  shutil.rmtree(os.path.join(wd, "ckpt", "15"))
  os.remove(os.path.join(wd, train.RESULTS_FILE))
  r2 = train.train_and_evaluate(c, wd)
  assert r2["resumed_from"] == 10
  resumed, _, head_resumed = adapter_io.load_adapter(r2["adapter_path"])
  jax.tree.map(np.testing.assert_array_equal, full.trainable, resumed.trainable)
  jax.tree.map(np.testing.assert_array_equal, head_full, head_resumed)
  assert r1["accuracy"] == r2["accuracy"]
  steps = [m["step"] for m in metrics_lib.read_jsonl(os.path.join(wd, "metrics.jsonl"))
           if "loss" in m]
  assert steps == sorted(set(steps))   # no duplicated steps after resuming
  r3 = train.train_and_evaluate(c, wd)           # finished: reported, not retrained
  assert (r3["accuracy"], r3["resumed_from"]) == (r2["accuracy"], 10)
