"""Our decoder step against Hugging Face PEFT on one device, side by side, with the speed goals.

    python -m experiments.bench_vs_peft --peft_script ../shared/bench/peft_baseline.py

runs these one after the other on the same machine (each in its own process, so neither holds
device memory while the other runs), echoing their JSON rows:

    python -m experiments.bench_llm --preset tinyllama_1_1b --dtype bf16 --batch 8 --seq 1024 \\
        --rank 16 --remat nothing_saveable --rounds 3 --steps 5 --methods <the seed adapters>
    python <peft_script> --preset llama1b --methods full,lora,lokr --batch 8 --seq 1024 \\
        --rank 16 --steps 10
    python <peft_script> --preset llama1b --methods lora --compile --batch 8 --seq 1024 \\
        --rank 16 --steps 10

then one row per goal (`goals`) with both figures, their ratio, the target and whether it is met:

    lora_vs_peft_compiled_tokens  our LoRA tokens/s over PEFT LoRA + torch.compile's   >= 1.6
    lora_vs_peft_compiled_memory  our LoRA step memory over PEFT LoRA + compile's peak  <= 1.0
    krona_vs_peft_lokr_tokens     our KronA tokens/s over PEFT LoKr's                   >= 8
    krona_vs_lora_tokens          our KronA tokens/s over our LoRA's                    >= 0.9
    <method>_vs_lora_step         each seed adapter's step time over our LoRA's         <= 1.3

One seed adapter cannot meet its step goal by construction: `intrinsic` (a d-dimensional subspace
of every adapted kernel) trains θ through the gradient Pᵀ·vec(∂L/∂W), so its step forms the dense
weight gradient of every adapted kernel, as full fine-tuning does, plus the Fastfood transforms
(`python -m experiments.bench_llm --preset small --batch 8 --seq 128` on the 2-core CPU: 1.30x
the full fine-tuning step, 2.25x LoRA's; the other seed adapters 0.92-1.17x LoRA's).

The remat policy defaults to nothing_saveable: at this shape it is the only one whose memory plan
(`bench_llm --plan`) fits under PEFT's measured peak (10.7 GiB planned; 91.4 without remat, where
XLA's attention keeps every head's score matrices). `--attention cudnn --remat none` is the variant
to try next to it on a GPU: cuDNN's flash attention stores no scores (not yet run here). Our memory
figure is `bench_llm`'s `peak_gib` (the compiled step's buffers: params, optimizer state,
gradients, activations), PEFT's is torch's peak allocated memory. A goal whose row is missing or
skipped prints `met: null` with the reason. The PEFT script needs CUDA, torch, transformers and
peft; `--peft_python` is the interpreter that has them (default: this one; checked before anything
runs). The exit status is nonzero, naming the command, when either benchmark fails.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from experiments import bench
from experiments import bench_llm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Our Llama presets and the PEFT script's presets of the same shapes.
PEFT_PRESETS = {"tinyllama_1_1b": "llama1b"}
TOKENS_VS_PEFT_COMPILED = 1.6
MEMORY_VS_PEFT_COMPILED = 1.0
KRONA_VS_PEFT_LOKR = 8.0
KRONA_VS_LORA = 0.9
SEED_STEP_VS_LORA = 1.3


def _goal(name, ours, theirs, field, target, at_least, ours_label, theirs_label):
  """One goal row: `ours[field] / theirs[field]` against `target` (a floor or a ceiling)."""
  row = {"goal": name, "ours": ours_label, "theirs": theirs_label, "field": field,
         "target": (">= " if at_least else "<= ") + f"{target:g}"}
  for label, r in ((ours_label, ours), (theirs_label, theirs)):
    if r is None:
      return {**row, "met": None, "why": f"no row for {label}"}
    if "skipped" in r or "error" in r:
      return {**row, "met": None, "why": f"{label}: {r.get('skipped') or r.get('error')}"}
    if r.get(field) is None:
      return {**row, "met": None, "why": f"{label}: no {field}"}
  ratio = ours[field] / theirs[field]
  return {**row, "ours_value": ours[field], "theirs_value": theirs[field],
          "ratio": round(ratio, 3), "met": ratio >= target if at_least else ratio <= target}


def goals(ours: list[dict], peft: list[dict]) -> list[dict]:
  """The goal rows from `bench_llm`'s rows (`ours`) and the PEFT script's (`peft`).

  Raises:
    ValueError: the two sides were run at different batch or sequence sizes.
  """
  ours_by = {r["method"]: r for r in ours if "method" in r}
  peft_by = {(r["method"], bool(r.get("compile"))): r for r in peft if "method" in r}
  shapes = {(r["batch"], r["seq"]) for r in [*ours_by.values(), *peft_by.values()]
            if "batch" in r and "seq" in r}
  if len(shapes) > 1:
    raise ValueError(f"goals: the benchmarks ran at different (batch, seq): {sorted(shapes)}")
  lora = ours_by.get("lora")
  compiled = peft_by.get(("lora", True))
  rows = [
      _goal("lora_vs_peft_compiled_tokens", lora, compiled, "tokens_per_s",
            TOKENS_VS_PEFT_COMPILED, True, "lora", "peft lora + torch.compile"),
      _goal("lora_vs_peft_compiled_memory", lora, compiled, "peak_gib",
            MEMORY_VS_PEFT_COMPILED, False, "lora", "peft lora + torch.compile"),
      _goal("krona_vs_peft_lokr_tokens", ours_by.get("krona"), peft_by.get(("lokr", False)),
            "tokens_per_s", KRONA_VS_PEFT_LOKR, True, "krona", "peft lokr"),
      _goal("krona_vs_lora_tokens", ours_by.get("krona"), lora, "tokens_per_s", KRONA_VS_LORA,
            True, "krona", "lora"),
  ]
  for method in ours_by:
    if method not in ("full", "lora", "lora_merged"):
      rows.append(_goal(f"{method}_vs_lora_step", ours_by[method], lora, "ms_per_step",
                        SEED_STEP_VS_LORA, False, method, "lora"))
  return rows


def run_rows(cmd: list[str]) -> list[dict]:
  """Runs `cmd` in the repository root, echoes its stdout, returns the JSON objects among its
  lines.

  Raises:
    RuntimeError: `cmd` exited nonzero (the message names it and ends with its stderr's tail).
  """
  print(json.dumps({"running": " ".join(cmd)}), flush=True)
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO)
  rows = []
  for line in proc.stdout.splitlines():
    print(line, flush=True)
    if line.startswith("{"):
      rows.append(json.loads(line))
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} exited with status {proc.returncode}; stderr ends:\n"
                       f"{proc.stderr[-2000:]}")
  return rows


def commands(args) -> list[list[str]]:
  """Our benchmark's command and the PEFT script's two (eager full/LoRA/LoKr, compiled LoRA)."""
  shape = ["--batch", str(args.batch), "--seq", str(args.seq), "--rank", str(args.rank)]
  ours = [sys.executable, "-m", "experiments.bench_llm", "--preset", args.preset, "--dtype",
          args.dtype, *shape, "--remat", args.remat, "--attention", args.attention, "--rounds",
          str(args.rounds), "--steps", str(args.steps),
          *(["--scan_layers"] if args.scan_layers else []),
          "--methods", args.methods, "--peak-tflops", str(args.peak_tflops)]
  peft = [args.peft_python, args.peft_script, "--preset", args.peft_preset, *shape, "--steps",
          str(args.peft_steps), "--peak-tflops", str(args.peak_tflops)]
  return [ours, [*peft, "--methods", "full,lora,lokr"], [*peft, "--methods", "lora", "--compile"]]


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--peft_script", required=True, help="path of peft_baseline.py")
  ap.add_argument("--peft_python", default=sys.executable,
                  help="interpreter with torch, transformers and peft")
  ap.add_argument("--preset", default="tinyllama_1_1b", choices=sorted(bench_llm.llama.PRESETS))
  ap.add_argument("--peft_preset", default=None,
                  help=f"the PEFT script's preset (default: the same shape, {PEFT_PRESETS})")
  ap.add_argument("--dtype", default="bf16", choices=sorted(bench_llm.DTYPES))
  ap.add_argument("--batch", type=int, default=bench_llm.BASELINE_SHAPE[0])
  ap.add_argument("--seq", type=int, default=bench_llm.BASELINE_SHAPE[1])
  ap.add_argument("--rank", type=int, default=16)
  ap.add_argument("--methods", default=",".join(bench_llm.SEED_METHODS),
                  help="our methods timed besides full, lora, lora_merged")
  ap.add_argument("--remat", default="nothing_saveable",
                  choices=sorted(bench_llm.llama.REMAT_POLICIES))
  ap.add_argument("--attention", default="xla", choices=bench_llm.llama.ATTENTION_IMPLS)
  ap.add_argument("--scan_layers", action="store_true",
                  help="our layers as one lax.scan (compiles one layer instead of 22)")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--steps", type=int, default=5, help="our timed steps per mode per round")
  ap.add_argument("--peft_steps", type=int, default=10)
  ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the device")
  args = ap.parse_args(argv)
  bench.check_positive(ap, args, "batch", "seq", "rank", "rounds", "steps", "peft_steps")
  if not os.path.isfile(args.peft_script):
    ap.error(f"--peft_script: no file {args.peft_script!r}")
  args.peft_script = os.path.abspath(args.peft_script)
  if args.peft_preset is None:
    if args.preset not in PEFT_PRESETS:
      ap.error(f"--preset {args.preset} has no PEFT preset of its shape; valid: "
               f"{sorted(PEFT_PRESETS)}, or name one with --peft_preset")
    args.peft_preset = PEFT_PRESETS[args.preset]
  return args


PEFT_MODULES = ("torch", "transformers", "peft")


def check_peft_python(python: str) -> None:
  """Raises RuntimeError unless `python` imports the PEFT script's packages (checked first, so a
  missing one does not surface only after our benchmark has run)."""
  proc = subprocess.run([python, "-c", f"import {', '.join(PEFT_MODULES)}"], capture_output=True,
                        text=True, check=False)
  if proc.returncode != 0:
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise RuntimeError(f"--peft_python {python} cannot import {', '.join(PEFT_MODULES)} ({last}); "
                       f"point --peft_python at an interpreter that has them")


def main(argv=None) -> None:
  args = parse_args(argv)
  check_peft_python(args.peft_python)
  ours, *peft_cmds = commands(args)
  ours_rows = run_rows(ours)
  peft_rows = [row for cmd in peft_cmds for row in run_rows(cmd)]
  for row in goals(ours_rows, peft_rows):
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  try:
    main()
  except RuntimeError as e:
    sys.exit(f"bench_vs_peft: {e}")
