r"""DaSLaM at small scale, stage 1: two frozen solver decoders answering single-step questions.

Command (then `configs/daslam_sft.py` and `configs/daslam_rl.py` on the same workdir)::

  python -m experiments.daslam --config configs/daslam_solver.py --workdir /tmp/daslam
  python -m experiments.daslam --config configs/daslam_rl.py:seed=1 --workdir /tmp/daslam1 --all

The solvers (hidden sizes `model.solver_sizes`, 2 layers) are trained from scratch, all
parameters, on single-step word problems "<bos> question = answer <eos>" with counts up to
`dataset.max_value`. `shared_config` holds the fields every stage reads (data, shapes, eval, RL).

Args (after `:`): seed (0), rl_seed (-1: seed; the RL stage's sampling and batch-order
seed), runlocal (False: tiny shapes and a few steps, for the smoke test).
"""
import ml_collections

from configs import common

ARGS = dict(seed=0, rl_seed=-1, runlocal=False)
TARGETS = (r"layers/layer_\d+/(attention|mlp)/\w+_proj/kernel",)


def shared_config(arg=None) -> ml_collections.ConfigDict:
  """The fields of every stage; each stage's config sets `stage` and its own steps/optimizer."""
  a = common.parse_arg(arg, **ARGS)
  c = common.base_config()
  c.arg = arg or ""
  c.seed = a.seed
  c.log_every = 5 if a.runlocal else 200
  c.model = ml_collections.ConfigDict({
      "name": "llama", "solver_sizes": (16, 32) if a.runlocal else (64, 128),
      "decomposer_size": 16 if a.runlocal else 64, "num_layers": 1 if a.runlocal else 2,
      "num_heads": 4, "num_kv_heads": 2})
  # Token budgets: a 4-step problem is at most 30 words, a sub-question 15, a decomposition 63.
  c.dataset = ml_collections.ConfigDict({
      "name": "arith", "max_value": 30, "num_solver_examples": 256 if a.runlocal else 20000,
      "num_sft_examples": 64 if a.runlocal else 4000, "solver_train_len": 20,
      "solver_len": 34, "problem_len": 32, "decomposition_len": 64, "decomposer_len": 96})
  c.adapter = common.adapter_config("lora", rank=8, targets=TARGETS)
  c.optimizer = ml_collections.ConfigDict({
      "lr": 3e-3, "wd": 0.0, "warmup_steps": 2 if a.runlocal else 50, "grad_clip": 1.0})
  c.base_lm = ml_collections.ConfigDict({
      "total_steps": 4 if a.runlocal else 600, "batch_size": 8 if a.runlocal else 32,
      "log_every": c.log_every, "optimizer": c.optimizer.to_dict(), "repeat_fraction": 0.5})
  c.rl = ml_collections.ConfigDict({
      "objective": "ppo", "baseline": "mean", "clip_eps": 0.2, "kl_coef": 0.05, "epochs": 2,
      "temperature": 1.0, "consistency_weight": 0.5,
      "seed": a.seed if a.rl_seed < 0 else a.rl_seed})
  c.eval = ml_collections.ConfigDict({"num_problems": 8 if a.runlocal else 500,
                                      "batch_size": 8 if a.runlocal else 100})
  return c


def get_config(arg=None):
  a = common.parse_arg(arg, **ARGS)
  c = shared_config(arg)
  c.stage = "solver"
  c.total_steps = 4 if a.runlocal else 2000
  c.batch_size = 8 if a.runlocal else 64
  return c
