"""experiments/repro_forgetting.py: the pieces against hand computations, and its runlocal run
(tiny random encoder, one seed) end to end."""
import json
import statistics

import numpy as np
import pytest

import lowrank_jax as lj
from configs.repro import forgetting
from experiments import repro_forgetting


def test_parse_runs():
  assert repro_forgetting.parse_runs(["lora@1e-4", "full@3e-5"]) == [("lora", 1e-4),
                                                                     ("full", 3e-5)]
  for bad in ("dora@1e-4", "lora", "lora@fast"):
    with pytest.raises(ValueError, match="config.runs"):
      repro_forgetting.parse_runs([bad])


def test_group_labels_give_the_classifier_its_own_rate():
  trainable = {"adapter": {"a": np.zeros(2)},
               "head": {"encoder": {"k": np.zeros(3)}, "head": {"kernel": np.zeros(4)}}}
  labels = repro_forgetting.group_labels(trainable)
  assert labels == {"adapter": {"a": "adapter"},
                    "head": {"encoder": {"k": "adapter"}, "head": {"kernel": "head"}}}


def test_summarize_mean_and_sample_std():
  rows = [{"method": "lora", "lr": 1e-4, "seed": s, "accuracy": a, "gap": g, "auc": u,
           "delta_gap": g - 0.3, "delta_auc": u - 0.9}
          for s, a, g, u in ((0, 0.6, 0.28, 0.88), (1, 0.64, 0.26, 0.9), (2, 0.62, 0.3, 0.86))]
  out = repro_forgetting.summarize(rows, {"gap": 0.3, "auc": 0.9})["runs"]["lora@0.0001"]
  assert out["seeds"] == [0, 1, 2]
  assert out["accuracy"]["mean"] == pytest.approx(0.62)
  assert out["auc"]["std"] == pytest.approx(statistics.stdev([0.88, 0.9, 0.86]))
  assert out["delta_gap"]["mean"] == pytest.approx(statistics.mean([-0.02, -0.04, 0.0]))


def test_runlocal_one_seed_end_to_end(tmp_path, minilm_wheel, fast_compile):
  config = forgetting.get_config("runlocal,seeds=0")
  result = repro_forgetting.run(config, str(tmp_path / "partial.csv"))
  rows = result["rows"]
  assert [(r["method"], r["seed"]) for r in rows] == [("lora", 0), ("corda_kpa", 0),
                                                      ("full", 0)]
  pre = result["summary"]["pretrained"]
  for r in rows:
    assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["auc"] <= 1.0
    assert r["delta_auc"] == pytest.approx(r["auc"] - pre["auc"])
    assert r["gap"] == pytest.approx(r["synonym_cos"] - r["random_cos"])
  # Trainable counts against the shapes: rank r factors of every targeted (m, n) kernel plus
  # the 41-class head; full fine-tuning trains every parameter.
  m = config.tiny_model
  h, f, r = m["hidden_size"], m["intermediate_size"], config.rank
  head = h * 41 + 41
  factors = 4 * r * (h + h) + 2 * r * (h + f)
  assert rows[0]["trainable_params"] == factors + head
  assert rows[1]["trainable_params"] == factors + head
  params, _ = repro_forgetting.load_encoder(config)
  assert rows[2]["trainable_params"] == lj.count_params(params) + head
  repro_forgetting.write_outputs(str(tmp_path), config, result)
  for path in ("forgetting.csv", "partial.csv"):
    back = repro_forgetting.read_rows(str(tmp_path / path))
    assert [(b["method"], b["seed"]) for b in back] == [(r["method"], r["seed"]) for r in rows]
    assert [b["auc"] for b in back] == pytest.approx([r["auc"] for r in rows])
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert set(summary["summary"]["runs"]) == {"lora@0.001", "corda_kpa@0.001", "full@0.001"}
  assert (tmp_path / "forgetting.png").stat().st_size > 0


def test_merge_checks_the_rows_share_one_setup():
  row = lambda seed, auc, pre: {"method": "lora", "lr": 1e-4, "seed": seed, "accuracy": 0.5,
                                "gap": 0.2, "auc": auc, "delta_gap": -0.1,
                                "delta_auc": auc - pre, "pretrained_gap": 0.3,
                                "pretrained_auc": pre}
  out = repro_forgetting.merge([row(0, 0.8, 0.9), row(1, 0.86, 0.9)])
  assert out["summary"]["pretrained"] == {"gap": 0.3, "auc": 0.9}
  assert out["summary"]["runs"]["lora@0.0001"]["auc"]["mean"] == pytest.approx(0.83)
  with pytest.raises(ValueError, match="different setups"):
    repro_forgetting.merge([row(0, 0.8, 0.9), row(1, 0.86, 0.7)])
