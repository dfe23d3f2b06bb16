r"""Sweep example: every adapter method x ranks x seeds on the digits MLP (CPU, a few minutes).

Commands::

  python -m experiments.sweep --config configs/digits_sweep.py --workdir /tmp/digits_sweep
  python -m experiments.run --config configs/digits_sweep.py:method=sorsa,rank=2 --workdir DIR

The sweep writes `results.csv`, `accuracy_vs_params.png` (one series per method), `loss_curves.png`
and `rank_allocation.png` (IncreLoRA/AdaLoRA). The methods are every registered method but the
baseline "none"; one whose config ignores `rank` (KronA) gets one point per seed. The MLP is
randomly initialised (no pretrained MLP exists offline), so the adapters fine-tune `dense_0` of a
random network while the output layer trains fully: this compares methods' machinery and
parameter counts, not pretrained transfer.

Expected: every point reaches > 0.85 test accuracy in 300 steps; ~5 s per point after the first.
Args: method (lora), rank (2), seed (0), steps (300), runlocal (False: 30 steps).
"""
from configs import common
from configs import digits_lora
from lowrank_jax import registry

# Every registered method but the frozen-base baseline "none", which adapts nothing.
METHODS = tuple(m for m in registry.list_methods() if m != "none")
RANKS = (1, 4)
SEEDS = (0,)
TARGETS = (r"dense_0/kernel",)


def get_config(arg=None):
  a = common.parse_arg(arg, method="lora", rank=2, seed=0, steps=300, runlocal=False)
  c = digits_lora.get_config(f"seed={a.seed},steps={a.steps},runlocal={a.runlocal}")
  c.eval_every = 0
  c.ckpt_every = 0 if not a.runlocal else c.ckpt_every
  c.progress = False
  c.adapter = common.adapter_config(a.method, rank=a.rank, targets=TARGETS,
                                    total_steps=c.total_steps)
  if a.method == "stn":   # STN tunes hyperparameters on a validation split (config.stn)
    from configs import stn_digits_runner  # pylint: disable=g-import-not-at-top
    stn_digits_runner.add_stn(c, warmup_steps=10 if a.runlocal else 50)
  return c


def ranks(method: str) -> tuple:
  """RANKS, or `(None,)` (one point at the default rank) when the method's config ignores rank."""
  configs = [common.adapter_config(method, rank=r, targets=TARGETS).to_dict() for r in RANKS]
  return RANKS if any(c != configs[0] for c in configs) else (None,)


def sweep(add):
  for method in METHODS:
    for rank in ranks(method):
      for seed in SEEDS:
        kw = dict(method=method, seed=seed)
        if rank is not None:
          kw["rank"] = rank
        add(**common.arg(**kw))
