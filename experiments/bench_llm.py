"""Decoder-LM benchmark: full fine-tuning vs factored and merged LoRA vs the seed adapters on Llama.

    python -m experiments.bench_llm --preset tiny                  # CI smoke run, seconds on CPU
    python -m experiments.bench_llm --preset tinyllama_1_1b --dtype bf16 --batch 8 --seq 1024

Builds a random-init Llama of the preset's shape (`lowrank_jax.models.llama.PRESETS`; base weights
in `--dtype`, adapter params fp32), and times one AdamW step (`steps.make_train_step`, the
`tasks.CausalLM` next-token loss on random tokens, every token a target) of each mode:

  full         every param trained (the reference of the ratios),
  lora         LoRA factored (x·W + s·(x·A)·B),
  lora_merged  LoRA with the weights merged (W + s·A·B) inside the step,
  <method>     each `--methods` entry (default: the seed adapters), built from its registry facts
               (`registry.configured_adapter`, the generic `--rank` knob) like a run builds it;
               calibration statistics for methods that need them come from the benchmark batch,

all adapters on the q, k, v, o, gate, up and down projections of every layer. A mode that cannot
be built or run on the decoder prints a row with its `skipped` reason instead. The modes are timed
round-robin in one process (machine noise hits them alike): medians, ratios to `full` (of medians,
and the median and range over rounds of the per-round paired ratio, as `experiments.bench`).

Rows are JSON with the fields of the PyTorch PEFT baseline (`../shared/bench/peft_baseline.py`:
method, preset, batch, seq, compile, ms_per_step, tokens_per_s, mfu, peak_gib, params_total,
params_trainable, setup_s, loss, device), so that both can run in one command on one device:

  peak_gib          the compiled step's memory (XLA buffer assignment: arguments + outputs - outputs
                    aliased to donated arguments + temporaries): the params, optimizer state,
                    gradients and activations one step holds, as torch's max allocated memory;
  process_peak_gib  measured: the device allocator's peak (`memory_stats()["peak_bytes_in_use"]`)
                    on an accelerator, the process peak RSS (`resource`) on CPU, read after the
                    mode's warm-up; modes are built in the printed order and all kept for the
                    round-robin, so it is cumulative over the rows above;
  mfu               the baseline's accounting: per token 6·N (full) or 4·N (frozen base) FLOPs,
                    N the params less the embedding, plus 6·layers·seq·hidden for attention,
                    against `--peak-tflops` (dense bf16 peak; meaningless on CPU).
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
from experiments import bench
from lowrank_jax import calibrate
from lowrank_jax import registry
from lowrank_jax import steps
from lowrank_jax import tasks
from lowrank_jax.models import llama

TARGETS = r"layers/layer_\d+/(attention|mlp)/\w+_proj/kernel"
SEED_METHODS = ("loldu", "krona", "diffusekrona", "nola", "sorsa", "flora", "intrinsic")
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
# (batch, seq) when the flags leave them out: the CI preset runs in seconds on CPU, the others
# default to the PEFT baseline's shape.
DEFAULT_SHAPES = {"tiny": (4, 32)}
BASELINE_SHAPE = (8, 1024)
CAUSAL_LM = tasks.get_task("causal_lm")
GIB = 2 ** 30


def random_batch(cfg: llama.LlamaConfig, batch: int, seq: int, seed: int = 0) -> dict:
  """Random token ids (batch, seq), every position a target, one example per row."""
  ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, seq))
  return {"input_ids": jnp.asarray(ids, jnp.int32),
          "loss_mask": jnp.ones((batch, seq), jnp.float32),
          "segment_ids": jnp.ones((batch, seq), jnp.int32)}


def lm_loss(cfg: llama.LlamaConfig, *, merged: bool = False) -> steps.TaskLoss:
  """The step's task loss: `CausalLM` of the decoder's logits; `merged` merges the adapted
  weights into dense ones first (the merged-LoRA mode)."""
  def task_loss(params, batch, rng):
    del rng   # deterministic steps
    params = lj.merge(params) if merged else params
    return CAUSAL_LM.loss(llama.causal_lm_logits(params, cfg, batch), batch)
  return task_loss


def compiled_run(adapter, base, state, loss, optimizer, batch, head=None):
  """(run, compiled step) of `adapter`: `run(batch)` takes one compiled `steps.make_train_step`
  step (state donated) and returns its loss; `run.last` holds the last step's metrics."""
  step = steps.make_train_step(adapter, loss, optimizer)
  holder = [steps.init_train_state(state, optimizer, head=head)]
  compiled = step.lower(holder[0], base, batch).compile()

  def run(b):
    holder[0], run.last = compiled(holder[0], base, b)
    return run.last["loss"]
  return run, compiled


def step_gib(compiled) -> float | None:
  """The compiled step's memory (arguments + outputs - aliased outputs + temporaries), GiB."""
  mem = compiled.memory_analysis()
  if mem is None:
    return None
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
           + mem.temp_size_in_bytes)
  return round(total / GIB, 4)


def process_peak_gib() -> float:
  """Measured peak: the device allocator's on an accelerator, the process RSS on CPU."""
  stats = jax.local_devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    return round(stats["peak_bytes_in_use"] / GIB, 4)
  return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 4)   # KiB


def flops_per_token(cfg: llama.LlamaConfig, params_total: int, seq: int, full: bool) -> float:
  """Training FLOPs per token, in the PEFT baseline's accounting (see the module docstring)."""
  n_lin = params_total - cfg.vocab_size * cfg.hidden_size
  return (6 if full else 4) * n_lin + 6 * cfg.num_layers * seq * cfg.hidden_size


def build_mode(name, params, cfg, rank, optimizer, batch, total_steps):
  """(run, compiled step, trainable params, setup seconds, compile seconds) of mode `name`; setup
  is the adapter's init (with its calibration, if any)."""
  t0 = time.perf_counter()
  if name == "full":
    adapter, base, state, loss, head = (lj.identity(), params, lj.AdapterState({}, {}),
                                        lm_loss(cfg), params)
  else:
    method = "lora" if name == "lora_merged" else name
    adapter = registry.configured_adapter(method, rank, TARGETS, total_steps=total_steps)
    stats = None
    if registry.needs_stats(method):
      stats = calibrate.collect(lambda p, b: llama.causal_lm_logits(p, cfg, b), params, [batch],
                                TARGETS, sample_scale=registry.facts(method).stats_sample_scale)
    base, state = jax.block_until_ready(adapter.init(jax.random.key(0), params, stats))
    loss, head = lm_loss(cfg, merged=name == "lora_merged"), None
  t1 = time.perf_counter()
  run, compiled = compiled_run(adapter, base, state, loss, optimizer, batch, head=head)
  n_train = lj.tree.tree_size(head) if name == "full" else lj.count_params(state)
  return run, compiled, n_train, t1 - t0, time.perf_counter() - t1


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--preset", default="tiny", choices=sorted(llama.PRESETS))
  ap.add_argument("--dtype", default="f32", choices=sorted(DTYPES), help="base weights' dtype")
  ap.add_argument("--batch", type=int, default=None,
                  help=f"default {DEFAULT_SHAPES['tiny'][0]} (tiny), else {BASELINE_SHAPE[0]}")
  ap.add_argument("--seq", type=int, default=None,
                  help=f"default {DEFAULT_SHAPES['tiny'][1]} (tiny), else {BASELINE_SHAPE[1]}")
  ap.add_argument("--rank", type=int, default=16, help="the generic size knob of every method")
  ap.add_argument("--methods", default=",".join(SEED_METHODS),
                  help="comma-separated registry methods timed besides full, lora, lora_merged")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--steps", type=int, default=2, help="timed steps per mode per round")
  ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the device")
  args = ap.parse_args(argv)
  default_batch, default_seq = DEFAULT_SHAPES.get(args.preset, BASELINE_SHAPE)
  args.batch = default_batch if args.batch is None else args.batch
  args.seq = default_seq if args.seq is None else args.seq
  methods = [m for m in args.methods.split(",") if m]
  unknown = [m for m in methods if m not in registry.list_methods() or m == "none"]
  if unknown:
    ap.error(f"--methods: unknown {unknown}; valid: "
             f"{[m for m in registry.list_methods() if m != 'none']}")
  args.modes = ["full", "lora", "lora_merged", *[m for m in methods if m != "lora"]]
  return args


def main(argv=None):
  args = parse_args(argv)
  cfg = llama.LlamaConfig.preset(args.preset)
  params = llama.init(jax.random.key(0), cfg, dtype=DTYPES[args.dtype])
  params_total = lj.tree.tree_size(params)
  batch = random_batch(cfg, args.batch, args.seq)
  optimizer = optax.adamw(1e-4, weight_decay=0.01)
  total_steps = 2 + args.rounds * args.steps
  device = jax.devices()[0]
  common = {"framework": "lowrank_jax", "preset": args.preset, "dtype": args.dtype,
            "batch": args.batch, "seq": args.seq, "device": device.device_kind,
            "jax": jax.__version__}
  print(json.dumps({**common, "backend": jax.default_backend(), "rank": args.rank,
                    "targets": TARGETS, "params_total": params_total}), flush=True)

  modes = {}
  for name in args.modes:
    try:
      run, compiled, n_train, setup_s, compile_s = build_mode(name, params, cfg, args.rank,
                                                              optimizer, batch, total_steps)
      t0 = time.perf_counter()
      for _ in range(2):
        jax.block_until_ready(run(batch))
      modes[name] = {"run": run, "peak_gib": step_gib(compiled), "params_trainable": n_train,
                     "setup_s": round(setup_s, 2), "compile_s": round(compile_s, 2),
                     "warmup_s": round(time.perf_counter() - t0, 2),
                     "process_peak_gib": process_peak_gib()}
    except Exception as e:  # noqa: BLE001 - one mode that cannot run must not hide the others
      if name == "full":
        raise
      print(json.dumps({**common, "method": name, "skipped": f"{type(e).__name__}: {e}"[:400]}),
            flush=True)

  wall, cpu = bench.time_round_robin({name: m["run"] for name, m in modes.items()}, batch,
                                     args.rounds, args.steps)
  full_s = float(np.median(wall["full"]))
  paired = bench.paired_ratios(wall, "full", args.steps)
  tokens = args.batch * args.seq
  for name, m in modes.items():
    dt = float(np.median(wall[name]))
    tok_s = tokens / dt
    mfu = tok_s * flops_per_token(cfg, params_total, args.seq, name == "full") / (
        args.peak_tflops * 1e12)
    print(json.dumps({
        **common, "method": name, "compile": True, "ms_per_step": round(1e3 * dt, 2),
        "tokens_per_s": round(tok_s), "mfu": float(f"{mfu:.3g}"), "peak_gib": m["peak_gib"],
        "params_total": params_total, "params_trainable": m["params_trainable"],
        "setup_s": m["setup_s"], "loss": float(m["run"].last["loss"]),
        "ratio_to_full": round(dt / full_s, 3), **bench.paired_fields(paired[name]),
        "min_ms": round(1e3 * min(wall[name]), 2),
        "cpu_ms_per_step": round(1e3 * float(np.median(cpu[name])), 2),
        "compile_s": m["compile_s"], "warmup_s": m["warmup_s"],
        "process_peak_gib": m["process_peak_gib"]}), flush=True)


if __name__ == "__main__":
  main()
