r"""LoRA on an MLP on sklearn digits: the fast smoke test of the whole runner (CPU, seconds).

Command::

  python -m experiments.run --config configs/digits_lora.py --workdir /tmp/digits_lora
  python -m experiments.run --config configs/digits_lora.py:runlocal --workdir /tmp/digits_rl

Args (after `:`): method (lora), rank (4), seed (0), steps (300), runlocal (False: 30 steps).

Expected: ~0.95 test accuracy after 300 steps (~10 s on 2 CPU cores); runlocal ~0.6 in ~5 s. The
MLP is randomly initialised (there is no pretrained MLP), so this checks the machinery, not PEFT.
"""
from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, method="lora", rank=4, seed=0, steps=300, runlocal=False)
  c = common.base_config()
  c.seed = a.seed
  c.total_steps = 30 if a.runlocal else a.steps
  c.batch_size = 32
  c.eval_batch_size = 128
  c.eval_every = 10 if a.runlocal else 100
  c.log_every = 5 if a.runlocal else 25
  c.ckpt_every = 10 if a.runlocal else 100
  c.model.name = "mlp_digits"
  c.head = r"dense_1/.*"
  c.dataset.name = "digits"
  c.dataset.max_train_examples = 0
  c.dataset.max_eval_examples = 0
  c.dataset.shuffle_seed = a.seed
  c.adapter = common.adapter_config(a.method, rank=a.rank, targets=[r"dense_0/kernel"])
  c.optimizer.lr = 1e-2
  c.optimizer.head_lr = 1e-2
  c.optimizer.wd = 0.0
  c.optimizer.warmup_steps = 0
  return c


def sweep(add):
  """Methods x ranks x seeds on digits (see configs/digits_sweep.py for the full grid)."""
  for rank in (1, 4):
    add(**common.arg(method="lora", rank=rank, runlocal=True))
