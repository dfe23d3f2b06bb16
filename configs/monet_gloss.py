r"""Pretrains a small Monet decoder (sparse mixture of E² experts as its FFN) on WordNet's glosses.

Command (2-core CPU)::

  python -m experiments.run --config configs/monet_gloss.py --workdir /tmp/monet_gloss
  python -m experiments.run --config configs/monet_gloss.py:ffn=swiglu --workdir /tmp/dense_gloss
  python -m experiments.run --config configs/monet_gloss.py:runlocal --workdir /tmp/monet_rl

The data, tokenizer (a byte-level BPE trained on the train texts) and full training follow
`configs/gloss_lm.py`. The decoder is a Llama whose FFN is a Monet layer (`ffn="monet"`):
E = 32 pieces per side (1,024 experts a layer), H = 4 router heads, K = 4, m = 16, vertical
decomposition, a router every 2 layers. `ffn=swiglu` trains the dense-FFN decoder of equal size
(`dense_intermediate_size`): intermediate size 396 gives the SwiGLU MLPs exactly the parameters of
the Monet layers and routers (4 · 3 · 128 · 396 = 608,256 = 4 · 135,680 + 2 · 32,768), so both
models have 1,068,160 parameters (runlocal: 36,576 Monet, 36,640 dense). The Monet routing
normalises with batch statistics in training and in eval (the runner's train step carries no
model state); the HF export is off (a Monet decoder has no HF Llama layout).
`experiments/monet_gloss.py` trains both and inspects the routing.

Measured (seed 0, 2026-12-02, 2 shared CPU cores, load average ~16): with the runner's pieces
(`experiments/monet_gloss.py`), validation loss 4.2803 (Monet) vs 4.2637 (dense) over 71,186
target tokens of 2,000 glosses after 300 steps (659 s and 533 s of training). runlocal through
`experiments.run`: 36.8 s wall, eval perplexity 314.8.

Args (after `:`): seed (0), steps (300), runlocal (False: a 2-layer model, 6 steps, 256 train and
64 validation texts, for CI), ffn ("monet" or "swiglu"), decompose ("vertical" or "horizontal").
"""
from configs import common
from configs import gloss_lm
from lowrank_jax.models import monet

MONET = {"experts": 32, "heads": 4, "topk": 4, "dim": 16, "groups": 2}
MONET_RUNLOCAL = {"experts": 8, "heads": 2, "topk": 2, "dim": 4, "groups": 2}
MODEL = {"vocab_size": 1024, "hidden_size": 128, "num_layers": 4, "num_heads": 4,
         "num_kv_heads": 2, "max_position_embeddings": 128}
MODEL_RUNLOCAL = {"vocab_size": 384, "hidden_size": 32, "num_layers": 2, "num_heads": 2,
                  "num_kv_heads": 1, "max_position_embeddings": 128}


def dense_intermediate_size(model: dict, moe: dict) -> int:
  """The SwiGLU intermediate size whose MLPs hold as many parameters as the Monet layers and
  routers of `model` (rounded to the nearest integer)."""
  cfg = monet.MonetConfig(**moe)
  d, layers = model["hidden_size"], model["num_layers"]
  counts = monet.num_params(d, cfg)
  routers = sum(monet.has_router(i, cfg) for i in range(layers))
  return round((layers * counts["experts"] + routers * counts["router"]) / (3 * d * layers))


def get_config(arg=None):
  a = common.parse_arg(arg, seed=0, steps=300, runlocal=False, ffn="monet",
                       decompose="vertical")
  model = dict(MODEL_RUNLOCAL if a.runlocal else MODEL)
  moe = {**(MONET_RUNLOCAL if a.runlocal else MONET), "decompose": a.decompose}
  if a.ffn == "monet":
    model.update(ffn="monet", monet=moe, intermediate_size=1)   # a Monet FFN has no MLP
  elif a.ffn == "swiglu":
    model.update(intermediate_size=dense_intermediate_size(model, moe))
  else:
    raise ValueError(f"config arg ffn={a.ffn!r} is not valid; valid: 'monet', 'swiglu'")
  c = gloss_lm.pretraining_config(a, model, warmup_steps=2 if a.runlocal else 30)
  c.ckpt_every = 0
  return c
