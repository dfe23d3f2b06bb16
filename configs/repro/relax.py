"""Learning to Relax: SOR bandits on shifted Poisson systems, and the Neumann step of IFT adjoints.

Paper: Khodak, Chow, Balcan & Talwalkar, "Learning to Relax: Setting Solver Parameters Across a
Sequence of Linear System Instances", ICLR 2024, arXiv 2310.02246. Library:
`lowrank_jax.implicit.relax` (SOR, Tsallis-INF, SquareCB on Chebyshev features) and
`AdjointConfig.neumann_alpha_grid` / ``neumann_alpha_context`` (the learners inside
`lowrank_jax.bilevel.tune_hyperparameters`).

Commands (float64, CPU); the experiments take flags, and this file holds them (the ``sor`` and
``adjoint`` sub-dicts; flags given on the command line win):

    python -m experiments.relax_sor --config configs/repro/relax.py --out_dir /tmp/relax
    python -m experiments.relax_adjoint --config configs/repro/relax.py --out_dir /tmp/relax

`:runlocal` shrinks both to seconds (numbers mean nothing). Outputs: ``relax_sor.csv``,
``summary.json`` (renamed ``relax_sor_summary.json`` in docs/results), ``relax_sor.png``;
``relax_adjoint.csv``, ``relax_adjoint_summary.json``, ``relax_adjoint.png``.

Claims: (1) over a sequence of systems with bandit feedback (only the chosen omega's iteration
count), Tsallis-INF over an omega grid has regret sublinear in T against the best fixed omega in
hindsight; (2) with a known diagonal shift ``c`` as context, a contextual bandit approaches the
instance-optimal omega(c), beating any fixed omega.

Measured (2026-12-02, shared 2-core CPU under load ~40; docs/results.md, "Learning to Relax
(Khodak et al.)"):

1. SOR, 1000 systems (37 s CPU, 11 min wall): Tsallis-INF's regret / T against the best fixed
   omega for each horizon falls 38.5 / 25.6 / 20.2 / 13.1 sweeps at T = 10 / 100 / 200 / 1000
   (regret ~ T^0.71 from 100 to 1000): sublinear, but it still pays 40,329 sweeps against the
   best fixed omega's 27,242. Reproduced as a trend, slow at this T.
2. SquareCB on the shift: 26,502 sweeps, below the best fixed omega for every horizon T >= 755,
   24% above the instance-optimal grid policy (21,294; Young's omega(c): 20,691); its regret / T
   against instance-optimal falls 42.8 -> 5.2. Reproduced.
3. Neumann step of the digits IFT adjoints, 50 systems (3 min 37 s CPU, 27 min wall): offline
   Tsallis-INF 19,595 / SquareCB 14,009 iterations vs best fixed 8,874, default alpha = 1 9,176,
   CG 709; online at equal accuracy: Tsallis-INF 16,103, contextual 12,967, default 9,192, CG
   709. Not reproduced at 50 rounds: the learners pay more than the default step.

Args (after `:`): runlocal (bool).

>>> from configs.repro import relax
>>> c = relax.get_config("runlocal")
>>> c.sor.systems, c.adjoint.outer_steps
(40, 6)
"""
import ml_collections

from configs import common


def get_config(arg=None):
  """Flag values of `experiments.relax_sor` (``sor``) and `experiments.relax_adjoint`
  (``adjoint``); `runlocal` shrinks them to seconds."""
  arg = common.parse_arg(arg, runlocal=False)
  c = ml_collections.ConfigDict()
  # 1000 shifted 10x10 Poisson systems (P + c I) x = b, c ~ U[0, 2], SOR to 1e-8 from zero,
  # 12 omegas in [1, 1.95]; learners replayed on the sweep table with 5 seeds.
  c.sor = ml_collections.ConfigDict(dict(
      m=10, systems=1000, grid=12, c_max=2.0, tol=1e-8, max_iter=400, seeds=5))
  # 50 outer steps of IFT weight-decay tuning on digits; Neumann steps geometric in
  # [0.5, 8] / lambda_max(H_0); adjoint tolerance 1e-6, budget 1000; the contextual learner's
  # context is log(lam) in [-7, 2.5].
  c.adjoint = ml_collections.ConfigDict(dict(
      outer_steps=50, outer_lr=0.1, init_lam=1.0, inner_steps=100, tol=1e-6, maxiter=1000,
      grid=10, seeds=5, online=True, online_seeds=3, context_range=(-7.0, 2.5), workers=4))
  if arg.runlocal:
    c.sor.systems, c.sor.seeds, c.sor.m = 40, 2, 6
    c.adjoint.outer_steps, c.adjoint.inner_steps, c.adjoint.grid = 6, 20, 4
    c.adjoint.seeds, c.adjoint.online_seeds = 2, 1
  return c.lock()
