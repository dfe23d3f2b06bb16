"""Smoke test of experiments/compress_curve.py on tiny random models (seconds)."""
import csv

import jax
import numpy as np

from experiments import compress_curve
from lowrank_jax.models import llama
from lowrank_jax.models import minilm


def test_curves_csv_and_png(tmp_path, fast_compile):
  cfg = llama.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2,
                          num_heads=2, num_kv_heads=1)
  params = llama.init(jax.random.key(0), cfg)
  ids = np.asarray(jax.random.randint(jax.random.key(1), (2, 8), 0, 32))
  batch = {"input_ids": ids, "loss_mask": np.ones_like(ids, np.float32),
           "segment_ids": np.ones_like(ids), "positions": np.tile(np.arange(8), (2, 1))}
  rows, models = compress_curve.decoder_curve(params, cfg, [batch], [batch], [0.3])
  assert [(r["method"], r["ratio"]) for r in rows] == [("modegpt", 0.3), ("svd", 0.3)]
  assert abs(rows[0]["achieved_ratio"] - 0.3) < 0.01
  assert abs(rows[1]["achieved_ratio"] - 0.3) < 0.05     # whole ranks of 16-wide kernels
  assert rows[0]["value"] > 1 and rows[1]["value"] > 1  # perplexities
  small, small_cfg = models[0.3]
  assert compress_curve.forward_seconds(small, small_cfg, batch, repeats=1) > 0

  mcfg = minilm.MiniLMConfig(vocab_size=40, hidden_size=16, num_layers=1, num_heads=2,
                             intermediate_size=32, max_position_embeddings=16)
  mparams = minilm.init(jax.random.key(2), mcfg)
  mids = np.asarray(jax.random.randint(jax.random.key(3), (2, 6), 1, 40))
  mrows = compress_curve.encoder_curve(
      mparams, mcfg, [{"input_ids": mids, "attention_mask": np.ones_like(mids)}],
      lambda p, c: float(p["encoder"]["layer_0"]["mlp"]["intermediate"]["kernel"].shape[1]),
      [0.3])
  assert mrows[0]["metric"] == "synonym_probe_auc" and mrows[0]["value"] < 32

  compress_curve.write_outputs(rows + mrows, str(tmp_path))
  with open(tmp_path / "compress_curve.csv") as fh:
    got = list(csv.DictReader(fh))
  assert len(got) == 3 and set(got[0]) == set(compress_curve.FIELDS)
  assert (tmp_path / "compress_curve.png").stat().st_size > 0
