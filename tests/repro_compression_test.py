"""experiments/repro_compression.py at its runlocal settings (tiny random decoder, seconds)."""
import csv
import json

import numpy as np
import pytest

from configs.repro import compression
from experiments import repro_compression
from lowrank_jax.models import llama


def _numpy_perplexity(params, cfg, batch):
  """exp(mean next-token cross-entropy) in float64 numpy (the last position has no target)."""
  logits = np.asarray(llama.causal_lm_logits(params, cfg, batch), np.float64)[:, :-1]
  targets = np.asarray(batch["input_ids"])[:, 1:]
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  ce = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  return float(np.exp(ce.mean()))


def test_runlocal_curve_outputs(tmp_path, fast_compile):
  config = compression.get_config("runlocal")
  result = repro_compression.run(config)
  rows = result["rows"]
  assert [(r["method"], r["ratio"]) for r in rows] == [
      ("modegpt", 0.0), ("svd", 0.0), ("modegpt", 0.3), ("svd", 0.3)]
  # Ratio 0 keeps MoDeGPT's model exact: its perplexity is the uncompressed model's.
  params, cfg, _, evals = repro_compression.tiny_decoder(config)
  assert rows[0]["value"] == pytest.approx(_numpy_perplexity(params, cfg, evals[0]), rel=1e-4)
  assert abs(rows[2]["achieved_ratio"] - 0.3) < 0.01
  assert abs(rows[3]["achieved_ratio"] - 0.3) < 0.05     # whole ranks of 16-wide kernels
  better = result["summary"]["modegpt_vs_svd"]["gloss_llama/val_perplexity"]
  assert better["ratios"] == ["0.3"]
  assert better["modegpt_better"] == (["0.3"] if rows[2]["value"] < rows[3]["value"] else [])

  repro_compression.write_outputs(str(tmp_path), config, result)
  with open(tmp_path / "compress_curve.csv") as fh:
    got = list(csv.DictReader(fh))
  assert [float(r["value"]) for r in got] == pytest.approx([r["value"] for r in rows])
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["config"]["ratios"] == [0.0, 0.3]
  assert summary["curves"]["gloss_llama"]["val_perplexity"]["svd"]["0.3"] == pytest.approx(
      rows[3]["value"])
  assert (tmp_path / "compress_curve.png").stat().st_size > 0


def test_bad_model_is_named():
  config = compression.get_config("runlocal").unlock()
  config.model = "big"
  with pytest.raises(ValueError, match="config.model.*'checkpoint', 'tiny'"):
    repro_compression.run(config)
