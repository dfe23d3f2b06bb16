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

all adapters on the q, k, v, o, gate, up and down projections of every layer, every layer under the
`--remat` policy (`LlamaConfig.remat`; default none), attention by `--attention`
(`LlamaConfig.attention`: "xla", the default, or "cudnn", cuDNN's flash attention on a GPU), and
the layers as one `lax.scan` with `--scan_layers` (compiles one layer instead of all). A mode
that cannot be built or run on the decoder prints a row with its `skipped` reason instead. The
modes are timed round-robin in one process (machine noise hits them alike): medians, ratios to
`full` (of medians, and the median and range over rounds of the per-round paired ratio, as
`experiments.bench`).

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

Memory plan (`--plan`), for shapes larger than the machine: nothing is allocated. The params, the
adapter state and the train state are shapes only (`jax.eval_shape`). One row per preset x base
(bf16, or the projections quantized to int8 / NF4 with `lowrank_jax.quant`) x remat policy, for
the LoRA step (`steps.make_train_step`, r=16 alpha 32 on the seven projections, AdamW, bf16
compute, fp32 adapter and optimizer state, batch 1 x seq 2048, one device, no mesh):

  state     arguments + outputs - outputs aliased to the donated train state, from the ahead-of-
            time compiled step's `memory_analysis()`: base params, adapter, optimizer state and
            batch; exact on any backend.
  act       the analytic activation estimate (`activation_estimate`), for the unrolled layers:
            `layers * saved(remat) + saved("none") + 2 * head`. `saved(p)` is what autodiff keeps
            from one decoder layer's forward for its backward under remat policy p, read off the
            traced `jax.vjp` (`residual_bytes`: shapes only, the same on every backend): the layer
            input under "nothing_saveable"; under "none" also the projections' inputs and
            outputs, the norms' float32 values and, per head, (seq, seq) arrays of attention
            scores and probabilities (two float32, one bf16) and of the mask (bool), 11 bytes per
            entry (`jax.nn.dot_product_attention`'s XLA implementation, the default on GPU
            too). The second term is the working set of one layer's backward (its residuals
            recomputed, or as many gradient temporaries), `head` the residuals of the final norm,
            lm head and float32 cross-entropy (twice: with the logits' gradient).
  estimate  state + act.
  XLA       the compiled step's total (arguments + outputs - aliased + temporaries), compiled with
            `scan_layers` (`--plan-loop`: the unrolled loop), less one copy of the stacked layer
            params that the scan makes and the loop does not. Compiling the loop would not do:
            XLA:CPU's buffer assignment of the unrolled layers ignores `jax.checkpoint` (a frozen
            8-layer chain of 8192 tokens reports 288 MiB of temporaries without remat and 296 MiB
            with it), while the scan's residuals are its stacked outputs, so its temporaries show
            the policy (the `small` preset at seq 2048: 1.66 GiB without remat, 0.60 GiB with
            nothing_saveable). XLA:CPU keeps the stacked params more than once (7B bf16 with
            remat: 34.1 GiB of temporaries, 12.2 GiB per copy), so this figure is an upper bound
            for a bf16 base.
  planned   max(estimate, XLA). A row fits a device of G GiB when planned <= 0.9 G
            (`--plan-usable`: the rest for the runtime, library workspaces and fragmentation).

Measured (2026-12-02, this 2-core shared CPU, XLA:CPU of jax 0.10.2; 253 s CPU, 26 min wall
under load), GiB:

  preset          base  remat              state    act  estimate    XLA  planned  80 GB  24 GB
  tinyllama_1_1b  bf16  none                2.19  37.97     40.16  38.99    40.16  yes    no
  tinyllama_1_1b  bf16  nothing_saveable    2.19   2.37      4.56   6.93     6.93  yes    yes
  tinyllama_1_1b  int8  none                1.29  37.97     39.26  35.86    39.26  yes    no
  tinyllama_1_1b  int8  nothing_saveable    1.29   2.37      3.66   4.21     4.21  yes    yes
  tinyllama_1_1b  nf4   none                0.89  37.97     38.87  35.72    38.87  yes    no
  tinyllama_1_1b  nf4   nothing_saveable    0.89   2.37      3.27   3.84     3.84  yes    yes
  llama2_7b       bf16  none               13.00  63.31     76.30  89.42    89.42  no     no
  llama2_7b       bf16  nothing_saveable   13.00   3.09     16.09  34.93    34.93  yes    no
  llama2_7b       int8  none                6.97  63.31     70.28  70.74    70.74  yes    no
  llama2_7b       int8  nothing_saveable    6.97   3.09     10.06  11.15    11.15  yes    yes
  llama2_7b       nf4   none                4.33  63.31     67.63  68.14    68.14  yes    no
  llama2_7b       nf4   nothing_saveable    4.33   3.09      7.42   8.91     8.91  yes    yes

("80 GB" / "24 GB": the verdict for 80 and 24 GiB devices.) So by these numbers Llama-2-7B LoRA
at seq 2048 fits one 80 GB device with remat (and not without it on a bf16 base), and with an NF4
base and remat one 24 GB device (8.9 GiB planned). Without remat a layer keeps 1.9 GiB at 7B
(1.6 GiB at 1.1B), mostly attention scores. These are plans, not measurements on a GPU: its
fusion can keep less than XLA:CPU's buffer assignment, and the formula leaves out what it does
not trace (XLA's own scratch, cuDNN workspaces), which the 10% margin is for.

At the PyTorch PEFT baseline's shape (`--plan --plan-presets tinyllama_1_1b --plan-bases bf16
--batch 8 --seq 1024 --rank 16`; PEFT + torch.compile peaked at 20.2 GiB there), planned GiB per
remat policy: none 91.44 (a layer keeps 3.75 GiB for its backward, 2.75 of it attention scores and
probabilities), nothing_saveable 10.67, dots_with_no_batch_dims_saveable 32.41 (estimate 19.55),
dots_saveable 55.46: only nothing_saveable fits under PEFT's peak, so the timed modes take
`--remat` (default none).

    python -m experiments.bench_llm --plan                          # 1.1B and 7B at seq 2048
    python -m experiments.bench_llm --plan --plan-train 30          # + a short NF4 vs bf16 run

`--plan-train N` also trains LoRA for N steps on one fixed random batch (the loss must fall as the
adapter fits it) on `--plan-train-preset`, on a bf16 base and on an NF4 base, and prints the first
and last loss and the compiled step memory of each.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import time

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core
import numpy as np
import optax

import lowrank_jax as lj
from experiments import bench
from lowrank_jax import calibrate
from lowrank_jax import quant
from lowrank_jax import registry
from lowrank_jax import steps
from lowrank_jax import tasks
from lowrank_jax.models import _layers
from lowrank_jax.models import llama

TARGETS = r"layers/layer_\d+/(attention|mlp)/\w+_proj/kernel"
SEED_METHODS = ("loldu", "krona", "diffusekrona", "nola", "sorsa", "flora", "intrinsic")
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
# (batch, seq) when the flags leave them out: the CI preset runs in seconds on CPU, the others
# default to the PEFT baseline's shape.
DEFAULT_SHAPES = {"tiny": (4, 32)}
BASELINE_SHAPE = (8, 1024)
PLAN_SEQ = 2048
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


# ---------------------------------------------------------------------------------------------
# Memory plan (--plan): AOT-compiled step memory on abstract shapes.
# ---------------------------------------------------------------------------------------------

PLAN_PRESETS = ("tinyllama_1_1b", "llama2_7b")
PLAN_BASES = ("bf16", "int8", "nf4")
PLAN_REMATS = ("none", "nothing_saveable")
# The share of a device's memory a step may plan for: the rest is left to the runtime (CUDA
# context, cuDNN / cuBLAS workspaces, allocator fragmentation).
PLAN_USABLE = 0.9


def _nbytes(aval) -> int:
  return int(np.prod(aval.shape)) * np.dtype(aval.dtype).itemsize


def residual_bytes(fn, primals: tuple, consts: tuple, tracked: int) -> tuple[int, int]:
  """What reverse-mode autodiff of `fn(*primals, *consts)` (with respect to `primals`) keeps from
  the forward for the backward, read off the traced `jax.vjp` (shapes only, nothing runs):
  (bytes of the buffers the forward creates and keeps, bytes of `primals[tracked]` if it is
  kept itself). Arguments that are kept cost nothing extra (they exist anyway), except the
  tracked one, a layer input that the caller counts per layer."""
  def residuals(p, c):
    _, f_vjp = jax.vjp(lambda *q: fn(*q, *c), *p)
    return jax.tree.leaves(f_vjp)
  jaxpr = jax.make_jaxpr(residuals)(primals, consts).jaxpr
  n_before = len(jax.tree.leaves(primals[:tracked]))
  n_tracked = len(jax.tree.leaves(primals[tracked]))
  index = {v: i for i, v in enumerate(jaxpr.invars)}
  consts_in = set(jaxpr.constvars)
  created = kept_input = 0
  seen = set()
  for v in jaxpr.outvars:
    if isinstance(v, jax_core.Literal) or v in seen or v in consts_in:
      continue
    seen.add(v)
    if v in index:
      if n_before <= index[v] < n_before + n_tracked:
        kept_input += _nbytes(v.aval)
    else:
      created += _nbytes(v.aval)
  return created, kept_input


def activation_estimate(cfg: llama.LlamaConfig, base: str, rank: int, batch: int,
                        seq: int) -> dict:
  """Analytic activation memory of the (unrolled) LoRA step, from the residuals autodiff keeps.

  With `saved(p)` the bytes one decoder layer keeps for the backward under remat policy `p`
  (`residual_bytes` of the layer: LoRA on its projections over a `base` base, `cfg`'s compute
  dtype, differentiated with respect to the factors and the layer input; the input counts when
  it is kept) and `head` those of the final norm, the lm head and the float32 cross-entropy:

    activations = layers * saved(remat) + saved("none") + 2 * head

  `layers * saved(remat)`: every layer's residuals, alive together when the backward starts;
  `saved("none")`: the working set of one layer's backward (with remat, its residuals
  recomputed; without, as many gradient temporaries); `2 * head`: the logits' residuals and
  their gradient. Attention is `jax.nn.dot_product_attention`'s XLA implementation (the default
  on every backend here), whose residuals hold the (batch, heads, seq, seq) scores.

  Returns:
    {"saved_layer_bytes", "work_layer_bytes", "head_bytes", "activations_bytes"}.
  """
  one = dataclasses.replace(cfg, num_layers=1)
  params = lora_base(one, base)
  adapter = lj.lora(rank=rank, alpha=2.0 * rank, targets=TARGETS)
  base_p, state = jax.eval_shape(lambda p: adapter.init(jax.random.key(0), p), params)
  dtype = jnp.dtype(cfg.compute_dtype or jnp.float32)
  x = jax.ShapeDtypeStruct((batch, seq, cfg.hidden_size), dtype)
  positions = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  mask = jax.ShapeDtypeStruct((batch, 1, seq, seq), jnp.bool_)

  def layer(remat):
    fn = llama.decoder_layer
    if remat != "none":
      fn = jax.checkpoint(fn, policy=llama.REMAT_POLICIES[remat], static_argnums=(4, 7, 8))

    def run(trainable, h, base_p, state, positions, mask):
      p = llama.cast_to_compute(adapter.apply(base_p, lj.with_trainable(state, trainable)), one)
      return fn(p["layers"]["layer_0"], h, positions, mask, one, None, 0, 0, True, None)[0]
    created, kept = residual_bytes(run, (state.trainable, x), (base_p, state, positions, mask), 1)
    return created + kept

  batch_spec = jax.eval_shape(lambda: random_batch(cfg, batch, seq))

  def head(h, base_p, batch_spec):
    p = llama.cast_to_compute(base_p, one)
    logits = llama.lm_logits(p, _layers.rms_norm(p["final_norm"], h, cfg.rms_norm_eps), one)
    return CAUSAL_LM.loss(logits, batch_spec)[0]
  head_bytes = sum(residual_bytes(head, (x,), (base_p, batch_spec), 0))
  saved, work = layer(cfg.remat), layer("none")
  return {"saved_layer_bytes": saved, "work_layer_bytes": work, "head_bytes": head_bytes,
          "activations_bytes": cfg.num_layers * saved + work + 2 * head_bytes}


def memory_fields(compiled) -> dict:
  """{arguments, outputs, aliased, temporaries, total}_{gib,bytes} of a compiled step (see the
  module docstring)."""
  mem = compiled.memory_analysis()
  parts = {"arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
           "aliased": mem.alias_size_in_bytes, "temporaries": mem.temp_size_in_bytes}
  parts["total"] = (parts["arguments"] + parts["outputs"] - parts["aliased"]
                    + parts["temporaries"])
  return {**{f"{k}_gib": round(v / GIB, 3) for k, v in parts.items()},
          **{f"{k}_bytes": v for k, v in parts.items()}}


def lora_base(cfg: llama.LlamaConfig, base: str, *, tile_rows=None, key=None):
  """bf16 params of `cfg` with the adapted projections quantized as `base` says ("bf16": none);
  shapes only (`jax.eval_shape`) when `key` is None."""
  def make(k):
    params = llama.init(k, cfg, dtype=jnp.bfloat16)
    if base == "bf16":
      return params
    return quant.quantize(params, base, TARGETS, tile_rows=tile_rows)
  return jax.eval_shape(make, jax.random.key(0)) if key is None else jax.jit(make)(key)


def lora_step(cfg: llama.LlamaConfig, params, rank: int, lr: float = 1e-4):
  """(adapter, base, train state, jitted step) of LoRA r=`rank` (alpha 2r) on the projections."""
  adapter = lj.lora(rank=rank, alpha=2.0 * rank, targets=TARGETS)
  optimizer = optax.adamw(lr, weight_decay=0.01)
  abstract = isinstance(jax.tree.leaves(params)[0], jax.ShapeDtypeStruct)
  init = lambda p: adapter.init(jax.random.key(0), p)
  base, state = jax.eval_shape(init, params) if abstract else init(params)
  make_state = lambda s: steps.init_train_state(s, optimizer)
  train_state = jax.eval_shape(make_state, state) if abstract else make_state(state)
  return adapter, base, train_state, steps.make_train_step(adapter, lm_loss(cfg), optimizer)


def plan_row(preset: str, base: str, remat: str, batch: int, seq: int, rank: int,
             devices_gib, tile_rows=None, scan: bool = True, usable: float = PLAN_USABLE) -> dict:
  """One plan row: the compiled LoRA step's memory at `preset` shapes, the analytic activation
  estimate, and the fit verdict per device size (nothing allocated; see the module docstring)."""
  cfg = dataclasses.replace(llama.LlamaConfig.preset(preset), compute_dtype="bfloat16",
                            remat=remat)
  t0 = time.perf_counter()
  compiled_cfg = dataclasses.replace(cfg, scan_layers=scan)
  _, base_params, train_state, step = lora_step(
      compiled_cfg, lora_base(cfg, base, tile_rows=tile_rows), rank)
  batch_spec = jax.eval_shape(lambda: random_batch(cfg, batch, seq))
  compiled = step.lower(train_state, base_params, batch_spec).compile()
  mem = memory_fields(compiled)
  est = activation_estimate(cfg, base, rank, batch, seq)
  # The unrolled step's estimate: the exact arguments and outputs, the analytic activations.
  state_bytes = mem["arguments_bytes"] + mem["outputs_bytes"] - mem["aliased_bytes"]
  estimate = state_bytes + est["activations_bytes"]
  # The scanned step also holds the layer params stacked (`llama.stack_layers`), which the loop
  # does not: the compiled figure of the loop is the total less that copy.
  layers = jax.tree.leaves((base_params["layers"], train_state["adapter"]))
  stacked = sum(_nbytes(x) for x in layers) if scan else 0
  compiled_loop = mem["total_bytes"] - stacked
  planned = max(estimate, compiled_loop)
  row = {"plan": True, "preset": preset, "base": base, "remat": remat, "batch": batch,
         "seq": seq, "rank": rank, "tile_rows": tile_rows, "compiled_scan": scan, **mem,
         "stacked_layers_bytes": stacked, "compiled_loop_bytes": compiled_loop, **est,
         "estimate_bytes": estimate, "planned_bytes": planned,
         "planned_gib": round(planned / GIB, 3), "usable": usable}
  for g in devices_gib:
    row[f"fits_{g:g}gib"] = planned <= usable * g * GIB
  row.update(backend=jax.default_backend(), compile_s=round(time.perf_counter() - t0, 1))
  return row


def verdict_line(row: dict, devices_gib) -> str:
  """The row as one line of the plan table: estimate, compiled figure, verdict per device."""
  fits = ", ".join(f"fits {g:g} GiB: {'yes' if row[f'fits_{g:g}gib'] else 'no'}"
                   for g in devices_gib)
  gib = lambda k: f"{row[k] / GIB:6.2f}"
  return (f"{row['preset']:<15} {row['base']:<5} {row['remat']:<17} "
          f"state {gib('arguments_bytes')}  act {gib('activations_bytes')}  "
          f"estimate {gib('estimate_bytes')} | XLA:{row['backend']} {gib('compiled_loop_bytes')} | "
          f"planned {gib('planned_bytes')} GiB | {fits}")


def train_check(preset: str, base: str, num_steps: int, batch: int, seq: int, rank: int,
                lr: float) -> dict:
  """LoRA on a `base` base fitted to one fixed random batch for `num_steps` steps (bf16 compute,
  remat nothing_saveable, AdamW): first and last loss, the dtypes of the adapter and optimizer
  state, and the compiled step's memory."""
  cfg = dataclasses.replace(llama.LlamaConfig.preset(preset), compute_dtype="bfloat16",
                            remat="nothing_saveable")
  _, base_params, train_state, step = lora_step(
      cfg, lora_base(cfg, base, key=jax.random.key(0)), rank, lr)
  data = random_batch(cfg, batch, seq)
  compiled = step.lower(train_state, base_params, data).compile()
  losses = []
  for _ in range(num_steps):
    train_state, metrics = compiled(train_state, base_params, data)
    losses.append(float(metrics["loss"]))
  state_dtypes = {str(x.dtype) for x in jax.tree.leaves((train_state["adapter"],
                                                         train_state["opt"]))}
  return {"plan_train": True, "preset": preset, "base": base, "steps": num_steps, "batch": batch,
          "seq": seq, "rank": rank, "lr": lr, "first_loss": round(losses[0], 4),
          "last_loss": round(losses[-1], 4), "state_dtypes": sorted(state_dtypes),
          **memory_fields(compiled)}


def main_plan(args) -> None:
  lines = []
  for preset in args.plan_presets:
    for base in args.plan_bases:
      for remat in args.plan_remats:
        row = plan_row(preset, base, remat, args.batch, args.seq, args.rank, args.plan_devices,
                       args.plan_tile_rows, scan=not args.plan_loop, usable=args.plan_usable)
        print(json.dumps(row), flush=True)
        lines.append(verdict_line(row, args.plan_devices))
  print(f"# LoRA r={args.rank}, batch {args.batch} x seq {args.seq}, bf16 compute; planned = "
        f"max(estimate, XLA); a row fits a device when planned <= {args.plan_usable:g} x its "
        f"memory", flush=True)
  print("\n".join(lines), flush=True)
  if args.plan_train:
    for base in ("bf16", "nf4"):
      print(json.dumps(train_check(args.plan_train_preset, base, args.plan_train, 4, 64,
                                   args.rank, 1e-2)), flush=True)


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
  ap.add_argument("--remat", default="none", choices=sorted(llama.REMAT_POLICIES),
                  help="every decoder layer's remat policy in the timed steps (LlamaConfig.remat)")
  ap.add_argument("--attention", default="xla", choices=llama.ATTENTION_IMPLS,
                  help="LlamaConfig.attention of the timed steps (cudnn: CUDA GPUs, bf16)")
  ap.add_argument("--scan_layers", action="store_true",
                  help="LlamaConfig.scan_layers in the timed steps: one layer compiled, not all")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--steps", type=int, default=2, help="timed steps per mode per round")
  bench.add_host_memory_flag(ap)
  ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the device")
  ap.add_argument("--plan", action="store_true",
                  help="print the memory plan instead of timing (batch 1 x seq 2048 by default)")
  ap.add_argument("--plan-presets", default=",".join(PLAN_PRESETS))
  ap.add_argument("--plan-bases", default=",".join(PLAN_BASES))
  ap.add_argument("--plan-remats", default=",".join(PLAN_REMATS))
  ap.add_argument("--plan-devices", default="80,24", help="device sizes (GiB) to check against")
  ap.add_argument("--plan-usable", type=float, default=PLAN_USABLE,
                  help="share of a device's memory a step may use (the verdict's rule)")
  ap.add_argument("--plan-loop", action="store_true",
                  help="compile the unrolled layer loop (default: scan_layers, whose compiled "
                       "temporaries show the remat policy on every backend)")
  ap.add_argument("--plan-tile-rows", type=int, default=None,
                  help="quantized bases: input rows dequantized at a time (default: all)")
  ap.add_argument("--plan-train", type=int, default=0,
                  help="also train LoRA this many steps on a bf16 and an NF4 base")
  ap.add_argument("--plan-train-preset", default="tiny", choices=sorted(llama.PRESETS))
  args = ap.parse_args(argv)
  bench.check_positive(ap, args, "batch", "seq", "rank", "rounds", "steps")
  if args.plan:
    _parse_plan_args(ap, args)
    return args
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


def _parse_plan_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """Splits and checks the --plan-* lists (an unknown entry is an argparse error)."""
  args.batch = 1 if args.batch is None else args.batch
  args.seq = PLAN_SEQ if args.seq is None else args.seq
  for flag, valid in (("presets", llama.PRESETS), ("bases", PLAN_BASES),
                      ("remats", llama.REMAT_POLICIES)):
    values = [v for v in getattr(args, f"plan_{flag}").split(",") if v]
    unknown = [v for v in values if v not in valid]
    if unknown or not values:
      ap.error(f"--plan-{flag}: unknown {unknown}; valid: {sorted(valid)}")
    setattr(args, f"plan_{flag}", values)
  try:
    args.plan_devices = [float(v) for v in args.plan_devices.split(",")]
  except ValueError:
    ap.error(f"--plan-devices: {args.plan_devices!r} is not a comma-separated list of GiB")


def main(argv=None):
  args = parse_args(argv)
  if args.plan:
    main_plan(args)
    return
  bench.setup_host_memory(args)
  cfg = dataclasses.replace(llama.LlamaConfig.preset(args.preset), remat=args.remat,
                            attention=args.attention, scan_layers=args.scan_layers)
  params = llama.init(jax.random.key(0), cfg, dtype=DTYPES[args.dtype])
  params_total = lj.tree.tree_size(params)
  batch = random_batch(cfg, args.batch, args.seq)
  optimizer = optax.adamw(1e-4, weight_decay=0.01)
  total_steps = 2 + args.rounds * args.steps
  device = jax.devices()[0]
  common = {"framework": "lowrank_jax", "preset": args.preset, "dtype": args.dtype,
            "remat": args.remat, "attention": args.attention, "scan_layers": args.scan_layers,
            "batch": args.batch, "seq": args.seq,
            "device": device.device_kind, "jax": jax.__version__}
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
