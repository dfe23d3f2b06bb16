"""Bilevel hyperparameter tuning: hypergradients (IFT, truncated unrolling) vs grid and random
search at equal compute (weight decay on digits; weight decay and LoRA scale on MiniLM).

Papers: Lorraine, Vicol & Duvenaud, "Optimizing Millions of Hyperparameters by Implicit
Differentiation", AISTATS 2020 (IFT hypergradients); Maclaurin et al. 2015 / Franceschi et al.
2017 / Shaban et al. 2019 (differentiating, possibly truncated, unrolled training). Library:
`lowrank_jax.bilevel` (`ift_hypergradient`, `unrolled_hypergradient`).

Command (CPU; digits in float64, LoRA in float32; the figures below come from ``:parts=digits``
and ``:parts=lora`` run separately):

    python -m experiments.repro_bilevel --config configs/repro/bilevel.py \\
        --workdir /tmp/repro_bilevel

`:runlocal` runs a seconds-long digits-only version (small budget, one seed) whose numbers mean
nothing. Writes `bilevel.csv` (one row per candidate model of every method and seed),
`bilevel_curve.csv` (best validation loss found against compute, mean / min / max over seeds,
and the same relative to the grid's best on each split), `bilevel.png`, `bilevel_lora.csv`,
`bilevel_lora.png` and `summary.json` to the workdir. The LoRA part's setup is in
`_lora_config` and in `experiments.repro_bilevel.run_lora`.

Setup: sklearn digits, 300 training / 300 validation / 1197 test images per seed (the seed
permutes the data, so seeds are different splits; it also seeds random search). Inner problem:
multinomial logistic regression with weight decay ``0.5 sum_j lam_j |W_j|^2`` on the 64 input
rows of ``W`` (bias unregularised), trained by Nesterov gradient descent (step ``1 / L`` with
``L`` the bound ``0.5 lambda_max(X~ᵀX~ / n) + lam_high`` of the Hessian, momentum 0.9), one
full-batch gradient per step. Outer objective: validation cross-entropy. Hyperparameters: one
shared decay, or 64 per-feature decays, in ``[lam_low, lam_high]``.

Methods, all at the same compute budget (``budget`` units):

* ``grid``: shared decay on a log grid of ``budget // train_steps`` points, each trained from
  zero for ``train_steps`` steps. ``random`` / ``random_pf``: as many log-uniform draws (shared,
  or independently per feature).
* ``ift`` / ``ift_pf``: warm-up of ``warmup_steps`` at ``lam0``, then outer steps of
  ``phase_steps`` warm-started inner steps + an IFT hypergradient (CG adjoint, warm-started,
  tolerance ``cg_tol``, at most ``cg_maxiter`` iterations) + a projected Adam step on
  ``log lam``.
* ``unrolled`` / ``unrolled_pf``: the same, but the hypergradient differentiates the
  ``phase_steps`` inner steps just run (truncated backprop, K = ``phase_steps``).

Compute unit: one full-batch gradient of the training loss (``cost.grad`` = 1); a
Hessian-vector product or the reverse pass through one inner step costs ``cost.hvp`` = 2. So an
inner step is 1, an IFT outer step is ``phase_steps + 2 + (iterations + 3) * 2`` (the validation
gradient, the gradient at the linearisation point, the CG iterations, the CG's initial and final
residual products and the mixed ``d_w d_lam L_T`` product), and an unrolled outer step is
``phase_steps * (1 + 2) + 1``. A method stops before the step that could exceed the budget
(the IFT assumes ``cg_maxiter`` iterations for that check). Forward evaluations of candidate
models on the validation and test sets are not counted for any method. The run also times the
units on this problem (``measured_unit_ratios`` in the summary).

Claim (Lorraine et al.; the unrolled line of work): gradient-based tuning finds hyperparameters
at least as good as grid / random search at lower compute, and scales to many hyperparameters
(per-feature decay) where grid and random search cannot.

Measured (2026-12-02, defaults, `:parts=digits`, seeds 0/1/2; 1 min 16 s of CPU time, 9 min 47 s
wall on the shared 2-core CPU under load ~35): with one shared decay, IFT and unrolled tuning
reach the full 16-point grid's best validation loss after 3,152 / 1,928 / 5,464 and 3,001 /
1,842 / 6,722 of the 32,000 units (the grid itself after 30,000 / 30,000 / 6,000 in its
coarse-to-fine order); at the full budget their selected models differ from the grid's by
-0.0008 to -0.0041 in validation loss and -0.0012 to -0.0030 in test loss (test accuracy within
0.0008). Shared random search ends +0.0000 to +0.0082 above the grid. With 64 per-feature
decays, IFT / unrolled lower the validation loss by 0.002 to 0.065 below the grid, random search
stays 0.048 to 0.054 above it, and the per-feature models are worse on test (+0.020 to +0.127
test loss): the 64 decays overfit the 300 validation images. Reproduced for compute and for the
validation objective; the per-feature gains do not generalise at this size.

LoRA part (`:parts=lora` and `:parts=lora,lora_seed=1`; 3 min 7 s / 2 min 56 s CPU, 21 min 30 s /
15 min 8 s wall at load ~40): LoRA r8 on MiniLM's last MLP output kernel + head, (weight decay,
LoRA scale s) at the 3 x 3 grid's 1,800 units. Best validation loss, seed 0 / 1: grid 1.9885 /
1.9385 (test 2.1642 / 1.9711), random search 2.0463 / 1.9857 (test 2.2492 / 2.0512), IFT with a
10-term Neumann adjoint 1.9925 / 1.9028 (test 2.0935 / 1.9710) after 1,152 / 1,392 units. The IFT
matches the grid on validation (0.004 above it, 0.036 below it) and beats random search.

Args (after `:`): runlocal (bool), seeds (int, the number of splits), budget (int, units),
parts (``digits+lora`` by default), lora_seed (int).

>>> from configs.repro import bilevel
>>> c = bilevel.get_config("runlocal")
>>> c.seeds, c.budget // c.train_steps
((0,), 3)
"""
import ml_collections

from configs import common


def get_config(arg=None):
  """The reproduction's settings; `runlocal` shrinks it to seconds."""
  arg = common.parse_arg(arg, runlocal=False, seeds=3, budget=32000, parts=("digits", "lora"),
                         lora_seed=0)
  c = ml_collections.ConfigDict()
  c.parts = arg.parts
  c.seeds = tuple(range(arg.seeds))
  c.n_train = 300
  c.n_val = 300
  c.lam_low, c.lam_high = 1e-6, 1e-1      # the search range of every method
  c.momentum = 0.9
  c.budget = arg.budget                    # compute units per method and seed
  c.train_steps = 2000                     # inner steps per grid / random-search point
  c.methods = ("grid", "random", "random_pf", "ift", "ift_pf", "unrolled", "unrolled_pf")
  c.lam0 = 1e-3                            # start of the hypergradient methods
  c.warmup_steps = 500                     # inner steps at lam0 before the first outer step
  c.phase_steps = 20                       # inner steps per outer step (= unrolled truncation)
  c.outer_lr = 0.1                         # Adam on log lam
  c.cg_tol = 1e-3
  c.cg_maxiter = 20
  c.cost = ml_collections.ConfigDict({"grad": 1.0, "hvp": 2.0})
  c.timing_steps = 200                     # scans that time the units (0: skip)
  c.curve_points = 201
  c.lora = _lora_config(arg.lora_seed)
  if arg.runlocal:
    c.parts = ("digits",)
    c.seeds = (0,)
    c.budget, c.train_steps, c.warmup_steps, c.phase_steps = 300, 100, 40, 10
    c.cg_maxiter, c.timing_steps, c.curve_points = 10, 10, 21
  return c.lock()


def _lora_config(seed: int):
  """LoRA r8 on MiniLM's last MLP output kernel + a head, on cached features (as
  `experiments.bilevel_lora`); hyperparameters (weight decay, LoRA scale s)."""
  lc = ml_collections.ConfigDict()
  lc.seed = seed                           # data subset, LoRA / head init, random draws
  lc.n_train, lc.n_val, lc.n_test, lc.seq_len = 192, 192, 384, 16
  lc.rank = 8
  lc.inner_lr = 3e-3                       # full-batch Adam, one training gradient per step
  lc.train_steps = 200                     # per grid / random point
  lc.grid_decays = (1e-3, 1e-2, 1e-1)
  lc.grid_scales = (0.5, 2.0, 8.0)         # s = alpha / r; lowrank_jax's default alpha = 2 r
  lc.decay_range = (1e-4, 1.0)             # random search and the IFT's projection
  lc.scale_range = (0.25, 16.0)
  lc.decay0, lc.scale0 = 1e-3, 2.0         # IFT start
  lc.warmup_steps = 200
  lc.phase_steps = 20
  lc.neumann_terms = 10                    # Lorraine et al.'s truncated Neumann series
  lc.power_iterations = 20                 # lambda_max(H) for the Neumann step 1 / (2 lambda_max)
  lc.outer_lr = 0.1
  lc.cost_grad, lc.cost_hvp = 1.0, 2.0
  return lc
