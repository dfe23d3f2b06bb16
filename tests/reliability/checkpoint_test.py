"""Reliability of checkpoints: a damaged latest checkpoint is skipped (the run resumes from the
newest intact one, bitwise as if nothing had happened), and a NaN/Inf loss stops the run keeping
the last good checkpoint or skips the update."""
import os
import shutil
import sys
import tempfile
from unittest import mock

import numpy as np
import orbax.checkpoint as ocp
import pytest

from lowrank_jax import checkpoint as ckpt_lib
from lowrank_jax import metrics as metrics_lib
from lowrank_jax import train
from tests.reliability.logs import warnings_logged

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from train_test import _config  # pylint: disable=g-import-not-at-top,wrong-import-position


def _ckpt_config(**kw):
  return _config(**{"eval_every": 0, "ckpt_every": 4, "keep_ckpts": 3, **kw})


def _largest_array_file(step_dir: str) -> str:
  files = [os.path.join(r, n) for r, _, ns in os.walk(os.path.join(step_dir, "state")) for n in ns
           if os.sep + "d" + os.sep in os.path.join(r, n)]
  return max(files, key=os.path.getsize)


class _NanBatchAt:
  """The train iterator, with the image of its `bad`-th batch (1-based) replaced by NaN."""

  def __init__(self, it, bad: int):
    self.it, self.calls, self.bad = it, 0, bad

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self.it)
    self.calls += 1
    if self.calls == self.bad:
      batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
    return batch

  def get_state(self):
    return self.it.get_state()

  def set_state(self, state):
    self.it.set_state(state)


def _nan_at(bad: int):
  real = train.train_iterator
  return mock.patch.object(train, "train_iterator",
                           side_effect=lambda *a, **k: _NanBatchAt(real(*a, **k), bad))


@pytest.fixture(scope="module")
def ref_run():
  ref_dir = tempfile.mkdtemp()
  ref = train.train_and_evaluate(_ckpt_config(), ref_dir)   # checkpoints 4, 8, 12
  return ref_dir, ref


def _damaged_copy(ref_run, damage, steps=(12,)) -> str:
  ref_dir, _ = ref_run
  wd = os.path.join(tempfile.mkdtemp(), "run")
  shutil.copytree(ref_dir, wd)
  os.remove(os.path.join(wd, train.RESULTS_FILE))   # not finished: it resumes
  for step in steps:
    damage(os.path.join(wd, "ckpt", str(step)))
  return wd


def _assert_resumes_from(ref_run, wd: str, start: int, damaged=(12,), names=""):
  _, ref = ref_run
  with warnings_logged() as logs:
    r = train.train_and_evaluate(_ckpt_config(), wd)
  assert r["resumed_from"] == start
  assert (r["accuracy"], r["eval_loss"]) == (ref["accuracy"], ref["eval_loss"])
  for step in damaged:
    warned = [m for m in logs if f"checkpoint at step {step} is damaged" in m]
    assert len(warned) == 1
    assert names in warned[0]
    assert os.path.isdir(os.path.join(wd, ckpt_lib.DAMAGED_DIR, str(step)))
  # The damaged ones are written again as the run passes their steps.
  assert sorted(map(int, os.listdir(os.path.join(wd, "ckpt")))) == [4, 8, 12]
  return logs


def test_truncated_array_file(ref_run):
  def truncate(step_dir):
    path = _largest_array_file(step_dir)
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  _assert_resumes_from(ref_run, _damaged_copy(ref_run, truncate), 8, names="ckpt/12")


def test_empty_manifest(ref_run):
  def empty(step_dir):
    open(os.path.join(step_dir, "state", "manifest.ocdbt"), "w").close()
  _assert_resumes_from(ref_run, _damaged_copy(ref_run, empty), 8,
                       names="ckpt/12/state/manifest.ocdbt: empty file")


def test_garbled_manifest(ref_run):
  def garble(step_dir):
    path = os.path.join(step_dir, "state", "manifest.ocdbt")
    with open(path, "wb") as f:
      f.write(b"not a manifest" * 4)
  _assert_resumes_from(ref_run, _damaged_copy(ref_run, garble), 8, names="ckpt/12")


def test_emptied_iterator_state(ref_run):
  def empty(step_dir):
    open(os.path.join(step_dir, "data", "metadata"), "w").close()
  _assert_resumes_from(ref_run, _damaged_copy(ref_run, empty), 8,
                       names="ckpt/12/data/metadata: empty file")


def test_iterator_state_not_json(ref_run):
  def garble(step_dir):
    with open(os.path.join(step_dir, "data", "metadata"), "w") as f:
      f.write('{"last_seen_indices": {"0": 4')
  _assert_resumes_from(ref_run, _damaged_copy(ref_run, garble), 8,
                       names="ckpt/12/data/metadata: not JSON")


def test_two_damaged_resumes_from_the_third(ref_run):
  def empty(step_dir):
    open(os.path.join(step_dir, "data", "metadata"), "w").close()
  _assert_resumes_from(ref_run, _damaged_copy(ref_run, empty, (12, 8)), 4, damaged=(12, 8))


def test_all_damaged_starts_afresh(ref_run):
  def empty(step_dir):
    open(os.path.join(step_dir, "data", "metadata"), "w").close()
  logs = _assert_resumes_from(ref_run, _damaged_copy(ref_run, empty, (12, 8, 4)), 0,
                              damaged=(12, 8, 4))
  assert any("no intact checkpoint; starting at step 0" in m for m in logs)


def test_stop_names_the_step_and_leaves_and_keeps_the_last_good_checkpoint():
  wd = tempfile.mkdtemp()
  with _nan_at(7), pytest.raises(
      FloatingPointError,
      match=r"loss is nan at step 7 \(gradient norm nan.*non-finite leaves after "
            r"the update: \['adapter/dense_0/kernel/a', .*the newest checkpoint "
            r"is step 4.*config\.nonfinite='skip'"):
    train.train_and_evaluate(_ckpt_config(), wd)
  assert os.listdir(os.path.join(wd, "ckpt")) == ["4"]
  assert not os.path.exists(os.path.join(wd, ckpt_lib.LOCK_FILE))
  # The kept checkpoint is good: the run resumes from it and ends as an unbroken run does.
  r = train.train_and_evaluate(_ckpt_config(), wd)
  ref = train.train_and_evaluate(_ckpt_config(), tempfile.mkdtemp())
  assert r["resumed_from"] == 4
  assert (r["accuracy"], r["eval_loss"]) == (ref["accuracy"], ref["eval_loss"])


def test_skip_leaves_the_state_unchanged_and_counts():
  wd = tempfile.mkdtemp()
  c = _ckpt_config(nonfinite="skip", total_steps=8, ckpt_every=1, keep_ckpts=10, log_every=1)
  with _nan_at(7), warnings_logged() as logs:
    r = train.train_and_evaluate(c, wd)
  assert np.isfinite(r["eval_loss"])
  assert any("step 7: loss nan" in m and "update skipped (1 so far)" in m for m in logs)
  recs = {m["step"]: m for m in metrics_lib.read_jsonl(os.path.join(wd, "metrics.jsonl"))
          if "skipped_steps" in m}
  assert [recs[s]["skipped_steps"] for s in (6, 7, 8)] == [0, 1, 1]
  ckpts = ocp.StandardCheckpointer()
  before, after, next_ = (ckpts.restore(os.path.join(wd, "ckpt", str(s), "state"))
                          for s in (6, 7, 8))
  for part in ("adapter", "head", "opt"):
    for b, a in zip(_leaves(before[part]), _leaves(after[part])):
      np.testing.assert_array_equal(a, b)
  assert (int(before["step"]), int(after["step"])) == (6, 7)
  changed = [not np.array_equal(a, n) for a, n in zip(_leaves(after["adapter"]),
                                                        _leaves(next_["adapter"]))]
  assert any(changed)   # the step after trains again


def _leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return [np.asarray(x) for x in jax.tree.leaves(tree)]

