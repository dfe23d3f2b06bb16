"""Self-Tuning Networks on Fashion-MNIST: dropout, augmentation and weight decay tuned in one run.

Paper: MacKay, Vicol, Lorraine, Duvenaud & Grosse, "Self-Tuning Networks: Bilevel Optimization of
Hyperparameters using Structured Best-Response Functions", ICLR 2019, arXiv 1903.03088. Library:
`lowrank_jax.stn`; experiment: `experiments.stn_fashion` (which takes flags; this file holds them).

Command (CPU, float32):

    python -m experiments.stn_fashion --config configs/repro/stn.py --workdir /tmp/stn_fashion

`:runlocal` runs a seconds-long version whose numbers mean nothing. Writes ``results.csv`` (one
row per run: the hyperparameter values, validation and test loss / accuracy) and
``schedule.png`` (the hyperparameter schedule the STN followed) to the workdir; docs/results keeps
them as ``stn_fashion_results.csv`` and ``stn_fashion_schedule.png``.

Setup: a small CNN (conv 16 - pool - conv 32 - pool - dense 128 - dense 10) on 5000 training /
2000 validation / 5000 test Fashion-MNIST images; six hyperparameters (three per-layer dropout
rates, shift and cutout augmentation, weight decay); STN: 100 warm-up steps, then 200 cycles of 2
train steps + 1 hyper step, batch 64, 500 training steps in all. Random search (9 configurations)
and a 3 x 3 grid share the same 500 steps; then a plain model is retrained for 500 steps with the
STN's schedule, with its final values fixed, and with the best search configuration fixed.

Claims (paper, Table 1 and Section 4): (1) the STN's tuned model beats random and grid search at
an equal budget; (2) the *schedule* the STN found matters: a model retrained with the schedule
beats one retrained with the best fixed values (the final values, or the best search point).

Measured (docs/results.md, "Self-Tuning Networks (MacKay et al., ICLR 2019)"), test accuracy:

* 500 steps (this file's defaults; run 2026-12-02 with the command above: 10 min 39 s CPU,
  1 h 19 min wall under load ~25-45, figures identical to `experiments.stn_fashion`'s
  docstring): STN 0.8206 vs random 0.7148 / grid 0.7184; retrained with the STN
  schedule 0.8338 vs the STN's final values fixed 0.8446 vs the best search values fixed 0.8358.
  Claim (1) reproduced, claim (2) not.
* ``:runlocal`` (60 steps, run 2026-12-02: 1 min 45 s CPU, 18 min wall under load ~38): STN 0.732
  vs random 0.436 / grid 0.482; schedule 0.742 vs final values fixed 0.760 vs best search fixed
  0.698. Same verdicts.

Args (after `:`): runlocal (bool).

>>> from configs.repro import stn
>>> c = stn.get_config("runlocal")
>>> c.train, c.warmup, c.cycles
(2000, 20, 20)
"""
import ml_collections

from configs import common


def get_config(arg=None):
  """Flag values of `experiments.stn_fashion`; `runlocal` shrinks them to seconds."""
  arg = common.parse_arg(arg, runlocal=False)
  c = ml_collections.ConfigDict(dict(
      train=5000, val=2000, test=5000, batch=64, lr=1e-3, hyper_lr=3e-2, tau=1e-3,
      warmup=100, cycles=200, trials=9, init=(0.2, 0.2, 0.2, 1.0, 4.0, 1e-4)))
  if arg.runlocal:
    c.train, c.val, c.test, c.warmup, c.cycles = 2000, 500, 500, 20, 20
  return c.lock()
