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

Measured (seed 0, 2026-12-02, 2 shared cores at load 11-20; solver stage 194 s + 761 s, base LM
314 s, SFT 254 s, RL 384 s + evaluation): both solvers reach train token accuracy 1.000 on
single-step questions; SFT (600 steps, LoRA 16,384 params) ends at token accuracy 0.936. PPO's
sampled reward (T = 1) stayed at 0.004-0.035 over the 100 steps (KL 0.007-0.025). Accuracy on 500
held-out problems:

  solver        direct  gold decomposition  SFT decomposer  RL decomposer
  small (64)    0.032   0.912               0.098           0.108
  large (128)   0.064   0.900               0.098           0.088

RL seeds 1 and 2 (`:rl_seed=N`, same solvers and SFT): RL decomposer 0.120 / 0.112 and
0.098 / 0.088 (mean of seeds 0-2: 0.109 small, 0.096 large, vs SFT 0.098). With
`--config.rl.temperature=0.5` (RL seed 0) the RL decomposer gets 0.078 / 0.074. Decomposition beats
answering directly for both solvers; this RL budget does not improve on SFT (differences of
0.01-0.02 are within the binomial noise of 500 problems, ~0.013). The SFT decomposer gets the
format, names, objects and the number of steps right but often miscopies the numbers and
operations, so sampled rewards are too rare for 100 PPO steps.

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
