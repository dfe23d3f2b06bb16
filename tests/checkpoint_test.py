"""Checkpoints: workdir config guard, orbax save/restore, and resuming to identical parameters."""
import json
import os
import shutil
import tempfile

from absl.testing import absltest
import chex
import jax
import jax.numpy as jnp
import numpy as np

from configs import digits_lora
from lowrank_jax import adapter_io
from lowrank_jax import checkpoint as ckpt_lib
from lowrank_jax import metrics as metrics_lib
from lowrank_jax import train


class WorkdirConfigTest(absltest.TestCase):

  def test_same_config_resumes_different_refused(self):
    wd = tempfile.mkdtemp()
    self.assertFalse(ckpt_lib.check_workdir_config(wd, {"a": 1, "b": {"c": 2}}))
    self.assertTrue(ckpt_lib.check_workdir_config(wd, {"a": 1, "b": {"c": 2}}))
    # Fields that do not change results may differ.
    self.assertTrue(ckpt_lib.check_workdir_config(wd, {"a": 1, "b": {"c": 2}, "progress": False}))
    with self.assertRaisesRegex(ckpt_lib.ConfigMismatchError,
                                r"different config \(differences: \['b.c: 2 -> 3'\]\).*overwrite"):
      ckpt_lib.check_workdir_config(wd, {"a": 1, "b": {"c": 3}})

  def test_overwrite_clears(self):
    wd = tempfile.mkdtemp()
    ckpt_lib.check_workdir_config(wd, {"a": 1})
    os.makedirs(os.path.join(wd, "ckpt", "5"))
    self.assertFalse(ckpt_lib.check_workdir_config(wd, {"a": 2}, overwrite=True))
    self.assertFalse(os.path.exists(os.path.join(wd, "ckpt")))
    with open(os.path.join(wd, ckpt_lib.CONFIG_FILE)) as f:
      self.assertEqual(json.load(f), {"a": 2})


class CheckpointerTest(absltest.TestCase):

  def test_save_restore(self):
    wd = tempfile.mkdtemp()
    state = {"adapter": {"a": jnp.arange(6.0).reshape(2, 3)}, "step": jnp.int32(4),
             "rng": jax.random.key_data(jax.random.key(7)), "opt": (jnp.zeros(2), {})}
    ck = ckpt_lib.Checkpointer(wd, every=2, keep=2)
    self.assertFalse(ck.maybe_save(3, state, {"next_index": 3}))
    for step in (2, 4, 6):
      self.assertTrue(ck.maybe_save(step, state, {"next_index": step}))
    ck.wait()
    self.assertEqual(ck.latest_step(), 6)
    restored, data_state, step = ck.restore(ckpt_lib.abstract_like(state))
    ck.close()
    self.assertEqual((step, data_state), (6, {"next_index": 6}))
    chex.assert_trees_all_equal(restored, state)
    self.assertEqual(sorted(os.listdir(os.path.join(wd, "ckpt"))), ["4", "6"])


class ResumeTest(absltest.TestCase):

  def test_resume_gives_identical_parameters(self):
    """Drop the final checkpoint of a finished run, rerun: it resumes mid-way, ends identical."""
    c = digits_lora.get_config("runlocal")
    c.total_steps, c.ckpt_every, c.eval_every, c.keep_ckpts, c.progress = 16, 5, 0, 5, False
    wd = tempfile.mkdtemp()
    r1 = train.train_and_evaluate(c, wd)
    full, _, head_full = adapter_io.load_adapter(r1["adapter_path"])
    shutil.rmtree(os.path.join(wd, "ckpt", "16"))
    shutil.rmtree(os.path.join(wd, "ckpt", "15"))
    os.remove(os.path.join(wd, train.RESULTS_FILE))
    r2 = train.train_and_evaluate(c, wd)
    self.assertEqual(r2["resumed_from"], 10)
    resumed, _, head_resumed = adapter_io.load_adapter(r2["adapter_path"])
    jax.tree.map(np.testing.assert_array_equal, full.trainable, resumed.trainable)
    jax.tree.map(np.testing.assert_array_equal, head_full, head_resumed)
    self.assertEqual(r1["accuracy"], r2["accuracy"])
    steps = [m["step"] for m in metrics_lib.read_jsonl(os.path.join(wd, "metrics.jsonl"))
             if "loss" in m]
    self.assertEqual(steps, sorted(set(steps)))   # no duplicated steps after resuming
    r3 = train.train_and_evaluate(c, wd)           # finished: reported, not retrained
    self.assertEqual((r3["accuracy"], r3["resumed_from"]), (r2["accuracy"], 10))


if __name__ == "__main__":
  absltest.main()
