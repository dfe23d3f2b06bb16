r"""Instruction-tunes the `configs/gloss_lm.py` checkpoint on a held-out WordNet task, offline.

Command (after `configs/gloss_lm.py` has written `/tmp/gloss_lm/hf`)::

  python -m experiments.run --config configs/gloss_sft.py --workdir /tmp/gloss_sft
  python -m experiments.run --config configs/gloss_sft.py:method=pissa --workdir /tmp/gloss_pissa
  python -m experiments.run --config configs/gloss_sft.py:runlocal,checkpoint=/tmp/gloss_lm_rl/hf \
      --workdir /tmp/gloss_sft_rl

The task was never seen in pretraining: "### Instruction:\nWhich sense class is <lemma>
(<gloss>)?\n### Response:\n" -> the synset's supersense (one of 41 names such as "noun.animal"),
trained on the response tokens only (the loss mask is 0 on the prompt). Train split: WordNet's
train synsets; evaluation: its test synsets (held out from both runs). Before training and after,
the run reports the response perplexity and the exact-match accuracy of greedy generation (stop
at `<|eos|>`), and prints a few sample generations. The adapter (any registered method via the
`method` arg; rank on the q/k/v/o and MLP kernels) trains on a frozen base.

Args (after `:`): method (lora), rank (8), seed (0), steps (600), checkpoint (/tmp/gloss_lm/hf),
runlocal (False: 6 steps, 128 train / 32 test examples, for CI).

Measured (seed 0, 2026-12-02, same contended 2 cores, on the checkpoint measured in
`configs/gloss_lm.py`): LoRA rank 8 (108,544 params) on 600 steps: held-out response perplexity
362.8 -> 3.07 (4,469 response tokens of 600 test synsets; next-token accuracy 0.083 -> 0.886);
greedy exact match on 300 test prompts 0.000 -> 0.200 (the most frequent class, noun.artifact,
is 0.130 of them; the untuned model mostly ends the text at once). Two runs gave the same
figures; 2,474-3,600 tokens/s, 284-414 s of training, 326-440 s wall, depending on the load.
With 150 steps the tuned model answered the second most frequent class (noun.person) to every
prompt: exact match 0.113, perplexity 4.31. Sample generations (tuned; reference): settle ->
verb.cognition (verb.change), capture -> verb.cognition (verb.emotion), Sistrurus -> noun.person
(noun.animal). runlocal: ~35 s.
"""
import ml_collections

from configs import common
from configs import gloss_lm

TARGETS = (r"layers/layer_\d+/(attention|mlp)/\w+_proj/kernel",)
TEMPLATE = "### Instruction:\n{prompt}\n### Response:\n"


def get_config(arg=None):
  a = common.parse_arg(arg, method="lora", rank=8, seed=0, steps=600,
                       checkpoint="/tmp/gloss_lm/hf", runlocal=False)
  # The pretraining run's settings (batch, sequence length, corpus), then what differs here.
  c = gloss_lm.get_config(f"seed={a.seed},steps={a.steps},runlocal={a.runlocal}")
  c.log_every = 2 if a.runlocal else 25
  c.ckpt_every = 0 if a.runlocal else 50
  # The checkpoint's config.json sets the shape; `model.config` keeps only the execution fields a
  # run may change, e.g. --config.model.config.remat=nothing_saveable.
  c.model.config = ml_collections.ConfigDict({
      "compute_dtype": ml_collections.config_dict.placeholder(str), "remat": "none",
      "scan_layers": False, "attention": "xla"})
  c.model.checkpoint = a.checkpoint
  c.model.tokenizer = ""              # "": the checkpoint's tokenizer.json
  c.head = ""
  c.dataset.eval_split = "test"
  c.dataset.max_train_examples = 128 if a.runlocal else 0
  c.dataset.max_eval_examples = 32 if a.runlocal else 600
  c.dataset.template = TEMPLATE
  c.dataset.prompt = "Which sense class is {lemmas[0]} ({gloss})?"
  c.dataset.response = "{label_name}"
  c.adapter = common.adapter_config(a.method, rank=a.rank, targets=TARGETS,
                                    total_steps=c.total_steps)
  c.optimizer.wd = 0.0
  c.optimizer.warmup_steps = 2 if a.runlocal else 20
  c.eval_before = True
  c.generate = ml_collections.ConfigDict({
      "num_examples": 16 if a.runlocal else 300, "max_new_tokens": 8, "batch_size": 16 if
      a.runlocal else 50, "print_samples": 3 if a.runlocal else 6})
  c.save_adapter = True
  c.export_hf = False
  return c
