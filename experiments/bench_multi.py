"""Per-example adapters: step and forward time of a mixed batch of K LoRA adapters vs one adapter.

    python -m experiments.bench_multi [--preset small] [--batch 16] [--seq 64] [--rank 8] [--k 4]

On the Llama decoder (random weights), LoRA on the chosen targets. Modes, each timed as one
jitted call on the same token batch:

  single_{step,forward}          one adapter for the whole batch (`adapter.apply`, factored);
  mixed_onehot_{step,forward}    K adapters, example b runs adapter b mod K (`lj.multi`, "onehot");
  mixed_gather_{step,forward}    the same with the "gather" product.

A step is the loss (next-token cross-entropy) and its gradient with respect to the adapter state
(the K-stack for the mixed modes); a forward is the logits. Modes are timed round-robin in one
process and reported as medians (wall and process CPU time, the steadier one on a shared machine)
and as per-round paired ratios to the single-adapter mode of the same kind
(`experiments.bench.paired_ratios`). Printed lines are JSON.
It first calls `lowrank_jax.host_memory.reuse_host_memory`, as the runner does
(`--per_step_host_memory` skips it).
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lowrank_jax as lj
from experiments import bench
from lowrank_jax import multi
from lowrank_jax.models import llama

TARGETS = {"qv": r".*/attention/(q_proj|v_proj)/kernel",
           "all": r".*/(attention/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel"}


def _loss(cfg, logits_fn):
  """Next-token cross-entropy of `logits_fn(trainable, ids)`, as a function of the trainable."""
  def loss(trainable, ids):
    logits = logits_fn(trainable, ids)[:, :-1]
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), ids[:, 1:]).mean()
  return loss


def build_modes(cfg, params, adapter, k: int, batch: int, kinds=("step", "forward")):
  """{mode: (jitted fn, its first argument)}; every fn takes (that argument, ids)."""
  base, state = adapter.init(jax.random.key(0), params)
  states = [lj.testing.perturb(state, jax.random.key(1 + i), 0.1) for i in range(k)]
  stacked = multi.stack(states)
  index = jnp.arange(batch) % k

  def single(trainable, ids):
    return llama.apply(adapter.apply(base, lj.AdapterState(trainable, {})), ids, cfg)

  def mixed(impl):
    def logits(trainable, ids):
      p = multi.apply(adapter, base, lj.AdapterState(trainable, {}), impl=impl)
      return llama.apply(p, ids, cfg, adapter_index=index)
    return logits

  fns = {"single": (single, states[0].trainable),
         "mixed_onehot": (mixed("onehot"), stacked.trainable),
         "mixed_gather": (mixed("gather"), stacked.trainable)}
  modes = {}
  for name, (fn, arg) in fns.items():
    if "step" in kinds:
      modes[f"{name}_step"] = (jax.jit(jax.value_and_grad(_loss(cfg, fn))), arg)
    if "forward" in kinds:
      modes[f"{name}_forward"] = (jax.jit(fn), arg)
  return modes


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--preset", default="small", choices=sorted(llama.PRESETS))
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--seq", type=int, default=64)
  ap.add_argument("--rank", type=int, default=8)
  ap.add_argument("--k", type=int, default=4, help="adapters in the mixed batch")
  ap.add_argument("--targets", default="all", choices=sorted(TARGETS))
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--steps", type=int, default=3, help="timed calls per mode per round")
  ap.add_argument("--kinds", default="step,forward", help="comma-separated: step, forward")
  bench.add_host_memory_flag(ap)
  return ap.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  bench.setup_host_memory(args)
  cfg = llama.LlamaConfig.preset(args.preset)
  params = llama.init(jax.random.key(0), cfg)
  adapter = lj.lora(args.rank, targets=TARGETS[args.targets])
  kinds = tuple(args.kinds.split(","))
  if not kinds or set(kinds) - {"step", "forward"}:
    raise ValueError(f"--kinds must list step and/or forward, got {args.kinds!r}")
  modes = build_modes(cfg, params, adapter, args.k, args.batch, kinds)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq)),
                    jnp.int32)
  print(json.dumps({"device": str(jax.devices()[0]), "backend": jax.default_backend(),
                    "preset": args.preset, "batch": args.batch, "seq": args.seq,
                    "rank": args.rank, "k": args.k, "targets": args.targets}))
  runs = {name: (lambda b, fn=fn, arg=arg: fn(arg, b)) for name, (fn, arg) in modes.items()}
  warmup = {}
  for name, run in runs.items():
    t0 = time.perf_counter()
    jax.block_until_ready(run(ids))
    warmup[name] = time.perf_counter() - t0
  wall, cpu = bench.time_round_robin(runs, ids, args.rounds, args.steps)
  for kind in kinds:
    ref = f"single_{kind}"
    names = [n for n in runs if n.endswith(kind)]
    paired = bench.paired_ratios({n: wall[n] for n in names}, ref, args.steps)
    for name in names:
      ms = 1e3 * float(np.median(wall[name]))
      print(json.dumps({"mode": name, "ms": round(ms, 2),
                        "ratio_to_single": round(ms / (1e3 * float(np.median(wall[ref]))), 3),
                        **bench.paired_fields(paired[name]),
                        "cpu_ms": round(1e3 * float(np.median(cpu[name])), 2),
                        "cpu_ratio_to_single": round(float(np.median(cpu[name]))
                                                     / float(np.median(cpu[ref])), 3),
                        "warmup_s": round(warmup[name], 1)}))


if __name__ == "__main__":
  main()
