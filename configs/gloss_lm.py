r"""Pretrains a small Llama from scratch on WordNet's glosses ("lemma: gloss"), offline on a CPU.

Command (2-core CPU)::

  python -m experiments.run --config configs/gloss_lm.py --workdir /tmp/gloss_lm
  python -m experiments.run --config configs/gloss_lm.py:runlocal --workdir /tmp/gloss_lm_rl

The corpus is the `wordnet_supersense` dataset (Debian `wordnet-base`): each noun or verb synset
becomes the text "<first lemma>: <gloss>" (train split: 76,773 texts; validation: 9,601). The run
trains a byte-level BPE of the model's vocabulary size on the train texts, packs the tokenized
texts into rows of `seq_len` tokens (attention never crosses texts), trains every parameter
(method "none", head ".*": full training), reports the validation perplexity and writes the model
as a Hugging Face checkpoint with its `tokenizer.json` to `workdir/hf`, which
`configs/gloss_sft.py` instruction-tunes.

Args (after `:`): seed (0), steps (400), runlocal (False: a 2-layer model, 6 steps, 256 train and
64 validation texts, for CI).

Measured (seed 0, 2026-12-02, 2 CPU cores shared with ~4 other jobs, load average ~8): a 2.36M-
parameter Llama (4 layers, hidden 192, 6 query / 2 key-value heads, 2,048-token BPE) reaches a
validation perplexity of 125.7 (next-token accuracy 0.164) over 60,626 target tokens of 2,000
held-out glosses after 400 steps of 16 packed rows of 128 tokens (~0.78M tokens, about half an
epoch); 1,211 tokens/s; 644 s of training, 731 s wall in all. runlocal: ~30 s.
"""
import ml_collections

from configs import common

MODEL = {"vocab_size": 2048, "hidden_size": 192, "intermediate_size": 512, "num_layers": 4,
         "num_heads": 6, "num_kv_heads": 2, "max_position_embeddings": 128}
MODEL_RUNLOCAL = {"vocab_size": 384, "hidden_size": 32, "intermediate_size": 64, "num_layers": 2,
                  "num_heads": 2, "num_kv_heads": 1, "max_position_embeddings": 128}


def get_config(arg=None):
  a = common.parse_arg(arg, seed=0, steps=400, runlocal=False)
  c = pretraining_config(a, MODEL_RUNLOCAL if a.runlocal else MODEL,
                         warmup_steps=2 if a.runlocal else 40)
  c.export_hf = True
  return c


def pretraining_config(a, model: dict, warmup_steps: int) -> ml_collections.ConfigDict:
  """Full training of a `llama_tiny` decoder of shape `model` on the glosses ("lemma: gloss").

  `a` holds the parsed args ``seed``, ``steps`` and ``runlocal`` (see the module docstring);
  the caller decides the HF export and any further model fields."""
  c = common.base_config()
  c.task = "causal_lm"
  c.seed = a.seed
  c.total_steps = 6 if a.runlocal else a.steps
  c.batch_size = 8 if a.runlocal else 16
  c.eval_batch_size = 16 if a.runlocal else 32
  c.eval_every = 0
  c.log_every = 2 if a.runlocal else 50
  c.ckpt_every = 0 if a.runlocal else 200
  c.model.name = "llama_tiny"        # the family; `model.config` sets the shape
  c.model.config = ml_collections.ConfigDict(model)
  c.model.checkpoint = ""
  c.model.tokenizer = ""              # "": train a byte-level BPE on the train texts
  c.head = ".*"                       # every parameter trains (pretraining)
  c.dataset.name = "wordnet_supersense"
  c.dataset.train_split = "train"
  c.dataset.eval_split = "validation"
  c.dataset.max_train_examples = 256 if a.runlocal else 0
  c.dataset.max_eval_examples = 64 if a.runlocal else 2000
  c.dataset.seq_len = 128
  c.dataset.shuffle_seed = a.seed
  c.dataset.prompt = ""               # plain text: the whole text is trained
  c.dataset.template = ""
  c.dataset.response = "{lemmas[0]}: {gloss}"
  c.adapter = ml_collections.ConfigDict({"method": "none"})
  c.optimizer.lr = 3e-3
  c.optimizer.head_lr = 3e-3
  c.optimizer.wd = 0.01
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = warmup_steps
  c.optimizer.grad_clip = 1.0
  c.save_adapter = False
  c.export_hf = False
  return c
