r"""LoRA recovery of a MoDeGPT-compressed gloss decoder: the `configs/gloss_lm.py` corpus and
settings, on a compressed Hugging Face checkpoint (written by `experiments/compress_curve.py`).

Command (2-core CPU)::

  python -m experiments.compress_curve --out_dir /tmp/compress_curve   # writes the checkpoint
  python -m experiments.run --config configs/compress_recovery.py \
      --workdir /tmp/compress_curve/recovery

The checkpoint's config.json records the compressed per-layer sizes; the runner loads it like any
checkpoint and trains LoRA on every projection kernel of the blocks (method "lora", rank 8), then
reports the validation perplexity before (`eval_before`) and after.

Args (after `:`): checkpoint (/tmp/compress_curve/modegpt30_hf), method (lora), rank (8),
steps (60), seed (0), lr (1e-3), runlocal (False: 4 steps on 256 train / 64 validation texts).
"""
from configs import common
from configs import gloss_lm

DEFAULT_CHECKPOINT = "/tmp/compress_curve/modegpt30_hf"   # experiments/compress_curve.py's
TARGETS = (r"layers/layer_\d+/(attention|mlp)/\w+_proj/kernel",)


def get_config(arg=None):
  a = common.parse_arg(arg, checkpoint=DEFAULT_CHECKPOINT, method="lora", rank=8, steps=60,
                       seed=0, lr=1e-3, runlocal=False)
  c = gloss_lm.get_config(f"seed={a.seed},steps={a.steps},runlocal={a.runlocal}")
  c.total_steps = 4 if a.runlocal else a.steps
  c.ckpt_every = 0
  c.log_every = 2 if a.runlocal else 20
  del c.model.config                  # the checkpoint's config.json sets the shape
  c.model.checkpoint = a.checkpoint
  c.model.tokenizer = ""              # "": the checkpoint's tokenizer.json
  c.head = ""
  c.dataset.max_eval_examples = 64 if a.runlocal else 500
  c.adapter = common.adapter_config(a.method, rank=a.rank, targets=TARGETS,
                                    total_steps=c.total_steps)
  c.optimizer.lr = a.lr
  c.optimizer.wd = 0.0
  c.optimizer.warmup_steps = 1 if a.runlocal else 6
  c.eval_before = True
  c.save_adapter = False
  c.export_hf = False
  return c
