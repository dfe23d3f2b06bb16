r"""DaSLaM at small scale: a LoRA *decomposer* writes sub-questions that a frozen *solver* answers
in turn; the decomposer is fine-tuned by supervision, then by policy gradient on the solver's
answers.

Run (each stage reads what the stages before it wrote to the workdir)::

  python -m experiments.daslam --config configs/daslam_solver.py --workdir /tmp/daslam
  python -m experiments.daslam --config configs/daslam_sft.py --workdir /tmp/daslam
  python -m experiments.daslam --config configs/daslam_rl.py --workdir /tmp/daslam
  python -m experiments.daslam --config configs/daslam_rl.py:seed=1 --workdir /tmp/daslam1 --all

Everything is generated offline (`lowrank_jax.data.arith`): word problems of 2-4 steps with gold
decompositions into single-step questions, each referring to the previous answer as `#k`.

Stages:

* solver: two Llama decoders (`model.solver_sizes`, e.g. hidden 64 and 128) are trained from
  scratch, all parameters, to answer single-step questions: "<bos> question = answer <eos>", loss
  on the answer and eos. They are frozen afterwards (stored, never trained again).
* sft: the decomposer's base decoder is pretrained as a plain LM on a stream of problem texts and
  single-step questions (it never sees a decomposition); a fraction `base_lm.repeat_fraction` of
  the texts comes twice in a row, so that the base learns to copy from its context (a skill any
  pretrained LM has; without it the decomposer copies no number from the problem). Then a LoRA
  adapter on it is trained on
  "<bos> problem -> sub-question | sub-question ... <eos>" (loss on the decomposition and eos).
* rl: the same adapter continues with `lowrank_jax.rl.PolicyGradient` (PPO-clip, batch-mean
  baseline, KL to the SFT decomposer) on rewards from the *small* solver only; the base stays
  frozen. Then the table.

Solving with a decomposition: the generated text is split at `|` into sub-questions q_1..q_J
(at most 4 are asked); for k = 1..J, every `#j` in q_k is replaced by the solver's answer a_j,
the solver answers q_k greedily with one token, and a_k is the number it emits (None if it emits
no number, or if q_k does not encode, does not fit the solver's prompt, or names an answer that
does not exist). The final answer is a_J. Answering directly: the solver gets the whole problem.

Rewards (problem with gold intermediate counts g_1..g_K, answer g_K; sub-answers a_1..a_J):

  r = 1[a_J = g_K] + lambda * (1/K) * sum_{k=1..K} 1[k <= J and a_k = g_k]

the first term is final-answer correctness, the second sub-answer consistency: the fraction of
the gold intermediate results that the solver's sub-answers reproduce, step by step
(lambda = `rl.consistency_weight`). The KL penalty is to the adapter's state at the start of the RL
stage, i.e. to the SFT decomposer (`rl.kl_coef`).

Evaluation: `eval.num_problems` held-out problems (their own seed; any problem whose text occurs
in the SFT data is dropped and replaced), accuracy of each solver answering directly, with the
gold decomposition (an upper bound for the decomposer), with the SFT decomposer and with the RL
decomposer (greedy decoding), printed as a table.
"""
from __future__ import annotations

import functools
import os
import sys
import time
from typing import Optional, Sequence

from absl import app
from absl import flags
import flax.serialization
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax

import lowrank_jax as lj
from lowrank_jax import generate as generate_lib
from lowrank_jax import registry
from lowrank_jax import rl
from lowrank_jax import steps
from lowrank_jax import tasks
from lowrank_jax.data import arith
from lowrank_jax.models import llama

STAGES = ("solver", "sft", "rl")
SOLVER_FILE, BASE_FILE, SFT_FILE, RL_FILE = ("solver_{}.msgpack", "decomposer_base.msgpack",
                                             "decomposer_sft.msgpack", "decomposer_rl.msgpack")


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------

def tokenizer(c: ml_collections.ConfigDict) -> arith.WordTokenizer:
  return arith.WordTokenizer.for_problems(c.dataset.max_value)


def decoder_config(c, tok, hidden: int) -> llama.LlamaConfig:
  return llama.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=hidden,
                           intermediate_size=2 * hidden, num_layers=c.model.num_layers,
                           num_heads=c.model.num_heads, num_kv_heads=c.model.num_kv_heads,
                           max_position_embeddings=c.dataset.decomposer_len)


def solver_prompt(tok, question: str) -> list[int]:
  return [tok.bos_id, *tok.encode(question), *tok.encode(arith.ANSWER)]


def decomposer_prompt(tok, problem: arith.Problem) -> list[int]:
  return [tok.bos_id, *tok.encode(problem.text()), *tok.encode(arith.DECOMPOSE)]


def supervised_rows(prompts: Sequence[list[int]], targets: Sequence[list[int]], length: int,
                    pad_id: int) -> dict:
  """Right-padded (N, length) `input_ids`, `loss_mask` (1 where the next token is a target token)
  and `segment_ids` (1 on real tokens) of prompt + target rows.

  Raises:
    ValueError: a row longer than `length`.
  """
  n = len(prompts)
  ids = np.full((n, length), pad_id, np.int32)
  loss_mask = np.zeros((n, length), np.float32)
  segments = np.zeros((n, length), np.int32)
  for i, (p, t) in enumerate(zip(prompts, targets)):
    row = [*p, *t]
    if len(row) > length:
      raise ValueError(f"an example of {len(row)} tokens does not fit seq_len={length}")
    ids[i, :len(row)] = row
    loss_mask[i, len(p) - 1:len(row) - 1] = 1.0   # logits at t score token t + 1
    segments[i, :len(row)] = 1
  return {"input_ids": ids, "loss_mask": loss_mask, "segment_ids": segments}


def left_padded(rows: Sequence[list[int]], length: int, pad_id: int) -> tuple[np.ndarray,
                                                                                np.ndarray]:
  """(ids, mask) (N, length): each row right-aligned after padding; a row longer than `length`
  keeps its last `length` tokens (mask 1 everywhere)."""
  ids = np.full((len(rows), length), pad_id, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for i, row in enumerate(rows):
    row = row[-length:]
    ids[i, length - len(row):] = row
    mask[i, length - len(row):] = 1
  return ids, mask


def lm_stream_rows(tok, texts: Sequence[str], length: int) -> dict:
  """Plain-LM rows: `<bos> text <eos>` of every text, concatenated and cut into rows of `length`
  (loss on every next token)."""
  stream = [t for text in texts for t in (tok.bos_id, *tok.encode(text), tok.eos_id)]
  n = len(stream) // length
  ids = np.asarray(stream[:n * length], np.int32).reshape(n, length)
  return {"input_ids": ids, "loss_mask": np.ones(ids.shape, np.float32),
          "segment_ids": np.ones(ids.shape, np.int32)}


def batches(rows: dict, batch_size: int, key: jax.Array):
  """Endless shuffled batches of `rows` (fixed shapes: epochs reshuffle, the tail is dropped)."""
  n = len(rows["input_ids"])
  for epoch in range(1 << 30):
    order = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), n))
    for s in range(0, n - batch_size + 1, batch_size):
      yield {k: v[order[s:s + batch_size]] for k, v in rows.items()}


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def _lm_loss(cfg):
  task = tasks.CausalLM()

  def loss(params, batch, rng=None):
    del rng
    return task.loss(llama.causal_lm_logits(params, cfg, batch), batch)
  return loss


def _optimizer(o: ml_collections.ConfigDict, steps_: int) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(0.0, o.lr, min(o.warmup_steps, steps_ - 1),
                                                steps_)
  return optax.chain(optax.clip_by_global_norm(o.grad_clip),
                     optax.adamw(schedule, weight_decay=o.wd))


def train_full(params, cfg, rows: dict, c, key: jax.Array, what: str):
  """All parameters trained on `rows` (`c.total_steps` steps of `c.batch_size`, AdamW)."""
  opt = _optimizer(c.optimizer, c.total_steps)
  loss_fn = _lm_loss(cfg)

  @jax.jit
  def step(params, opt_state, batch):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, aux

  opt_state = opt.init(params)
  data = batches(rows, c.batch_size, key)
  for i in range(c.total_steps):
    params, opt_state, aux = step(params, opt_state, next(data))
    if (i + 1) % c.log_every == 0 or i + 1 == c.total_steps:
      print(f"  [{what}] step {i + 1}/{c.total_steps} ce {float(aux['ce']):.3f} "
            f"token acc {float(aux['train_accuracy']):.3f}", flush=True)
  return params


def make_adapter(c):
  return registry.make_adapter(c.adapter.method, **{k: v for k, v in c.adapter.items()
                                                     if k != "method"})


def train_adapter(adapter, base, st: lj.AdapterState, cfg, rows: dict, c, key: jax.Array):
  """The adapter trained on `rows` by `steps.make_train_step` (base frozen)."""
  opt = _optimizer(c.optimizer, c.total_steps)
  train_step = steps.make_train_step(adapter, _lm_loss(cfg), opt)
  state = steps.init_train_state(st, opt)
  data = batches(rows, c.batch_size, key)
  for i in range(c.total_steps):
    state, metrics = train_step(state, base, next(data))
    if (i + 1) % c.log_every == 0 or i + 1 == c.total_steps:
      print(f"  [sft] step {i + 1}/{c.total_steps} ce {float(metrics['ce']):.3f} "
            f"token acc {float(metrics['train_accuracy']):.3f}", flush=True)
  return steps.adapter_state(state)


# ---------------------------------------------------------------------------------------------
# Solving
# ---------------------------------------------------------------------------------------------

class Solver:
  """A frozen solver: greedy one-token answers to questions, in fixed-shape batches."""

  def __init__(self, params, cfg, tok, c):
    self.params, self.cfg, self.tok = params, cfg, tok
    self.prompt_len, self.batch_size = c.dataset.solver_len - 2, c.eval.batch_size

  def answer(self, questions: Sequence[Optional[str]]) -> list[Optional[int]]:
    """The number each question gets (None for a None question or one that does not encode or
    fit, or when the solver emits a non-number)."""
    prompts, asked = [], []
    for i, q in enumerate(questions):
      try:
        ids = None if q is None else solver_prompt(self.tok, q)
      except ValueError:
        ids = None
      if ids is not None and len(ids) <= self.prompt_len:
        prompts.append(ids)
        asked.append(i)
    out: list[Optional[int]] = [None] * len(questions)
    for s in range(0, len(prompts), self.batch_size):
      chunk = prompts[s:s + self.batch_size]
      rows = chunk + [chunk[0]] * (self.batch_size - len(chunk))      # fixed batch shape
      ids, mask = left_padded(rows, self.prompt_len, self.tok.pad_id)
      tokens, _ = generate_lib.generate(self.params, self.cfg, ids, 1, prompt_mask=mask,
                                        pad_id=self.tok.pad_id)
      for j, t in enumerate(np.asarray(tokens)[:len(chunk), 0]):
        out[asked[s + j]] = self.tok.number(int(t))
    return out

  def solve_stepwise(self, subquestions: Sequence[Sequence[str]]) -> list[list[Optional[int]]]:
    """Sub-answers a_1..a_J of each list of sub-questions, asked in turn (`#k` resolved)."""
    answers: list[list[Optional[int]]] = [[] for _ in subquestions]
    for k in range(arith.MAX_STEPS):
      todo = [i for i, qs in enumerate(subquestions) if k < len(qs)]
      if not todo:
        break
      asked = [arith.resolve_references(subquestions[i][k], answers[i]) for i in todo]
      for i, a in zip(todo, self.answer(asked)):
        answers[i].append(a)
    return answers


def parse_decomposition(tok, ids: Sequence[int]) -> list[str]:
  """The sub-questions of generated ids (up to eos): the text split at `|`, empty parts dropped,
  at most `arith.MAX_STEPS`."""
  ids = list(ids)
  if tok.eos_id in ids:
    ids = ids[:ids.index(tok.eos_id)]
  parts = [p.strip() for p in tok.decode(ids).split(arith.SEPARATOR)]
  return [p for p in parts if p][:arith.MAX_STEPS]


def reward(problem: arith.Problem, sub_answers: Sequence[Optional[int]],
           consistency_weight: float) -> float:
  """Final correctness + consistency_weight * the fraction of gold intermediate counts the
  sub-answers reproduce at the same step (formula in the module docstring)."""
  final = float(bool(sub_answers) and sub_answers[-1] == problem.answer)
  matched = sum(k < len(sub_answers) and sub_answers[k] == g for k, g in enumerate(problem.values))
  return final + consistency_weight * matched / problem.num_steps


def decompose(params, cfg, tok, problems: Sequence[arith.Problem], c) -> list[list[str]]:
  """Greedy decompositions of `problems` (fixed-shape batches)."""
  prompts = [decomposer_prompt(tok, p) for p in problems]
  out = []
  bs = c.eval.batch_size
  for s in range(0, len(prompts), bs):
    chunk = prompts[s:s + bs]
    rows = chunk + [chunk[0]] * (bs - len(chunk))
    ids, mask = left_padded(rows, c.dataset.problem_len, tok.pad_id)
    tokens, _ = generate_lib.generate(params, cfg, ids, c.dataset.decomposition_len,
                                      prompt_mask=mask, stop_tokens=[tok.eos_id],
                                      pad_id=tok.pad_id)
    out += [parse_decomposition(tok, row) for row in np.asarray(tokens)[:len(chunk)]]
  return out


def accuracy(problems, finals) -> float:
  return float(np.mean([a == p.answer for p, a in zip(problems, finals)]))


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------

def _save(path: str, tree) -> None:
  with open(path, "wb") as f:
    f.write(flax.serialization.to_bytes(tree))


def _load(path: str, like):
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing: run the stage that writes it first "
                            f"(see `python -m experiments.daslam` in experiments/daslam.py)")
  with open(path, "rb") as f:
    return flax.serialization.from_bytes(like, f.read())


def _params_like(cfg) -> dict:
  """Zero params of `cfg`'s shapes: the target `_load` restores into."""
  shapes = jax.eval_shape(functools.partial(llama.init, cfg=cfg), jax.random.key(0))
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def run_solver(c, workdir: str) -> None:
  tok = tokenizer(c)
  key = jax.random.key(c.seed)
  problems = arith.generate_problems(c.dataset.num_solver_examples, c.seed * 1000 + 1,
                                     min_steps=1, max_steps=1, max_value=c.dataset.max_value)
  rows = supervised_rows([solver_prompt(tok, p.text()) for p in problems],
                         [[tok.encode(str(p.answer))[0], tok.eos_id] for p in problems],
                         c.dataset.solver_train_len, tok.pad_id)
  for size, hidden in zip(("small", "large"), c.model.solver_sizes):
    cfg = decoder_config(c, tok, hidden)
    t0 = time.time()
    params = train_full(llama.init(jax.random.fold_in(key, hidden), cfg), cfg, rows, c,
                        jax.random.fold_in(key, 7), f"solver {size}")
    _save(os.path.join(workdir, SOLVER_FILE.format(size)), params)
    print(f"solver {size} (hidden {hidden}, {llama.num_params(cfg):,} params) trained in "
          f"{time.time() - t0:.0f} s", flush=True)


def sft_problems(c) -> list[arith.Problem]:
  return arith.generate_problems(c.dataset.num_sft_examples, c.seed * 1000 + 2,
                                 max_value=c.dataset.max_value)


def run_sft(c, workdir: str) -> None:
  tok = tokenizer(c)
  key = jax.random.key(c.seed + 100)
  cfg = decoder_config(c, tok, c.model.decomposer_size)
  problems = sft_problems(c)
  lm_texts = [p.text() for p in problems] + [
      p.text() for p in arith.generate_problems(len(problems), c.seed * 1000 + 3, min_steps=1,
                                                max_steps=1, max_value=c.dataset.max_value)]
  rng = np.random.default_rng(c.seed)
  lm_texts = [lm_texts[i] for i in rng.permutation(len(lm_texts))]
  repeated = rng.random(len(lm_texts)) < c.base_lm.repeat_fraction
  lm_texts = [t for text, twice in zip(lm_texts, repeated) for t in [text] * (1 + twice)]
  lm = c.base_lm
  t0 = time.time()
  base = train_full(llama.init(jax.random.fold_in(key, 0), cfg), cfg,
                    lm_stream_rows(tok, lm_texts, c.dataset.decomposer_len), lm,
                    jax.random.fold_in(key, 1), "decomposer base LM")
  _save(os.path.join(workdir, BASE_FILE), base)
  print(f"decomposer base LM trained in {time.time() - t0:.0f} s", flush=True)
  adapter = make_adapter(c)
  base, st = adapter.init(jax.random.fold_in(key, 2), base)
  rows = supervised_rows([decomposer_prompt(tok, p) for p in problems],
                         [[*tok.encode(p.decomposition()), tok.eos_id] for p in problems],
                         c.dataset.decomposer_len, tok.pad_id)
  t0 = time.time()
  st = train_adapter(adapter, base, st, cfg, rows, c, jax.random.fold_in(key, 3))
  _save(os.path.join(workdir, SFT_FILE), st)
  print(f"SFT adapter ({lj.count_params(st):,} params) trained in {time.time() - t0:.0f} s",
        flush=True)


def _load_all(c, workdir, tok):
  """(solvers {size: Solver}, decomposer cfg, adapter, base, SFT adapter state)."""
  solvers = {}
  for size, hidden in zip(("small", "large"), c.model.solver_sizes):
    cfg = decoder_config(c, tok, hidden)
    solvers[size] = Solver(_load(os.path.join(workdir, SOLVER_FILE.format(size)),
                                 _params_like(cfg)), cfg, tok, c)
  cfg = decoder_config(c, tok, c.model.decomposer_size)
  base = _load(os.path.join(workdir, BASE_FILE), _params_like(cfg))
  adapter = make_adapter(c)
  base, st0 = adapter.init(jax.random.key(0), base)
  st = _load(os.path.join(workdir, SFT_FILE), st0)
  return solvers, cfg, adapter, base, st


def eval_problems(c) -> list[arith.Problem]:
  """`eval.num_problems` problems of the eval seed whose texts are not in the SFT data."""
  seen = {p.text() for p in sft_problems(c)}
  out, draw = [], 0
  while len(out) < c.eval.num_problems:
    fresh = arith.generate_problems(c.eval.num_problems, c.seed * 1000 + 900 + draw,
                                    max_value=c.dataset.max_value)
    out += [p for p in fresh if p.text() not in seen][:c.eval.num_problems - len(out)]
    draw += 1
  return out


def run_rl(c, workdir: str) -> dict:
  """The RL stage and the evaluation; prints the table and returns {"accuracy": {(solver, mode):
  accuracy}, "base_unchanged": bool, "solver_unchanged": bool} (bitwise, after RL)."""
  tok = tokenizer(c)
  solvers, cfg, adapter, base, sft_state = _load_all(c, workdir, tok)
  base_before = jax.tree.map(np.array, base)
  solver_before = jax.tree.map(np.array, solvers["small"].params)
  train = sft_problems(c)
  rlc = c.rl

  def rewards(problems, completions):
    subqs = [parse_decomposition(tok, ids) for ids in completions]
    sub_answers = solvers["small"].solve_stepwise(subqs)
    return np.array([reward(p, a, rlc.consistency_weight) for p, a in zip(problems, sub_answers)])

  pg = rl.PolicyGradient(adapter, cfg, _optimizer(c.optimizer, c.total_steps), rewards,
                         objective=rlc.objective, baseline=rlc.baseline, clip_eps=rlc.clip_eps,
                         kl_coef=rlc.kl_coef, epochs=rlc.epochs,
                         max_new_tokens=c.dataset.decomposition_len,
                         temperature=rlc.temperature, stop_tokens=[tok.eos_id], pad_id=tok.pad_id)
  state = pg.init(sft_state, jax.random.key(rlc.seed + 200))
  rng = np.random.default_rng(rlc.seed + 200)
  t0 = time.time()
  for i in range(c.total_steps):
    problems = [train[j] for j in rng.choice(len(train), c.batch_size, replace=False)]
    ids, mask = left_padded([decomposer_prompt(tok, p) for p in problems], c.dataset.problem_len,
                            tok.pad_id)
    state, metrics = pg.step(state, base, ids, mask, prompts=problems)
    if (i + 1) % c.log_every == 0 or i + 1 == c.total_steps:
      print(f"  [rl] step {i + 1}/{c.total_steps} reward {metrics['reward']:.3f} "
            f"kl {metrics['kl']:.4f} clip {metrics['clip_fraction']:.3f} "
            f"tokens {metrics['completion_tokens']:.1f} ({time.time() - t0:.0f} s)", flush=True)
  rl_state = steps.adapter_state(state)
  _save(os.path.join(workdir, RL_FILE), rl_state)
  same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a),
                                                               jax.tree.leaves(b)))
  unchanged = {"base_unchanged": same(base, base_before),
               "solver_unchanged": same(solvers["small"].params, solver_before)}
  print(f"decomposer base bitwise unchanged: {unchanged['base_unchanged']}; small solver bitwise "
        f"unchanged: {unchanged['solver_unchanged']}")

  problems = eval_problems(c)
  decompositions = {
      "gold decomposition": [p.subquestions() for p in problems],
      "SFT decomposer": decompose(adapter.apply(base, sft_state), cfg, tok, problems, c),
      "RL decomposer": decompose(adapter.apply(base, rl_state), cfg, tok, problems, c)}
  results = {}
  for size, solver in solvers.items():
    results[(size, "direct")] = accuracy(problems, solver.answer([p.text() for p in problems]))
    for mode, subqs in decompositions.items():
      finals = [a[-1] if a else None for a in solver.solve_stepwise(subqs)]
      results[(size, mode)] = accuracy(problems, finals)
  print_table(results, len(problems), c)
  return {"accuracy": results, **unchanged}


def print_table(results: dict, n: int, c) -> None:
  modes = ["direct", "gold decomposition", "SFT decomposer", "RL decomposer"]
  sizes = [s for s in ("small", "large") if (s, "direct") in results]
  print(f"\nAccuracy on {n} held-out problems (seed {c.seed}, RL seed {c.rl.seed}; RL rewards "
        "from the small solver)")
  print(f"| {'solver':<24} | " + " | ".join(f"{m:>18}" for m in modes) + " |")
  print(f"|{'-' * 26}|" + "|".join("-" * 20 for _ in modes) + "|")
  for s, hidden in zip(sizes, c.model.solver_sizes):
    print(f"| {f'{s} (hidden {hidden})':<24} | "
          + " | ".join(f"{results[(s, m)]:>18.3f}" for m in modes) + " |")


def run_stage(c, workdir: str):
  os.makedirs(workdir, exist_ok=True)
  return {"solver": run_solver, "sft": run_sft, "rl": run_rl}[c.stage](c, workdir)


def define_flags() -> None:
  """The command-line flags (defined only when run as a script: importing this module for its
  functions must not clash with the flags of `experiments.run`)."""
  config_flags.DEFINE_config_file("config", None, "configs/daslam_*.py[:arg]", lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory the stages share.")
  flags.DEFINE_bool("all", False, "Run the solver, sft and rl stages in turn (their configs with "
                    "the same arg).")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  c, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  from configs import daslam_solver, daslam_sft, daslam_rl  # pylint: disable=g-import-not-at-top
  stages = ([module.get_config(c.arg or None) for module in (daslam_solver, daslam_sft, daslam_rl)]
            if flags.FLAGS.all else [c])
  for stage in stages:
    try:
      run_stage(stage, workdir)
    except FileNotFoundError as e:   # an earlier stage was not run: one line, no traceback
      sys.exit(f"error: {e}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
