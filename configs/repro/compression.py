"""Compression: MoDeGPT against truncated SVD at equal parameter count, a curve over ratios.

Paper: Lin et al., "MoDeGPT: Modular Decomposition for Large Language Model Compression", 2024,
arXiv 2408.09632. Library: `lowrank_jax.compress` (`modegpt`: Nyström for the MLP, CR for
key-query, SVD for value-output, per-layer sparsity from block influence; `svd_baseline`: plain
truncated SVD of every block kernel at the same parameter count).

Commands (CPU, float32): first the decoder, a small Llama pretrained on WordNet glosses, written
as a Hugging Face checkpoint to `<workdir>/hf`, then the curves:

    python -m experiments.run --config configs/gloss_lm.py --workdir /tmp/gloss_lm
    python -m experiments.repro_compression --config configs/repro/compression.py \\
        --workdir /tmp/compression

(`configs/gloss_lm.py:steps=N` trains a shorter decoder; `:checkpoint=DIR` points the curves at
another one.) `:runlocal` runs a seconds-long version on a tiny random decoder and random tokens
(no checkpoint, no MiniLM) whose numbers mean nothing. Writes `compress_curve.csv` (model,
method, ratio, achieved ratio, block parameters, metric, value), `compress_curve.png` and
`summary.json` (the curves, the ratios where MoDeGPT beats SVD) to the workdir.

Setup: for each ratio (the fraction of block parameters removed), MoDeGPT calibrated on packed
train glosses against truncated SVD of every block kernel at the same parameter count; the
decoder's perplexity on packed validation glosses. With `minilm_ratios`, the same comparison on
the pretrained all-MiniLM-L6-v2 encoder (calibration on train glosses), scored by the synonym
probe's ROC AUC (single words from the test split's synsets): a pretrained model with real
knowledge to lose.

Claim: at equal compression ratio MoDeGPT keeps the model better than SVD-style low-rank
compression (the paper: lower perplexity and higher zero-shot accuracy than SVD-based methods on
Llama-2/3 and OPT at 25-30% compression, without recovery fine-tuning).

Measured (2026-12-02, shared 2-core CPU at load ~35, jax 0.10.2): the decoder trained with
`configs/gloss_lm.py:steps=120` because of the load (validation perplexity 234.2), then
`:checkpoint=<its hf dir>,minilm_ratios=0.3` (decoder 2537 s, MiniLM 248 s wall). Validation
perplexity MoDeGPT / SVD at ratio 0, 0.1, ..., 0.5: 230.46 / 230.66, 230.46 / 230.77,
230.46 / 230.80, 230.52 / 230.81, 230.84 / 230.96, 231.12 / 231.01 (SVD at "ratio 0" stores
rank mn/(m+n) factors, so it is already truncated). MiniLM at 0.3: probe AUC 0.7587 (MoDeGPT)
vs 0.8754 (SVD), uncompressed 0.9025. MoDeGPT wins on the decoder at 0.1-0.4 by under 0.2% of
the perplexity and loses at 0.5; on the pretrained encoder SVD keeps the probe far better. Not
reproduced at this scale.

Args (after `:`): runlocal (bool), checkpoint (str), seed (int), ratios (a+b+c),
minilm_ratios (a+b+c; empty: no MiniLM curve).

>>> from configs.repro import compression
>>> compression.get_config("runlocal").model
'tiny'
"""
import ml_collections

from configs import common

RATIOS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)


def get_config(arg=None):
  """The reproduction's settings; `runlocal` shrinks it to seconds."""
  arg = common.parse_arg(arg, runlocal=False, checkpoint="/tmp/gloss_lm/hf", seed=0,
                         ratios=RATIOS, minilm_ratios=(0.1, 0.3))
  c = ml_collections.ConfigDict()
  c.seed = arg.seed                # the probe pairs (and the tiny model's init)
  c.model = "checkpoint"           # the gloss decoder at `checkpoint`, or "tiny" (random)
  c.checkpoint = arg.checkpoint
  c.tiny_model = {"vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
                  "num_layers": 2, "num_heads": 2, "num_kv_heads": 1}
  c.ratios = tuple(float(r) for r in arg.ratios)
  c.minilm_ratios = tuple(float(r) for r in arg.minilm_ratios)
  c.calib_glosses = 512            # train glosses for calibration (decoder and MiniLM)
  c.eval_texts = 500               # validation glosses for the decoder's perplexity
  c.probe_pairs = 300              # MiniLM: synonym and random pairs each
  if arg.runlocal:
    c.model, c.minilm_ratios = "tiny", ()
    if tuple(arg.ratios) == RATIOS:
      c.ratios = (0.0, 0.3)
  return c.lock()
