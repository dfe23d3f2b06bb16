"""The method-comparison reproduction (`experiments/repro_methods.py`) at its `runlocal` scale.

One run of LoRA and the frozen baseline on the tiny random-init MiniLM (a few steps) checks that
the CSV, summary and PNG are written and agree, that the parameter counts equal the LoRA formula
r·(d_in + d_out) per adapted kernel plus the head's H·C + C (computed here from the model config,
not from the adapter state), and that a rerun trains nothing. The claim verdicts are checked on
hand-made rows.
"""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from configs.repro import methods as methods_cfg
from experiments import repro_methods
from lowrank_jax.models import minilm


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
  config = methods_cfg.get_config("runlocal")
  workdir = str(tmp_path_factory.mktemp("repro_methods"))
  summary = repro_methods.run(config, workdir, log=lambda _: None)
  assert not os.path.exists(os.path.join(workdir, repro_methods.FAILURES_NAME))
  return config, workdir, summary


def _csv_rows(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_outputs_are_written_and_consistent(local_run):
  config, workdir, summary = local_run
  rows = _csv_rows(os.path.join(workdir, repro_methods.CSV_NAME))
  assert sorted((r["method"], int(r["size"])) for r in rows) == [("lora", 2), ("none", 0)]
  assert os.path.getsize(os.path.join(workdir, repro_methods.PNG_NAME)) > 1000
  with open(os.path.join(workdir, repro_methods.SUMMARY_NAME)) as f:
    stored = json.load(f)
  assert stored["runs"] == stored["expected_runs"] == 2
  by_method = {p["method"]: p for p in stored["points"]}
  for r in rows:
    p = by_method[r["method"]]
    assert p["acc_mean"] == pytest.approx(float(r["accuracy"]))
    assert 0.0 <= p["acc_mean"] <= 1.0 and float(r["step_ms"]) > 0
    assert p["trainable_params"] == int(r["trainable_params"])

  cfg = minilm.MiniLMConfig.tiny()
  h, classes, rank = cfg.hidden_size, 41, config.ranks[0]
  head = h * classes + classes
  lora_formula = 2 * cfg.num_layers * rank * (h + h)   # query and value kernels, H x H each
  assert by_method["none"]["trainable_params"] == head
  assert by_method["lora"]["adapter_params"] == lora_formula
  assert by_method["lora"]["trainable_params"] == lora_formula + head
  # Points are sorted by parameters.
  assert [p["method"] for p in stored["points"]] == ["none", "lora"]
  assert summary["points"] == stored["points"]


def test_rerun_skips_finished_rows(local_run):
  config, workdir, _ = local_run
  path = os.path.join(workdir, repro_methods.CSV_NAME)
  before = open(path).read()
  calls = []
  repro_methods.run(config, workdir, log=calls.append)
  assert calls == [] and open(path).read() == before


def _row(method, size, seed, acc, params, head=0):
  return {"method": method, "size": size, "seed": seed, "accuracy": acc, "eval_loss": 1.0,
          "trainable_params": params + head, "adapter_params": params, "head_params": head,
          "step_ms": 1.0, "step_cpu_ms": 1.0, "train_s": 1.0, "lr": 1e-3}


def test_verdicts_on_hand_made_rows():
  config = methods_cfg.get_config()
  # Every row trains a 1,000-parameter head besides its adapter.
  rows = [_row("lora", 8, s, a, 100_000, 1000) for s, a in enumerate((0.70, 0.72, 0.74))]
  rows += [_row("loldu", 8, s, a, 500, 1000) for s, a in enumerate((0.715,) * 3)]  # -0.5 pts
  rows += [_row("pissa", 8, s, a, 100_000, 1000) for s, a in enumerate((0.71,) * 3)]  # -1 pt
  stats = repro_methods.aggregate(rows)
  assert stats[("lora", 8)]["acc_mean"] == pytest.approx(0.72)
  assert stats[("lora", 8)]["acc_std"] == pytest.approx(np.std([0.70, 0.72, 0.74], ddof=1))
  rows += [_row("sorsa", 8, s, a, 100_000, 1000) for s, a in enumerate((0.60,) * 3)]  # -11 pts
  stats = repro_methods.aggregate(rows)
  noise = repro_methods.seed_std(stats)   # only lora has a spread: sqrt(0.02² / 4)
  assert noise == pytest.approx(np.sqrt(0.02 ** 2 / 4))
  margin = 200 * noise * np.sqrt(2 / 3)   # 2 standard errors of a difference of 3-seed means
  loldu = repro_methods.verdict(config, "loldu", 8, stats, noise)
  assert loldu["verdict"] == "reproduced" and "200x fewer" in loldu["figure"]
  assert loldu["margin_pts"] == pytest.approx(margin)
  # pissa is 1 point below lora, inside the noise: no verdict either way.
  assert repro_methods.verdict(config, "pissa", 8, stats, noise)["verdict"].startswith(
      "inconclusive")
  assert repro_methods.verdict(config, "pissa", 8, stats)["verdict"] == "not at this scale"
  assert repro_methods.verdict(config, "sorsa", 8, stats, noise)["verdict"] == "not at this scale"
  # A claim whose reference was not measured says so instead of a verdict.
  assert "no measured reference" in repro_methods.verdict(config, "lora", 8, stats)["verdict"]
  assert repro_methods.verdict(config, "none", 0, stats) is None
  table = repro_methods.markdown_table(repro_methods.summarize(config, rows)).splitlines()
  assert len(table) == 2 + 4
  assert table[2].startswith("| loldu | r8 | 1,500 (500) | 0.7150 ± 0.0000 (3) |")
  assert table[2].endswith(f"200x fewer tuned params (noise ±{margin:.1f} pts): reproduced |")
