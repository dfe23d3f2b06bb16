r"""DaSLaM at small scale, stage 2: the decomposer's base LM, then its LoRA SFT on gold
decompositions.

Command (after `configs/daslam_solver.py` on the same workdir)::

  python -m experiments.daslam --config configs/daslam_sft.py --workdir /tmp/daslam

The base decoder (`model.decomposer_size`) is pretrained, all parameters, as a plain LM on a
stream of problem texts and single-step questions, half of them twice in a row (`base_lm`); then
LoRA (rank 8 on the q/k/v/o and MLP kernels) learns "<bos> problem -> sub-question | ... <eos>"
with the base frozen.
`total_steps` is kept small so that SFT leaves room for the RL stage.

Args (after `:`): seed (0), rl_seed (-1: seed; the RL stage's sampling and batch-order
seed), runlocal (False: tiny shapes and a few steps, for the smoke test).
"""
from configs import common
from configs import daslam_solver


def get_config(arg=None):
  a = common.parse_arg(arg, **daslam_solver.ARGS)
  c = daslam_solver.shared_config(arg)
  c.stage = "sft"
  c.total_steps = 4 if a.runlocal else 600
  c.batch_size = 8 if a.runlocal else 32
  return c
