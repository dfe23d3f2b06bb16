r"""MoDeGPT compression curves: gloss-decoder perplexity and MiniLM synonym-probe AUC vs ratio.

Command (2-core CPU, a few minutes)::

  python -m experiments.compress_curve --out_dir /tmp/compress_curve \
      [--checkpoint /tmp/gloss_lm/hf --ratios 0,0.1,0.2,0.3,0.4,0.5 --recovery_steps 60]

Decoder: the WordNet-gloss Llama written by ``configs/gloss_lm.py`` (`--checkpoint`, a Hugging
Face directory with its tokenizer.json). For each ratio (fraction of the block parameters
removed), `lowrank_jax.compress.modegpt` (influence allocation) against plain truncated SVD of
every block kernel at the same parameter count (`compress.svd_baseline`); validation perplexity
on packed held-out glosses; calibration on packed train glosses. The 30% model is saved as a
Hugging Face checkpoint (`out_dir/modegpt30_hf`, with the tokenizer) and its forward is timed
against the original (same batch, jitted, median of repeats). With `--recovery_steps` > 0, LoRA
recovers it through the normal runner (``configs/compress_recovery.py``); the same LoRA run on the
original model is the reference (the gloss decoder is briefly pretrained, so any further training
lowers its perplexity too), and the perplexity gap before and after is printed.

Encoder: all-MiniLM-L6-v2 compressed at each ratio (calibration on train glosses), the synonym vs
random-pair ROC AUC of its sentence embeddings of single words (`data.semantic_probe_score`, test
split pairs).

Writes `out_dir/compress_curve.csv` (model, method, ratio, achieved_ratio, block_params, metric,
value), `out_dir/compress_curve.png` and `out_dir/summary.json` (the curves, the ratios where
MoDeGPT beats SVD, the forward times).

Measured (defaults, seed 0, 2026-12-02, 2 CPU cores shared with other jobs at load ~15-20; the
4-layer gloss decoder of ``configs/gloss_lm.py``, 1.57M block parameters; 500 validation glosses,
15,130 target tokens; the ``LoRA`` recovery line of the original model is the separate run
``python -m experiments.run --config configs/compress_recovery.py:checkpoint=<gloss_lm hf>``,
which this script now runs itself)::

  ratio  MoDeGPT ppl  SVD ppl   MiniLM probe AUC (MoDeGPT)
  0.0     124.73      124.91    0.9025
  0.1     124.76      125.08    0.8128
  0.2     124.80      125.25    0.7665
  0.3     124.88      125.43    0.7587
  0.4     125.20      125.63    0.7274
  0.5     125.70      125.84    0.6795 (a separate ``--ratios 0.5 --recovery_steps 0`` run)

  achieved ratios (MoDeGPT): 0.0000 0.1005 0.2001 0.3004 0.3997 0.4999; SVD 0.3 -> 0.2985
  influence allocation at 0.3: sparsity per layer [0.002, 0.342, 0.430, 0.426]
  forward, batch (32, 128), jitted, median of 10: original 842 ms, 30% model 722 ms, 1.17x
    (an earlier run of the same script: 1124 ms vs 632 ms, 1.78x; the shared CPU is noisy; the
    ratio-0.5 run, on a nearly idle machine: 218.9 ms vs 200.1 ms, 1.09x)
  LoRA rank 8, 60 steps: 30% model 124.88 -> 124.38; original 124.73 -> 124.32;
    gap 0.15 -> 0.06 ppl (about 60% of the gap closed)

The briefly trained decoder loses little to either method (its kernels are close to their random
init plus low-rank updates); MoDeGPT is ahead of SVD at every ratio. On MiniLM the probe AUC
falls fastest over the first 10%. Under that load the MiniLM curve took ~8 min per ratio.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import pathlib
import shutil
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax import compress
from lowrank_jax import tasks
from lowrank_jax.models import llama
from lowrank_jax.models import minilm

_WORKDIR = flags.DEFINE_string("out_dir", "/tmp/compress_curve", "Output directory.")
_CKPT = flags.DEFINE_string("checkpoint", "/tmp/gloss_lm/hf", "The gloss decoder (HF dir).")
_RATIOS = flags.DEFINE_list("ratios", ["0", "0.1", "0.2", "0.3", "0.4", "0.5"], "Ratios.")
_CALIB = flags.DEFINE_integer("calib_glosses", 512, "Train glosses for calibration.")
_EVAL = flags.DEFINE_integer("eval_texts", 500, "Validation glosses for perplexity.")
_PAIRS = flags.DEFINE_integer("synonym_pairs", 300, "Synonym and random pairs each (MiniLM).")
_RECOVERY = flags.DEFINE_integer("recovery_steps", 60, "LoRA recovery steps (0: skip).")
_MINILM = flags.DEFINE_bool("minilm", True, "Also run the MiniLM probe curve.")
_SEED = flags.DEFINE_integer("curve_seed", 0, "Seed (probe pairs, recovery).")

RECOVERY_RATIO = 0.3
FIELDS = ("model", "method", "ratio", "achieved_ratio", "block_params", "metric", "value")


def perplexity_fn(cfg):
  """`ppl(params, batches)` of packed causal-LM batches (the trainer's masked token loss)."""
  task = tasks.TASKS["causal_lm"]

  @jax.jit
  def sums(p, b):
    return task.eval_metrics(llama.causal_lm_logits(p, cfg, b), b)

  def ppl(params, batches):
    tot = {"loss": 0.0, "count": 0.0, "correct": 0.0}
    for b in batches:
      for k, v in sums(params, b).items():
        tot[k] += float(v)
    return task.summarize(tot)["perplexity"]
  return ppl


def decoder_curve(params, cfg, calib, evals, ratios) -> tuple[list[dict], dict]:
  """Rows of perplexity vs ratio for MoDeGPT and truncated SVD; and {ratio: (params, cfg)} of
  the MoDeGPT models."""
  rows, models = [], {}
  base = compress.block_param_count(params, cfg)
  for r in ratios:
    small, small_cfg, rep = compress.modegpt(params, cfg, calib, compress.CompressConfig(ratio=r))
    models[r] = (small, small_cfg)
    ppl = perplexity_fn(small_cfg)(small, evals)
    rows.append(dict(model="gloss_llama", method="modegpt", ratio=r,
                     achieved_ratio=rep["achieved_ratio"], block_params=rep["block_params"][1],
                     metric="val_perplexity", value=ppl))
    svd, count = compress.svd_baseline(params, cfg, r)
    ppl_svd = perplexity_fn(cfg)(svd, evals)
    rows.append(dict(model="gloss_llama", method="svd", ratio=r, achieved_ratio=1 - count / base,
                     block_params=count, metric="val_perplexity", value=ppl_svd))
    print(f"decoder ratio {r:.2f}: modegpt ppl {ppl:9.2f} (achieved {rep['achieved_ratio']:.4f}, "
          f"sparsity/layer {np.round(rep['sparsity'], 3).tolist()}) | svd ppl {ppl_svd:9.2f} "
          f"(achieved {1 - count / base:.4f})", flush=True)
  return rows, models


def encoder_curve(params, cfg, calib, probe, ratios, svd: bool = False) -> list[dict]:
  """Rows of the probe AUC vs ratio for the encoder, MoDeGPT (and, with `svd`, truncated SVD
  at the same parameter count); `probe(params, cfg) -> auc`."""
  rows = []
  base = compress.block_param_count(params, cfg)
  for r in ratios:
    small, small_cfg, rep = compress.modegpt(params, cfg, calib, compress.CompressConfig(ratio=r))
    auc = probe(small, small_cfg)
    rows.append(dict(model="minilm", method="modegpt", ratio=r,
                     achieved_ratio=rep["achieved_ratio"], block_params=rep["block_params"][1],
                     metric="synonym_probe_auc", value=auc))
    line = f"minilm ratio {r:.2f}: probe AUC {auc:.4f} (achieved {rep['achieved_ratio']:.4f})"
    if svd:
      svd_params, count = compress.svd_baseline(params, cfg, r)
      auc_svd = probe(svd_params, cfg)
      rows.append(dict(model="minilm", method="svd", ratio=r, achieved_ratio=1 - count / base,
                       block_params=count, metric="synonym_probe_auc", value=auc_svd))
      line += f" | svd AUC {auc_svd:.4f} (achieved {1 - count / base:.4f})"
    print(line, flush=True)
  return rows


def forward_seconds(params, cfg, batch, repeats: int = 10) -> float:
  """Median wall time of the jitted decoder forward on `batch` (after a compile call)."""
  f = jax.jit(lambda p, b: llama.causal_lm_logits(p, cfg, b))
  jax.block_until_ready(f(params, batch))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(f(params, batch))
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def summarize(rows: list[dict]) -> dict:
  """{model: {metric: {method: {ratio: value}}}}, and for every model/metric measured by both
  MoDeGPT and SVD the ratios (above 0) where MoDeGPT is better (lower perplexity, higher AUC)."""
  out: dict = {}
  for r in rows:
    out.setdefault(r["model"], {}).setdefault(r["metric"], {}).setdefault(
        r["method"], {})[f"{float(r['ratio']):g}"] = float(r["value"])
  better = {}
  for model, metrics in out.items():
    for metric, methods in metrics.items():
      if "modegpt" in methods and "svd" in methods:
        sign = -1.0 if "perplexity" in metric else 1.0
        common = [k for k in methods["modegpt"] if k in methods["svd"] and float(k) > 0]
        better[f"{model}/{metric}"] = {
            "ratios": common,
            "modegpt_better": [k for k in common
                               if sign * (methods["modegpt"][k] - methods["svd"][k]) > 0]}
  return {"curves": out, "modegpt_vs_svd": better}


def write_outputs(rows: list[dict], workdir: str, extra: dict | None = None) -> None:
  """`compress_curve.csv`, `compress_curve.png` (one panel per model/metric) and
  `summary.json` (`summarize(rows)` with `extra` merged in)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "summary.json"), "w") as fh:
    json.dump({**summarize(rows), **(extra or {})}, fh, indent=1)
  with open(os.path.join(workdir, "compress_curve.csv"), "w", newline="") as fh:
    w = csv.DictWriter(fh, FIELDS)
    w.writeheader()
    w.writerows(rows)
  panels = sorted({(r["model"], r["metric"]) for r in rows})
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
  for ax, (model, metric) in zip(axes[0], panels):
    for method in sorted({r["method"] for r in rows if r["model"] == model}):
      pts = [(r["ratio"], r["value"]) for r in rows
             if (r["model"], r["metric"], r["method"]) == (model, metric, method)]
      ax.plot(*zip(*pts), marker="o", label=method)
    ax.set(title=model, xlabel="compression ratio (block params removed)", ylabel=metric)
    if metric == "val_perplexity":
      ax.set_yscale("log")
    ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "compress_curve.png"), dpi=100)
  plt.close(fig)


def gloss_data(checkpoint: str, num_calib: int, num_eval: int):
  """(params, cfg, calibration batches, eval batches) of the gloss decoder: `num_calib` train and
  `num_eval` validation glosses, packed as the runner packs them."""
  from configs import compress_recovery  # pylint: disable=g-import-not-at-top
  from lowrank_jax import train  # pylint: disable=g-import-not-at-top
  c = compress_recovery.get_config(f"checkpoint={checkpoint}")
  model, data = train.make_decoder_and_data(c, jax.random.key(0))
  calib = data.fixed_batches(data.train_source, 16, num_calib)
  evals = data.fixed_batches(data.eval_source, 32, num_eval)
  return model.params, model.spec.config, calib, evals


def minilm_probe_setup(num_calib: int, num_pairs: int, seed: int):
  """(params, cfg, calibration batches, probe(params, cfg) -> AUC) of the pretrained MiniLM:
  calibration on `num_calib` train glosses, the probe on `num_pairs` synonym and random pairs."""
  from lowrank_jax import data  # pylint: disable=g-import-not-at-top
  params, cfg = minilm.load_pretrained()
  cfg = dataclasses.replace(cfg, dropout_rate=0.0, attention_dropout_rate=0.0)
  tok = minilm.load_tokenizer(32)
  src = data.load("wordnet_supersense", f"train[:{num_calib}]")
  texts = [str(src[i]["gloss"], "utf-8") if isinstance(src[i]["gloss"], bytes) else
           str(src[i]["gloss"]) for i in range(len(src))]
  enc = minilm.tokenize(tok, texts)
  calib = [{k: v[s:s + 32] for k, v in enc.items()} for s in range(0, len(texts) - 31, 32)]
  syn, rnd = data.probe_pairs("test", num_pairs=num_pairs, seed=seed)
  word_tok = minilm.load_tokenizer(16)

  def probe(p, c):
    embed = jax.jit(lambda p, ids, m: minilm.sentence_embedding(p, c, ids, m))

    def embed_fn(words):
      e = minilm.tokenize(word_tok, words)
      return np.asarray(embed(p, e["input_ids"], e["attention_mask"]))
    return data.semantic_probe_score(embed_fn, syn, rnd)["auc"]
  return params, cfg, calib, probe


def _recovery(workdir: str, name: str, ckpt: str, steps: int) -> dict:
  """The runner's results of `configs/compress_recovery.py` on `ckpt`, in `workdir/name`."""
  from configs import compress_recovery  # pylint: disable=g-import-not-at-top
  from lowrank_jax import train  # pylint: disable=g-import-not-at-top
  c = compress_recovery.get_config(f"checkpoint={ckpt},steps={steps},seed={_SEED.value}")
  c.dataset.max_eval_examples = _EVAL.value
  c.progress = False
  return train.train_and_evaluate(c, os.path.join(workdir, name))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  t0 = time.perf_counter()
  workdir = _WORKDIR.value
  ratios = [float(r) for r in _RATIOS.value]
  params, cfg, calib, evals = gloss_data(_CKPT.value, _CALIB.value, _EVAL.value)
  rows, models = decoder_curve(params, cfg, calib, evals, ratios)
  if RECOVERY_RATIO not in models:
    small, small_cfg, _ = compress.modegpt(params, cfg, calib,
                                           compress.CompressConfig(ratio=RECOVERY_RATIO))
    models[RECOVERY_RATIO] = (small, small_cfg)
  small, small_cfg = models[RECOVERY_RATIO]
  ckpt = pathlib.Path(workdir) / "modegpt30_hf"
  llama.save_hf_checkpoint(small, small_cfg, ckpt)
  shutil.copy(pathlib.Path(_CKPT.value) / "tokenizer.json", ckpt / "tokenizer.json")
  t_full = forward_seconds(params, cfg, evals[0])
  t_small = forward_seconds(small, small_cfg, evals[0])
  print(f"forward (batch {evals[0]['input_ids'].shape}): original {t_full * 1e3:.1f} ms, "
        f"{RECOVERY_RATIO:.0%}-compressed {t_small * 1e3:.1f} ms, speed ratio "
        f"{t_full / t_small:.2f}x", flush=True)
  if _RECOVERY.value > 0:
    # The same LoRA run on the original is the reference: the short pretraining leaves both
    # models room to improve, so the gap is measured after equal fine-tuning.
    after = _recovery(workdir, "recovery", str(ckpt), _RECOVERY.value)["perplexity"]
    ref = _recovery(workdir, "recovery_original", _CKPT.value, _RECOVERY.value)["perplexity"]
    base_ppl = perplexity_fn(cfg)(params, evals)
    before = perplexity_fn(small_cfg)(small, evals)
    print(f"LoRA ({_RECOVERY.value} steps): {RECOVERY_RATIO:.0%}-compressed ppl {before:.2f} -> "
          f"{after:.2f}; original {base_ppl:.2f} -> {ref:.2f}; gap {before - base_ppl:.2f} -> "
          f"{after - ref:.2f}", flush=True)
    rows += [dict(model="gloss_llama", method=m, ratio=r, achieved_ratio="", block_params="",
                  metric="val_perplexity_after_lora", value=v)
             for m, r, v in (("modegpt+lora", RECOVERY_RATIO, after), ("original+lora", 0.0, ref))]
  if _MINILM.value:
    m_params, m_cfg, m_calib, probe = minilm_probe_setup(_CALIB.value, _PAIRS.value,
                                                         _SEED.value)
    rows += encoder_curve(m_params, m_cfg, m_calib, probe, ratios)
  write_outputs(rows, workdir, {"forward_ms": {"original": t_full * 1e3,
                                                "compressed": t_small * 1e3,
                                                "compressed_ratio": RECOVERY_RATIO}})
  print(f"wrote {workdir}/compress_curve.csv, .png and summary.json ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
  app.run(main)
