"""Decoder-LM benchmark: a smoke run on the tiny Llama (the figures themselves come from full runs
by hand; this checks that every listed mode runs or prints why not, with the PEFT baseline's
fields and self-consistent figures)."""
import contextlib
import dataclasses
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench_llm
from lowrank_jax.models import llama

# Every field of a row of ../shared/bench/peft_baseline.py but its torch/transformers versions.
PEFT_FIELDS = {"method", "preset", "batch", "seq", "compile", "ms_per_step", "tokens_per_s", "mfu",
               "peak_gib", "params_total", "params_trainable", "setup_s", "loss", "device"}
BATCH, SEQ, RANK = 2, 8, 2
# llama "tiny": hidden 64, MLP 128, 2 layers, 4 query heads of 16 over 2 kv heads, vocab 256.
HIDDEN, LAYERS, VOCAB = 64, 2, 256
PROJ_SIZES = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]


def _rows(argv):
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    bench_llm.main(argv)
  return [json.loads(line) for line in out.getvalue().splitlines()]


@pytest.fixture(scope="module")
def rows():
  """One smoke run of the benchmark, shared by the tests that read its rows."""
  return _rows(["--preset", "tiny", "--batch", str(BATCH), "--seq", str(SEQ), "--rank",
                str(RANK), "--rounds", "2", "--steps", "1", "--methods", "krona,diffusekrona"])


def test_every_listed_mode_ran_or_says_why_not(rows):
  header, modes = rows[0], {r["method"]: r for r in rows[1:]}
  assert header["preset"] == "tiny"
  assert set(modes) == {"full", "lora", "lora_merged", "krona", "diffusekrona"}
  # DiffuseKronA's factors (64, 8) do not divide the tiny model's 32 key/value outputs.
  assert "a1=64 does not divide d_out=32" in modes["diffusekrona"]["skipped"]
  for name in ("full", "lora", "lora_merged", "krona"):
    assert PEFT_FIELDS <= set(modes[name]), name


def test_figures(rows):
  header, modes = rows[0], {r["method"]: r for r in rows[1:] if "skipped" not in r}
  n_total = header["params_total"]
  lora_params = RANK * sum(i + o for i, o in PROJ_SIZES) * LAYERS
  assert modes["full"]["params_trainable"] == n_total
  assert modes["lora"]["params_trainable"] == lora_params
  assert modes["lora_merged"]["params_trainable"] == lora_params
  assert modes["full"]["paired_ratio"] == 1.0
  for name, r in modes.items():
    assert (r["batch"], r["seq"], r["params_total"]) == (BATCH, SEQ, n_total)
    assert np.isfinite(r["loss"]) and r["loss"] > 0, name
    assert r["peak_gib"] > 0
    assert r["process_peak_gib"] > 0
    assert (abs(r["tokens_per_s"] - BATCH * SEQ / (r["ms_per_step"] / 1e3))
          <= 0.01 * r["tokens_per_s"] + 1)
    n_lin = n_total - VOCAB * HIDDEN
    flops = (6 if name == "full" else 4) * n_lin + 6 * LAYERS * SEQ * HIDDEN
    np.testing.assert_allclose(r["mfu"], r["tokens_per_s"] * flops / 989e12, rtol=0.02)
    lo, hi = r["paired_ratio_range"]
    assert lo <= r["paired_ratio"] <= hi, name


def test_remat_and_scan_change_no_loss(rows):
  """The same steps with every layer rematerialized, the layers scanned: the losses of the run
  without."""
  remat = _rows(["--preset", "tiny", "--batch", str(BATCH), "--seq", str(SEQ), "--rank",
                 str(RANK), "--rounds", "2", "--steps", "1", "--methods", "", "--remat",
                 "nothing_saveable", "--scan_layers"])
  assert (rows[0]["remat"], rows[0]["scan_layers"]) == ("none", False)
  assert (remat[0]["remat"], remat[0]["scan_layers"]) == ("nothing_saveable", True)
  plain = {r["method"]: r["loss"] for r in rows[1:] if "loss" in r}
  again = {r["method"]: r["loss"] for r in remat[1:]}
  assert set(again) == {"full", "lora", "lora_merged"}
  for name, loss in again.items():
    np.testing.assert_allclose(loss, plain[name], rtol=1e-5, err_msg=name)


def test_unknown_method_is_refused():
  with contextlib.redirect_stderr(io.StringIO()) as err, pytest.raises(SystemExit):
    bench_llm.parse_args(["--methods", "lora2"])
  assert "--methods: unknown ['lora2']" in err.getvalue()
  with contextlib.redirect_stderr(io.StringIO()) as err, pytest.raises(SystemExit):
    bench_llm.parse_args(["--batch", "0"])   # used to time empty batches (loss 0, 0 tokens/s)
  assert "--batch must be >= 1, got 0" in err.getvalue()



# Bytes of the adapted projections of the tiny model, stored bf16 (2 bytes per weight) or NF4
# (half a byte per weight and one float32 absmax per block of 64 weights).
N_PROJ = LAYERS * sum(i * o for i, o in PROJ_SIZES)
NF4_SAVING = 2 * N_PROJ - (N_PROJ // 2 + 4 * N_PROJ // 64)


def test_memory_plan_at_tiny_shapes(fast_compile):
  """The plan's arithmetic and fit flags; the NF4 base's argument bytes are below bf16's by exactly
  what the format stores, and its whole step by at least half of that (its dequantized kernels are
  temporaries of one layer at a time)."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    bench_llm.main(["--plan", "--plan-presets", "tiny", "--plan-bases", "bf16,nf4",
                    "--plan-remats", "nothing_saveable", "--seq", str(SEQ), "--rank", str(RANK),
                    "--plan-devices", "1e-6,80"])
  rows = {r["base"]: r for r in map(json.loads, out.getvalue().splitlines()[:2])}
  assert set(rows) == {"bf16", "nf4"}
  for r in rows.values():
    assert (r["preset"], r["remat"], r["batch"], r["seq"]) == ("tiny", "nothing_saveable", 1, SEQ)
    assert r["total_bytes"] == (r["arguments_bytes"] + r["outputs_bytes"] - r["aliased_bytes"]
                                + r["temporaries_bytes"])
    assert r["fits_80gib"] and not r["fits_1e-06gib"]
  assert rows["bf16"]["arguments_bytes"] - rows["nf4"]["arguments_bytes"] == NF4_SAVING
  assert rows["bf16"]["total_bytes"] - rows["nf4"]["total_bytes"] >= NF4_SAVING // 2
  for r in rows.values():   # the verdict's rule, from the row's own parts
    assert r["compiled_scan"] and r["stacked_layers_bytes"] > 0
    assert r["compiled_loop_bytes"] == r["total_bytes"] - r["stacked_layers_bytes"]
    assert r["estimate_bytes"] == (r["arguments_bytes"] + r["outputs_bytes"] - r["aliased_bytes"]
                                   + r["activations_bytes"])
    assert r["activations_bytes"] == (LAYERS * r["saved_layer_bytes"] + r["work_layer_bytes"]
                                      + 2 * r["head_bytes"])
    assert r["planned_bytes"] == max(r["estimate_bytes"], r["compiled_loop_bytes"])
  lines = [l for l in out.getvalue().splitlines() if l.startswith("tiny ")]
  assert len(lines) == 2 and all("fits 1e-06 GiB: no, fits 80 GiB: yes" in l for l in lines)


def test_residual_bytes_closed_forms():
  x = jax.ShapeDtypeStruct((8, 16), jnp.float32)
  w = jax.ShapeDtypeStruct((16, 32), jnp.float32)
  sin_of_product = lambda x, w: jnp.sum(jnp.sin(x @ w))
  # The backward of sin(x @ w) keeps cos(x @ w), one (8, 32) float32 array (and the constant w,
  # which costs nothing extra); that of x * x keeps x itself.
  assert bench_llm.residual_bytes(sin_of_product, (x,), (w,), 0) == (8 * 32 * 4, 0)
  assert bench_llm.residual_bytes(lambda x: jnp.sum(x * x), (x,), (), 0) == (0, 8 * 16 * 4)
  # Differentiated with respect to w too, the product needs x: kept, and counted when tracked.
  assert bench_llm.residual_bytes(sin_of_product, (x, w), (), 0) == (8 * 32 * 4, 8 * 16 * 4)


def test_activation_estimate_of_a_rematerialized_layer():
  """Under nothing_saveable a layer keeps its input (bf16) and the bf16 casts of its LoRA factors
  (rank x (d_in + d_out) per projection); without remat it keeps at least the float32 attention
  scores of every head."""
  cfg = dataclasses.replace(llama.LlamaConfig.preset("tiny"), compute_dtype="bfloat16")
  batch, seq = 2, 16
  factors = 2 * RANK * sum(i + o for i, o in PROJ_SIZES)
  est = bench_llm.activation_estimate(dataclasses.replace(cfg, remat="nothing_saveable"), "nf4",
                                      RANK, batch, seq)
  assert est["saved_layer_bytes"] == batch * seq * HIDDEN * 2 + factors
  none = bench_llm.activation_estimate(cfg, "nf4", RANK, batch, seq)
  assert none["work_layer_bytes"] == est["work_layer_bytes"] == none["saved_layer_bytes"]
  assert none["saved_layer_bytes"] >= batch * cfg.num_heads * seq * seq * 4


def test_lora_on_nf4_trains(fast_compile):
  """fp32 LoRA and AdamW state on an NF4 base (bf16 compute, remat) fit a fixed batch."""
  r = bench_llm.train_check("tiny", "nf4", 5, 2, SEQ, RANK, 1e-2)
  assert (r["base"], r["steps"]) == ("nf4", 5)
  assert r["last_loss"] < r["first_loss"] - 0.05, r
  assert r["state_dtypes"] == ["float32", "int32"]


def test_bad_plan_lists_are_refused():
  with contextlib.redirect_stderr(io.StringIO()) as err, pytest.raises(SystemExit):
    bench_llm.parse_args(["--plan", "--plan-bases", "bf16,fp8"])
  assert "--plan-bases: unknown ['fp8']" in err.getvalue()
