"""Smoke tests of `train.train_and_evaluate` (flax examples' train_test style) and its errors."""
import json
import os
import tempfile
from unittest import mock

import jax
import ml_collections
import numpy as np
import pytest

from configs import digits_lora
from configs import quickstart
import lowrank_jax as lj
from lowrank_jax import adapter_io
from lowrank_jax import metrics as metrics_lib
from lowrank_jax import registry
from lowrank_jax import train


def _config(**overrides):
  c = digits_lora.get_config("runlocal")
  c.total_steps = 12
  c.eval_every = 6
  c.ckpt_every = 0
  c.progress = False
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def test_smoke():
  wd = tempfile.mkdtemp()
  r = train.train_and_evaluate(_config(), wd)
  assert r["accuracy"] > 0.3   # 10 classes; 12 steps
  assert r["trainable_params"] == 64 * 4 + 4 * 128 + 128 * 10 + 10
  recs = metrics_lib.read_jsonl(os.path.join(wd, "metrics.jsonl"))
  assert [m["step"] for m in recs if "loss" in m] == [5, 10, 12]
  assert [m["step"] for m in recs if "accuracy" in m] == [6, 12]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(
      os.path.join(wd, "tb")))
  with open(os.path.join(wd, train.RESULTS_FILE)) as f:
    assert json.load(f)["accuracy"] == pytest.approx(r["accuracy"], abs=5e-8)
  state, cfg, head = adapter_io.load_adapter(r["adapter_path"])
  assert cfg["method"] == "lora"
  assert state.trainable["dense_0"]["kernel"].a.shape == (64, 4)
  assert head["dense_1"]["kernel"].shape == (128, 10)


def test_saved_adapter_reproduces_the_accuracy():
  c = _config(**{"adapter.method": "pissa"})
  r = train.train_and_evaluate(c, tempfile.mkdtemp())
  params, model = train.load_trained(c, r["adapter_path"])
  src = train.load_split(c.dataset, c.dataset.eval_split, c.dataset.max_eval_examples)
  correct = count = 0.0
  for b in train.eval_batches(src, train.make_transform(c.dataset, None), c.eval_batch_size):
    logits = model.apply(params, b, train=False, rng=None)
    correct += float(np.sum((np.argmax(logits, -1) == b["label"]) * b["mask"]))
    count += float(np.sum(b["mask"]))
  assert correct / count == pytest.approx(r["accuracy"], abs=5e-7)


def test_baseline_and_lora_same_data():
  wd = tempfile.mkdtemp()
  r = train.train_and_evaluate(_config(baseline=True, total_steps=6, eval_every=0), wd)
  assert "baseline" in r
  assert r["baseline"]["trainable_params"] == 128 * 10 + 10
  assert os.path.exists(os.path.join(wd, "baseline", train.RESULTS_FILE))


def test_pissa_run_exports_the_lora_of_the_original_weights():
  # A residual-init run's PEFT export must carry its initial factors: applied to the weights the
  # run started from, the exported LoRA gives the run's final merged weights.
  c = quickstart.get_config("method=pissa,rank=2,runlocal")
  c.model.name, c.model.pretrained = "minilm_tiny", False
  c.total_steps, c.batch_size, c.baseline, c.progress = 3, 8, False, False
  c.dataset.max_train_examples, c.dataset.max_eval_examples = 64, 16
  assert c.export_peft
  wd = tempfile.mkdtemp()
  r = train.train_and_evaluate(c, wd)
  params, _ = train.load_trained(c, r["adapter_path"])
  k_model, _, _ = train.run_keys(c.seed)
  original = train.make_model(c.model, 41, k_model, c.dataset.seq_len)
  peft_adapter, peft_state, info = adapter_io.import_peft(
      os.path.join(wd, "peft"), model="minilm", cfg=original.spec.config)
  assert (info["r"], info["lora_alpha"]) == (4, 2 * c.adapter.alpha)
  want = lj.merge(params)["encoder"]
  got = lj.merge(peft_adapter.apply(original.params, peft_state))["encoder"]
  np.testing.assert_allclose(np.asarray(got["layer_0"]["attention"]["query"]["kernel"]),
                             np.asarray(want["layer_0"]["attention"]["query"]["kernel"]),
                             atol=1e-5)
  before = original.params["encoder"]["layer_0"]["attention"]["query"]["kernel"]
  assert float(np.abs(np.asarray(want["layer_0"]["attention"]["query"]["kernel"])
                    - np.asarray(before)).max()) > 1e-4   # training moved it


def test_export_peft_of_a_method_without_a_peft_layout():
  c = _config(**{"adapter": ml_collections.ConfigDict({"method": "sorsa", "rank": 2}),
                 "export_peft": True})
  with pytest.raises(ValueError, match=r"export_peft=True: method 'sorsa' has no PEFT "
                     r"layout; exportable methods: \['corda', 'lora', 'pissa'\]"):
    train.check_config(c)


def test_nan_loss_names_the_step():
  c = _config(**{"optimizer.name": "sgd", "optimizer.lr": 10.0, "optimizer.head_lr": 10.0,
                 "optimizer.grad_clip": 0.0, "optimizer.schedule": "constant",
                 "save_adapter": False})
  with pytest.raises(FloatingPointError, match=r"loss is (nan|inf) at step \d+"):
    train.train_and_evaluate(c, tempfile.mkdtemp())


@pytest.mark.parametrize("field, value, pattern", [
    ("adapter.method", "loraa", r"Unknown adapter method 'loraa'; valid names: \[.*'lora'"),
    ("model.name", "resnet", r"Unknown model 'resnet'; valid names: \[.*'mlp_digits'"),
    ("dataset.name", "mnistt", r"Unknown dataset 'mnistt'; valid names: \[.*'digits'"),
    ("optimizer.name", "adam9", r"Unknown optimizer.name 'adam9'; valid: \['adamw', 'sgd'\]"),
])
def test_unknown_names_list_valid_ones(field, value, pattern):
  with pytest.raises(ValueError, match=pattern):
    train.train_and_evaluate(_config(**{field: value}), tempfile.mkdtemp())


@pytest.mark.parametrize("name", ["mnist", "tfds:mnist", "digits"])
def test_check_config_accepts_the_names_data_load_accepts(name):
  train.check_config(_config(**{"dataset.name": name}))


def test_text_dataset_on_an_image_model():
  c = _config(**{"dataset.name": "wordnet_supersense"})
  with pytest.raises(ValueError, match=r"dataset 'wordnet_supersense' is text; model "
                     r"'mlp_digits' reads image; models that read text: \['minilm', "
                     r"'minilm_tiny'\]"):
    train.train_and_evaluate(c, tempfile.mkdtemp())


def test_dropout_field_the_model_lacks():
  c = _config()
  c.model.attention_dropout_rate = 0.1     # the digits MLP has no attention
  with pytest.raises(ValueError, match=r"model.attention_dropout_rate is not a field of model "
                     r"'mlp_digits'; its dropout fields: \['dropout_rate'\]"):
    train.train_and_evaluate(c, tempfile.mkdtemp())


def test_missing_data_package_is_one_clear_error():
  from lowrank_jax import data  # pylint: disable=g-import-not-at-top
  env = {"LOWRANK_JAX_FASHION_MNIST_DIR": tempfile.mkdtemp(),
         data.DATA_DIR_ENV: tempfile.mkdtemp()}
  c = _config(**{"model.name": "mlp_mnist", "dataset.name": "fashion_mnist"})
  with mock.patch.dict(os.environ, env):
    with pytest.raises(data.MissingDataError,
                       match="apt-get install -y dataset-fashion-mnist"):
      train.train_and_evaluate(c, tempfile.mkdtemp())


def test_head_and_adapter_clash():
  c = _config(head=r"dense_0/.*")
  with pytest.raises(ValueError, match="selects params the adapter also targets"):
    train.train_and_evaluate(c, tempfile.mkdtemp())


def test_eval_batches_are_fixed_shape_and_masked():
  src = [{"x": np.full((2,), i, np.float32), "label": np.int32(i)} for i in range(7)]
  batches = train.eval_batches(src, lambda e: e, 3)
  assert len(batches) == 3
  assert all(b["x"].shape == (3, 2) for b in batches)
  np.testing.assert_array_equal(batches[-1]["mask"], [1, 0, 0])


def test_registry():
  assert "lora" in registry.list_methods(available_only=True)
  assert "none" in registry.list_methods(available_only=True)
  assert registry.make_adapter("pissa", rank=2).name == "pissa"
  with pytest.raises(ValueError, match="rejected its arguments"):
    registry.make_adapter("lora", rnk=2)
  for name in registry.list_methods():
    try:
      registry.get_factory(name)
    except ValueError as e:
      assert "not available" in str(e)


def test_every_existing_adapter_module_is_registered():
  adapters_dir = os.path.join(os.path.dirname(registry.__file__), "adapters")
  modules = {f[:-3] for f in os.listdir(adapters_dir)
             if f.endswith(".py") and not f.startswith("_")}
  registered = {m.rsplit(".", 1)[-1] for m in registry.METHODS.values()}
  assert not modules - registered - {"__init__"}

