r"""Sweep example: every adapter method x ranks x seeds on the digits MLP (CPU, a few minutes).

Commands::

  python -m experiments.sweep --config configs/digits_sweep.py --workdir /tmp/digits_sweep
  python -m experiments.run --config configs/digits_sweep.py:method=sorsa,rank=2 --workdir DIR

The sweep writes `results.csv`, `accuracy_vs_params.png` (one series per method), `loss_curves.png`
and `rank_allocation.png` (IncreLoRA/AdaLoRA). The MLP is randomly initialised (no pretrained MLP
exists offline), so the adapters fine-tune `dense_0` of a random network while the output layer
trains fully: this compares methods' machinery and parameter counts, not pretrained transfer.

Expected: every point reaches > 0.85 test accuracy in 300 steps; ~5 s per point after the first.
Args: method (lora), rank (2), seed (0), steps (300), runlocal (False: 30 steps).
"""
from configs import common
from configs import digits_lora

METHODS = ("lora", "pissa", "loldu", "sorsa", "nola", "flora", "krona", "corda", "increlora",
           "adalora", "intrinsic")
RANKS = (1, 4)
SEEDS = (0,)


def get_config(arg=None):
  a = common.parse_arg(arg, method="lora", rank=2, seed=0, steps=300, runlocal=False)
  c = digits_lora.get_config(f"seed={a.seed},steps={a.steps},runlocal={a.runlocal}")
  c.eval_every = 0
  c.ckpt_every = 0 if not a.runlocal else c.ckpt_every
  c.progress = False
  c.adapter = common.adapter_config(a.method, rank=a.rank, targets=[r"dense_0/kernel"],
                                    total_steps=c.total_steps)
  return c


def sweep(add):
  for method in METHODS:
    ranks = (None,) if method == "krona" else RANKS
    for rank in ranks:
      for seed in SEEDS:
        kw = dict(method=method, seed=seed)
        if rank is not None:
          kw["rank"] = rank
        add(**common.arg(**kw))
