"""The runner's STN loop: a tiny digits run through `train_and_evaluate` writes the schedule and
evaluates (and saves) the model at the final hyperparameters; bad `config.stn` blocks are refused
before any work."""
from __future__ import annotations

import csv
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from configs import stn_digits_runner
from lowrank_jax import stn_train
from lowrank_jax import train


def _tiny_config():
  c = stn_digits_runner.get_config("runlocal")
  c.total_steps = 4
  c.batch_size = 16
  c.eval_batch_size = 64
  c.dataset.max_eval_examples = 64
  c.log_every = 1
  c.progress = False
  c.stn.warmup_steps = 0
  c.stn.train_steps = 2
  c.stn.hyper_steps = 1
  c.stn.val_batch_size = 16
  return c


def test_runner_trains_writes_the_schedule_and_saves_the_final_model(tmp_path):
  config = _tiny_config()
  workdir = str(tmp_path / "run")
  results = train.train_and_evaluate(config, workdir)
  names = sorted(config.stn.hyperparameters)
  with open(os.path.join(workdir, stn_train.SCHEDULE_CSV)) as f:
    rows = list(csv.DictReader(f))
  assert [int(r["step"]) for r in rows] == [0, 2, 4]
  assert [int(r["cycle"]) for r in rows] == [0, 1, 2]
  for name in names:
    low, high, initial = config.stn.hyperparameters[name]
    values = [float(r[name]) for r in rows]
    assert values[0] == pytest.approx(initial, rel=1e-5)
    assert all(low < v < high for v in values)
    assert values[-1] != pytest.approx(initial, rel=1e-6), name   # the hyper steps moved it
    assert results["hyperparameters"][name] == pytest.approx(values[-1])
  # Losses of the cycles (row 0 holds the warm-up's, none here).
  assert all(np.isfinite(float(r[k])) for r in rows[1:] for k in ("train_loss", "hyper_objective"))
  with open(os.path.join(workdir, stn_train.SCHEDULE_PNG), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(os.path.join(workdir, train.RESULTS_FILE)) as f:
    assert json.load(f)["accuracy"] == results["accuracy"]
  assert results["steps"] == 4 and results["cycles"] == 2 and 0.0 <= results["accuracy"] <= 1.0
  # The saved adapter, rebuilt by the generic loader, is the model at the final hyperparameters.
  params, model = train.load_trained(config, results["adapter_path"])
  data = train.make_data(config, model)
  correct = count = 0
  for batch in data.fixed_batches(data.eval_source, config.eval_batch_size):
    logits = model.apply(params, batch, train=False, rng=None)
    correct += float(np.sum((np.argmax(logits, -1) == batch["label"]) * batch["mask"]))
    count += float(np.sum(batch["mask"]))
  assert correct / count == pytest.approx(results["accuracy"])
  # A finished run is reported, not trained again.
  assert train.train_and_evaluate(config, workdir)["hyperparameters"] == results["hyperparameters"]


def _set(path, value):
  def mutate(c):
    *parents, leaf = path.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return mutate


def _drop_stn(c):
  del c["stn"]


BAD = [
    (_drop_stn, r"adapter.method='stn' needs a config.stn block"),
    (_set("stn.tau_", 0.1), r"config.stn.tau_ is not a field; valid: \[.*'hyper_lr'"),
    (_set("stn.hyperparameters.noise", (0.0, 1.0, 0.5)),
     r"config.stn.hyperparameters.noise: unknown hyperparameter; valid names: \['attention_"),
    (_set("stn.hyperparameters.label_smoothing", (0.0, 0.3, 0.3)),
     r"label_smoothing=\(0.0, 0.3, 0.3\): need low < initial < high"),
    (_set("stn.hyperparameters.dropout_rate", (0.0, 1.0, 0.5)),
     r"dropout_rate=\(0.0, 1.0, 0.5\): the range must lie in \[0, 1\)"),
    (_set("stn.hyperparameters.weight_decay", (0.0, 1e-3)), r"must be \(low, high, initial\)"),
    (_set("stn.hyperparameters.attention_dropout_rate", (0.0, 0.5, 0.1)),
     r"model 'mlp_digits' has no field 'attention_dropout_rate'; its dropout fields: "
     r"\['dropout_rate'\]"),
    (_set("stn.val_split", "test"), r"config.stn.val_split='test' equals dataset.eval_split"),
    (_set("stn.val_split", ""), r"config.stn.val_split must name the split"),
    (_set("stn.train_steps", 3), r"total_steps=4 - stn.warmup_steps=0 = 4 must be a positive "
                                 r"multiple of stn.train_steps=3"),
    (_set("stn.hyper_steps", 0), r"config.stn.hyper_steps must be an int >= 1"),
    (_set("stn.hyper_lr", 0.0), r"config.stn.hyper_lr=0.0 is out of range"),
    (_set("optimizer.wd", 0.01), r"optimizer.wd=0.01 with weight_decay tuned"),
    (_set("adapter.num_hyperparameters", 3), r"config.adapter.num_hyperparameters is set by the "
                                             r"STN runner"),
    (_set("model.name", "vit_test"), r"model 'vit_test' \(family 'vit'\) does not take "
                                     r"per-example dropout rates; .*\['mlp', 'cnn', 'minilm'\]"),
]


@pytest.mark.parametrize("mutate,message", BAD, ids=[m for _, m in BAD])
def test_bad_stn_config_is_refused_up_front(mutate, message):
  config = _tiny_config()
  train.check_config(config)   # the tiny config itself is valid
  mutate(config)
  with pytest.raises(ValueError, match=message):
    train.check_config(config)


def test_per_example_dropout_reaches_the_model():
  """The train loss applies one dropout rate per example: rate 0 rows see the deterministic
  model, and label smoothing e changes the target to (1 - e) onehot + e / C."""
  from lowrank_jax import models  # pylint: disable=g-import-not-at-top
  from lowrank_jax import stn as stn_lib  # pylint: disable=g-import-not-at-top
  spec = models.get_model("mlp_digits")
  params = spec.init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (3, 64))
  rates = jax.numpy.asarray([0.0, 0.5, 0.0])
  out = spec.with_config(dropout_rate=rates).classify(params, {"image": x}, deterministic=False,
                                                       rng=jax.random.key(2))
  clean = spec.classify(params, {"image": x})
  np.testing.assert_allclose(out[0], clean[0], rtol=1e-6)
  np.testing.assert_allclose(out[2], clean[2], rtol=1e-6)
  assert not np.allclose(out[1], clean[1])
  hps = (stn_lib.Hyperparameter("label_smoothing", 0.0, 0.5),)
  train_loss, _ = stn_train.make_losses(spec, hps)
  labels = np.array([1, 4, 7])
  e = np.array([[0.0], [0.2], [0.4]])
  loss = train_loss({"params": params, "trainable": {}}, jax.numpy.asarray(e),
                    {"image": x, "label": labels}, jax.random.key(3))
  logp = np.asarray(jax.nn.log_softmax(np.asarray(clean, np.float64)))
  target = (1 - e) * np.eye(10)[labels] + e / 10
  assert float(loss) == pytest.approx(float(np.mean(-np.sum(target * logp, -1))), rel=1e-5)


def test_a_validation_split_overlapping_the_train_split_is_refused_by_example_index():
  """"train" and "train[:80%]" differ as strings but share the first 80% of the examples; the
  complement "train[80%:]" shares none (tfds rounds a percent boundary to the closest index)."""
  from lowrank_jax import data
  boundary = round(0.8 * len(data.load("digits", "train")))
  dcfg = ml_collections.ConfigDict({"name": "digits", "train_split": "train[:80%]",
                                    "eval_split": "test"})
  with pytest.raises(ValueError, match=rf"shares examples 0\.\.{boundary - 1} of split 'train' "
                                       r"with dataset.train_split"):
    stn_train.check_held_out(dcfg, "train")
  with pytest.raises(ValueError, match=r"shares examples 5\.\.9 of split 'test' with "
                                       r"dataset.eval_split"):
    stn_train.check_held_out(dcfg, "train[80%:]+test[5:10]")
  stn_train.check_held_out(dcfg, "train[80%:]")
