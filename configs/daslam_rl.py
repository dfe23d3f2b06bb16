r"""DaSLaM at small scale, stage 3: policy gradient on the decomposer's LoRA adapter from the small
solver's answers, then the evaluation table.

Command (after `configs/daslam_sft.py` on the same workdir; `--all` runs the three stages)::

  python -m experiments.daslam --config configs/daslam_rl.py --workdir /tmp/daslam
  python -m experiments.daslam --config configs/daslam_rl.py:seed=1 --workdir /tmp/daslam1 --all

PPO-clip (`rl.epochs` updates per rollout of `batch_size` problems), batch-mean baseline, KL to the
SFT adapter; reward = final correctness + `rl.consistency_weight` x sub-answer consistency (see
experiments/daslam.py). The table compares, for both solvers, answering directly, with the gold
decomposition, with the SFT decomposer and with the RL decomposer on `eval.num_problems` held-out
problems.

Args (after `:`): seed (0), rl_seed (-1: seed; the RL stage's sampling and batch-order
seed), runlocal (False: tiny shapes and a few steps, for the smoke test).
"""
from configs import common
from configs import daslam_solver


def get_config(arg=None):
  a = common.parse_arg(arg, **daslam_solver.ARGS)
  c = daslam_solver.shared_config(arg)
  c.stage = "rl"
  c.total_steps = 2 if a.runlocal else 100
  c.batch_size = 8 if a.runlocal else 64
  c.optimizer.lr = 1e-3
  c.optimizer.warmup_steps = 1 if a.runlocal else 5
  c.log_every = 1 if a.runlocal else 10
  return c
