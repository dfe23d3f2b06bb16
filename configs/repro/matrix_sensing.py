"""Matrix sensing: how over-parameterisation slows gradient descent, and the one-step fix.

Paper: Xiong, Ding & Du, "How Over-Parameterization Slows Down Gradient Descent in Matrix Sensing",
ICLR 2024, arXiv 2310.01769. Library: `lowrank_jax.sensing`.

Command (float64, CPU; about 5 minutes on a loaded 2-core machine):

    python -m experiments.repro_matrix_sensing --config configs/repro/matrix_sensing.py \\
        --workdir /tmp/matrix_sensing

`:runlocal` runs a seconds-long version (n = 12, fewer steps) whose numbers mean nothing. Writes
`matrix_sensing.csv` (every 10th step of every run), `summary.json` and `matrix_sensing.png` (the
three panels below) to the workdir.

Setup: n = 50, M* = U diag(1, 0.75, 0.5) Uᵀ of rank 3, m = 1500 Gaussian measurements, loss
(1/2m) Σ (⟨A_i, M⟩ − y_i)², step size η = 0.1, over-parameterised width k = 5, error ‖M − M*‖²_F.

Claims and what we measured (2026-12-02, seed 0; filled in from `summary.json`):

1. Symmetric X Xᵀ: exact width k = r converges linearly; over-parameterised (k > r) the error is
   Θ(1/T²): error·(ηT)² flat, log-log slope ≈ −2. Measured: see `docs/results.md`.
2. Asymmetric F Gᵀ (F₀ of scale α, G₀ of scale α/3), k > r: linear convergence at a rate that
   scales with α². Measured: see `docs/results.md`.
3. One rebalancing step (F ← F R, G ← G R⁻ᵀ, R = (FᵀF)^(-1/2), when the error first drops below
   1e-3) removes the α dependence. Measured: see `docs/results.md`.

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
