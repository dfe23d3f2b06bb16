"""Intrinsic dimension: d_int90 of an MLP on sklearn digits and of a small CNN on Fashion-MNIST,
over widths and over the three random projections (dense, sparse, Fastfood).

Paper: Li, Farkhoor, Liu & Yosinski, "Measuring the Intrinsic Dimension of Objective Landscapes",
ICLR 2018, arXiv 1804.08838. Library: `lowrank_jax.adapters.intrinsic` (`intrinsic_dimension`:
θ = θ₀ + P θ_d with a frozen random P, dense / sparse / Fastfood).

Commands (CPU, float32):

    python -m experiments.repro_intrinsic_dim --config configs/repro/intrinsic_dim.py \\
        --workdir /tmp/intrinsic_dim
    python -m experiments.repro_intrinsic_dim \\
        --config configs/repro/intrinsic_dim.py:projection=fastfood+dense+sparse \\
        --workdir /tmp/intrinsic_dim_proj
    python -m experiments.repro_intrinsic_dim \\
        --config configs/repro/intrinsic_dim.py:model=cnn,projection=fastfood+dense+sparse \\
        --workdir /tmp/intrinsic_dim_cnn

`:runlocal` runs a seconds-long version (one width, two subspace sizes, few steps) whose numbers
mean nothing. Writes `intrinsic_dim.csv` (one row per projection, width and d), `summary.json` and
`intrinsic_dim.png` (test accuracy against d, one panel per width, one line per projection, with
the width's 90% line) to the workdir.

Setups. `model=mlp` (default): sklearn digits (8×8 images, 10 classes), a fixed permutation split
into 1297 training and 500 test images; MLP 64 → w → w → 10 (ReLU); full-batch Adam, 600 steps.
`model=cnn`: Fashion-MNIST (Debian `dataset-fashion-mnist`), a fixed random 10,000 of the 60,000
training images and the full 10,000-image test set, pixels standardised; `lowrank_jax.models.cnn`
with channels (w, 2w) (3×3 convs, 2×2 average pooling, global average pooling, dense head);
minibatch Adam (batch 128). Both start from a random init; the baseline trains every parameter;
each subspace run trains only θ_d (the model starts at its init). d_int90 is the smallest d of the
grid whose test accuracy reaches 90% of the baseline's.

Claims: (1) d_int90 changes little with the width of the network (the paper: about 750 for
fully-connected networks on MNIST, over widths and depths; about 290 for LeNet on MNIST), although
the number of parameters D grows with it; (2) the dense, sparse and Fastfood projections give
about the same d_int90 (the paper's Fastfood is a cheaper stand-in for the dense P).

Measured, MLP on digits, Fastfood (2026-12-02, seed 0, defaults; 1 min 31 s of CPU time, 7 min
20 s wall on the shared 2-core CPU under load ~17): baseline test accuracy 0.982 / 0.986 / 0.988
for w = 32 / 64 / 128 (D = 3,466 / 8,970 / 26,122); subspace accuracy at d = 100 / 200 / 400:
0.838 / 0.928 / 0.956 (w = 32), 0.886 / 0.942 / 0.960 (w = 64), 0.874 / 0.956 / 0.972 (w = 128).
d_int90 = 200 for all three widths while D grows 7.5 times (at d = 100 every width is just
below its 90% line: 0.838, 0.886, 0.874 against 0.884, 0.887, 0.889). Reproduced at the grid's
resolution (a factor 2 in d).

Measured, MLP on digits, the three projections (2026-12-02, seed 0, the second command, stopped
after width 32 to leave the CPU to the CNN, so its width-32 rows, which `,widths=32` computes
alone; 1 min 58 s of CPU time, 23 min wall under load ~30): accuracy at d = 50 / 100 / 200 / 400 / 800 is
0.694 / 0.850 / 0.930 / 0.952 / 0.972 (Fastfood), 0.652 / 0.856 / 0.938 / 0.964 / 0.966 (dense),
0.760 / 0.860 / 0.944 / 0.966 / 0.966 (sparse) against the 90% line 0.884 (baseline 0.982):
d_int90 = 200 for all three. (This Fastfood rerun differs from the earlier one by up to 0.012 at a
point, e.g. 0.850 against 0.838 at d = 100; d_int90 is the same.)

Measured, CNN on Fashion-MNIST (2026-12-02, seed 0, the third command run once per width with
`,widths=8` and `,widths=16` side by side, then `--merge DIR8,DIR16 --workdir OUT` with
`,widths=8+16`; 300 steps, under load ~35-40: 42 / 45 min wall, about 4.5 min of CPU time for
width 16): baseline accuracy 0.6711 (w = 8, D = 1,418) and 0.7175 (w = 16,
D = 5,130); d_int90 = 200 at w = 8 and 400 at w = 16 for every projection (accuracies in
docs/results.md; the three projections' accuracies at d = 200 and 400 differ by at most 0.038).
The paper's LeNet on MNIST has d_int90 ≈ 290; ours is a different, weaker
network on a harder dataset, so the numbers are not comparable one to one. The 300-step baseline is
not converged: the same w = 8 baseline trained 1200 steps reaches 0.7461, whose 90% line (0.6715)
moves w = 8's d_int90 to 400 for all three projections (subspace runs still 300 steps).

Args (after `:`): runlocal (bool), seed (int), model (mlp | cnn), projection (one or more of
fastfood, dense, sparse, joined by +), widths (ints joined by +; default: the model's).

>>> from configs.repro import intrinsic_dim
>>> intrinsic_dim.get_config("runlocal").widths
(16,)
>>> intrinsic_dim.get_config("model=cnn,projection=dense+sparse,widths=8+16").projections
('dense', 'sparse')
"""
import ml_collections

from configs import common

MODELS = ("mlp", "cnn")
PROJECTIONS = ("fastfood", "dense", "sparse")   # as lowrank_jax.adapters.intrinsic.PROJECTIONS


def _int_widths(widths) -> tuple:
  """The `widths` arg as positive ints, or a ValueError naming the arg and what is valid."""
  try:
    out = tuple(int(w) for w in widths)
  except ValueError:
    raise ValueError(f"config arg widths={'+'.join(widths)!r}: needs positive ints joined by + "
                     f"(e.g. widths=8+16)") from None
  if any(w <= 0 for w in out):
    raise ValueError(f"config arg widths={out}: every width must be positive")
  return out


def get_config(arg=None):
  """The reproduction's settings; `runlocal` shrinks it to seconds."""
  arg = common.parse_arg(arg, runlocal=False, seed=0, model="mlp", projection=("fastfood",),
                         widths=())
  if arg.model not in MODELS:
    raise ValueError(f"config arg model={arg.model!r}: valid models are {MODELS}")
  bad = [p for p in arg.projection if p not in PROJECTIONS]
  if bad or not arg.projection:
    raise ValueError(f"config arg projection={'+'.join(arg.projection)!r}: needs one or more of "
                     f"{PROJECTIONS} joined by +")
  c = ml_collections.ConfigDict()
  c.seed = arg.seed
  c.model = arg.model
  c.projections = tuple(arg.projection)
  c.threshold = 0.9                # d_int90: 90% of the baseline's test accuracy
  if arg.model == "mlp":
    c.dataset = "digits"
    c.num_train = 1297             # the rest of the 1797 digits (500) is the test set
    c.num_test = 500
    c.widths = (32, 64, 128)       # MLP 64 -> w -> w -> 10
    c.dims = (10, 25, 50, 100, 200, 400, 800)
    c.steps = 600                  # Adam steps per run
    c.batch_size = 0               # 0: full batch
    c.baseline_lr = 3e-3
    c.subspace_lr = 3e-2
  else:
    c.dataset = "fashion_mnist"
    c.num_train = 10_000           # a fixed random subset of the 60k training images
    c.num_test = 10_000            # the whole test set
    c.widths = (8, 16)             # CNN channels (w, 2w)
    c.dims = (50, 100, 200, 400, 800)
    c.steps = 300                  # about 4 epochs of the 10k subset
    c.batch_size = 128
    c.baseline_lr = 1e-2           # 3e-3 left this small CNN at 0.57 after 300 steps
    c.subspace_lr = 1e-1           # of 1e-2 / 3e-2 / 1e-1 at d = 200 (w = 8), the best
  c.eval_batch = 2000              # test images per forward pass (bounds activation memory)
  if arg.widths:
    c.widths = _int_widths(arg.widths)
  if arg.runlocal:
    c.widths, c.dims, c.steps = c.widths[:1] if arg.widths else (16,), (10, 50), 20
    c.num_train, c.num_test = min(c.num_train, 512), min(c.num_test, 500)
  return c.lock()
