"""Matrix sensing: how over-parameterisation slows gradient descent, and the one-step fix.

Paper: Xiong, Ding & Du, "How Over-Parameterization Slows Down Gradient Descent in Matrix Sensing",
ICLR 2024, arXiv 2310.01769. Library: `lowrank_jax.sensing`.

Command (float64, CPU; about 2 minutes of CPU time, 11 minutes wall on the loaded machine below):

    python -m experiments.repro_matrix_sensing --config configs/repro/matrix_sensing.py \\
        --workdir /tmp/matrix_sensing

`:runlocal` runs a seconds-long version (n = 12, fewer steps) whose numbers mean nothing. Writes
`matrix_sensing.csv` (every 10th step of every run), `summary.json` and `matrix_sensing.png` (the
three panels below) to the workdir.

Setup: n = 50, M* = U diag(1, 0.75, 0.5) Uᵀ of rank 3, m = 1500 Gaussian measurements, loss
(1/2m) Σ (⟨A_i, M⟩ − y_i)², step size η = 0.1, over-parameterised width k = 5, error ‖M − M*‖²_F.

Claims and what we measured (2026-12-02, seed 0, defaults; `summary.json` of the command above,
11 min wall on the shared 2-core CPU under load ~15):

1. Symmetric X Xᵀ: exact width k = r converges linearly; over-parameterised (k > r) the error is
   Ω(1/T²). Measured: k = 3 reaches 1.3e-30 (float64 round-off) by step ~500; k = 5 has
   error·(ηT)² = 0.170 / 0.214 / 0.254 / 0.288 at T = 1k / 2k / 4k / 8k, a log-log slope of −1.75
   over those points: polynomial, not linear, and still pre-asymptotic (error·T² creeps up, so
   the error stays above the 1/T² line; the paper's rate is the asymptote). Reproduced
   qualitatively; the slope is not yet −2 at 8k steps.
2. Asymmetric F Gᵀ (F₀ of scale α, G₀ of scale α/3), k > r: linear convergence at a rate that
   scales with α². Measured rate per 1000 steps (fit over the last half of 4000 steps): 13.3 /
   2.20 / 0.87 for α = 0.5 / 0.2 / 0.1, i.e. rate/α² = 53.3 / 54.9 / 87.0: α² scaling between
   0.5 and 0.2 (rate ratio 6.1 vs α² ratio 6.25), weaker between 0.2 and 0.1 (2.5 vs 4; the
   α = 0.1 run is still in its slow transient). Reproduced for α >= 0.2.
3. One rebalancing step (F ← F R, G ← G R⁻ᵀ, R = (FᵀF)^(-1/2), when the error first drops below
   1e-3) removes the α dependence. Measured error at T = 4000: 1.2e-29 / 1.4e-29 / 1.5e-29 for
   α = 0.1 / 0.05 / 0.01 (rebalanced at steps 313 / 226 / 201), vs 5.2e-6 for plain GD at
   α = 0.1. Reproduced.

Args (after `:`): runlocal (bool), seed (int).

>>> from configs.repro import matrix_sensing
>>> c = matrix_sensing.get_config("runlocal")
>>> c.n, c.rank, c.over_width
(12, 3, 5)
"""
import ml_collections

from configs import common


def get_config(arg=None):
  """The reproduction's settings; `runlocal` shrinks it to seconds."""
  arg = common.parse_arg(arg, runlocal=False, seed=0)
  c = ml_collections.ConfigDict()
  c.seed = arg.seed
  c.n = 50
  c.rank = 3
  c.singular_values = (1.0, 0.75, 0.5)
  c.num_measurements = 1500
  c.eta = 0.1
  c.over_width = 5                  # k > r for the over-parameterised runs
  # Symmetric X Xᵀ: exact (k = r) and over-parameterised (k = over_width) runs from init scale
  # alpha; error·(ηT)² is reported at the checkpoints and the log-log slope fitted over them.
  c.symmetric_alpha = 0.1
  c.symmetric_steps = 8000
  c.exact_steps = 2000
  c.checkpoints = (1000, 2000, 4000, 8000)
  # Asymmetric F Gᵀ at k = over_width: plain GD for each alpha, and with the rebalancing step once
  # the error drops below rebalance_below. The rate is fitted over the last half of the run,
  # where the error is above rate_floor (float64 round-off).
  c.asymmetric_alphas = (0.5, 0.2, 0.1)
  c.rebalanced_alphas = (0.1, 0.05, 0.01)
  c.rebalance_below = 1e-3
  c.asymmetric_steps = 4000
  c.rate_floor = 1e-22
  c.csv_every = 10
  if arg.runlocal:
    c.n, c.num_measurements = 12, 300
    c.symmetric_steps, c.exact_steps, c.asymmetric_steps = 400, 200, 400
    c.checkpoints = (100, 200, 400)
  return c.lock()
