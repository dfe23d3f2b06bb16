"""Intrinsic dimension: d_int90 of an MLP on sklearn digits over several widths.

Paper: Li, Farkhoor, Liu & Yosinski, "Measuring the Intrinsic Dimension of Objective Landscapes",
ICLR 2018, arXiv 1804.08838. Library: `lowrank_jax.adapters.intrinsic` (`intrinsic_dimension`:
θ = θ₀ + P θ_d with a frozen random P, dense / sparse / Fastfood).

Command (CPU, float32):

    python -m experiments.repro_intrinsic_dim --config configs/repro/intrinsic_dim.py \\
        --workdir /tmp/intrinsic_dim

`:runlocal` runs a seconds-long version (one width, two subspace sizes, few steps) whose numbers
mean nothing; `:projection=sparse` or `dense` changes the projection. Writes `intrinsic_dim.csv`
(one row per width and d), `summary.json` and `intrinsic_dim.png` (test accuracy against d per
width, with each width's 90% line) to the workdir.

Setup: sklearn digits (8×8 images, 10 classes), a fixed permutation split into 1297 training and
500 test images; MLP 64 → w → w → 10 (ReLU) from a random init; full-batch Adam. The baseline
trains every parameter; each subspace run trains only θ_d (the model starts at its init). d_int90
is the smallest d of the grid whose test accuracy reaches 90% of the baseline's.

Claim: d_int90 changes little with the width of the network (the paper: about 750 for
fully-connected networks on MNIST, over widths and depths), although the number of parameters D
grows with it.

Measured (2026-12-02, seed 0, defaults, Fastfood projection; 1 min 31 s of CPU time, 7 min 20 s
wall on the shared 2-core CPU under load ~17): baseline test accuracy 0.982 / 0.986 / 0.988 for
w = 32 / 64 / 128 (D = 3,466 / 8,970 / 26,122); subspace accuracy at d = 100 / 200 / 400:
0.838 / 0.928 / 0.956 (w = 32), 0.886 / 0.942 / 0.960 (w = 64), 0.874 / 0.956 / 0.972 (w = 128).
d_int90 = 200 for all three widths while D grows 7.5 times (at d = 100 every width is just
below its 90% line: 0.838, 0.886, 0.874 against 0.884, 0.887, 0.889). Reproduced at the grid's
resolution (a factor 2 in d).

Args (after `:`): runlocal (bool), seed (int), projection (fastfood | dense | sparse).

>>> from configs.repro import intrinsic_dim
>>> intrinsic_dim.get_config("runlocal").widths
(16,)
"""
import ml_collections

from configs import common


def get_config(arg=None):
  """The reproduction's settings; `runlocal` shrinks it to seconds."""
  arg = common.parse_arg(arg, runlocal=False, seed=0, projection="fastfood")
  c = ml_collections.ConfigDict()
  c.seed = arg.seed
  c.projection = arg.projection
  c.num_train = 1297
  c.widths = (32, 64, 128)
  c.dims = (10, 25, 50, 100, 200, 400, 800)
  c.steps = 600                    # full-batch Adam steps per run
  c.baseline_lr = 3e-3
  c.subspace_lr = 3e-2
  c.threshold = 0.9                # d_int90: 90% of the baseline's test accuracy
  if arg.runlocal:
    c.widths, c.dims, c.steps = (16,), (10, 50), 20
  return c.lock()
