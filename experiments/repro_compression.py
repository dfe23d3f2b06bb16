r"""Reproduces MoDeGPT's claim (Lin et al., 2024) against truncated SVD; see the config.

Run: ``python -m experiments.repro_compression --config configs/repro/compression.py
--workdir /tmp/compression`` after writing the gloss decoder (the config's docstring has both
commands; ``:runlocal`` runs seconds-long on tiny random models).

`run(config)` returns the rows (the columns of `experiments.compress_curve.FIELDS`) and the
summary; `write_outputs` writes ``compress_curve.csv``, ``compress_curve.png`` and
``summary.json`` to the workdir (`experiments.compress_curve.write_outputs`).
"""
from __future__ import annotations

import json
import time

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from experiments import compress_curve
from lowrank_jax.models import llama


def tiny_decoder(config):
  """(params, cfg, calibration batches, eval batches) of a random Llama of `config.tiny_model`'s
  shape on random tokens: checks the pipeline, not the method."""
  cfg = llama.LlamaConfig(**config.tiny_model)
  params = llama.init(jax.random.key(config.seed), cfg)

  def batch(key):
    ids = np.asarray(jax.random.randint(key, (2, 16), 0, cfg.vocab_size))
    return {"input_ids": ids, "loss_mask": np.ones_like(ids, np.float32),
            "segment_ids": np.ones_like(ids), "positions": np.tile(np.arange(16), (2, 1))}
  return params, cfg, [batch(jax.random.key(1))], [batch(jax.random.key(2))]


def run(config) -> dict:
  """The decoder's perplexity curve and (with `config.minilm_ratios`) MiniLM's probe-AUC curve,
  MoDeGPT against truncated SVD at the same parameter count. Returns {"rows", "summary"}."""
  t0 = time.perf_counter()
  if config.model == "checkpoint":
    params, cfg, calib, evals = compress_curve.gloss_data(config.checkpoint, config.calib_glosses,
                                                          config.eval_texts)
  elif config.model == "tiny":
    params, cfg, calib, evals = tiny_decoder(config)
  else:
    raise ValueError(f"config.model: {config.model!r}; valid: 'checkpoint', 'tiny'")
  rows, _ = compress_curve.decoder_curve(params, cfg, calib, evals, list(config.ratios))
  extra = {"decoder_eval_batches": len(evals), "seconds_decoder": time.perf_counter() - t0}
  if config.minilm_ratios:
    t1 = time.perf_counter()
    m_params, m_cfg, m_calib, probe = compress_curve.minilm_probe_setup(
        config.calib_glosses, config.probe_pairs, config.seed)
    extra["minilm_uncompressed_auc"] = probe(m_params, m_cfg)
    rows += compress_curve.encoder_curve(m_params, m_cfg, m_calib, probe,
                                         list(config.minilm_ratios), svd=True)
    extra["seconds_minilm"] = time.perf_counter() - t1
  summary = {**compress_curve.summarize(rows), **extra}
  return {"rows": rows, "summary": summary}


def write_outputs(workdir: str, config, result: dict) -> None:
  """CSV, PNG and summary.json (with the config) in `workdir`."""
  compress_curve.write_outputs(result["rows"], workdir,
                               {**result["summary"], "config": config.to_dict()})


def main(argv):
  del argv
  config = flags.FLAGS.config
  result = run(config)
  write_outputs(flags.FLAGS.workdir, config, result)
  print(f"wrote {flags.FLAGS.workdir}/compress_curve.csv, compress_curve.png, summary.json")
  print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
  # Flags are defined here, not at import, so that `run` can be imported next to other modules
  # that define `--config`.
  config_flags.DEFINE_config_file("config", None, "configs/repro/compression.py[:arg]",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Output directory (CSV, PNG, JSON).")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
