"""Benchmarks: the timing helpers, and smoke runs of both scripts on the tiny random encoder (the
figures themselves come from full runs by hand; these only check that the scripts run and print
well-formed rows)."""
import contextlib
import io
import json

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench
from experiments import bench_seed

_SMOKE = ["--model", "tiny", "--batch", "2", "--seq", "8", "--rounds", "2", "--steps", "1"]


def _rows(main, argv):
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    main(argv)
  return [json.loads(line) for line in out.getvalue().splitlines()]


def test_per_round_ratio_of_step_means():
  # 3 rounds x 2 steps, round-major; the machine is 2x slower in round 2 for both runs.
  times = {"ref": [1.0, 1.0, 2.0, 2.0, 1.0, 1.0],
           "x": [1.2, 1.4, 2.6, 2.6, 1.1, 1.1]}
  out = bench.paired_ratios(times, "ref", steps=2)
  np.testing.assert_allclose(out["ref"], (1.0, 1.0, 1.0))
  np.testing.assert_allclose(out["x"], (1.3, 1.1, 1.3))   # rounds: 1.3, 1.3, 1.1


def test_rejects_partial_rounds():
  with pytest.raises(ValueError, match="multiple of steps=2"):
    bench.paired_ratios({"ref": [1.0, 1.0, 1.0]}, "ref", steps=2)


def test_round_robin_feeds_paired_ratios():
  runs = {"ref": lambda b: jnp.sum(b), "x": lambda b: jnp.sum(b * 2)}
  wall, cpu = bench.time_round_robin(runs, jnp.ones((8,)), rounds=3, steps=2)
  assert {k: len(v) for k, v in wall.items()} == {"ref": 6, "x": 6}
  assert {k: len(v) for k, v in cpu.items()} == {"ref": 6, "x": 6}
  med, lo, hi = bench.paired_ratios(wall, "ref", steps=2)["x"]
  assert 0 < lo <= med <= hi


def test_bench():
  rows = _rows(bench.main, _SMOKE + ["--only", "lora_all_factored,head_only"])
  assert rows[0]["model"] == "random init (tiny preset)"
  modes = {r["mode"]: r for r in rows if "mode" in r}
  assert set(modes) == {"full_ft", "lora_all_factored", "head_only"}
  assert modes["full_ft"]["paired_ratio"] == 1.0
  for r in modes.values():
    assert r["ms_per_step"] > 0
    lo, hi = r["paired_ratio_range"]
    assert lo <= r["paired_ratio"] <= hi
  assert (modes["lora_all_factored"]["trainable_params"]
          < modes["full_ft"]["trainable_params"])
  gemms = [r for r in rows if "gemm" in r]
  assert [g["gemm"] for g in gemms] == ["gemm_16x64@64x128", "gemm_16x128@128x64",
                                        "gemm_16x64@64x64"]
  peak = next(r for r in rows if "peak_gflops_wall" in r)
  assert peak["peak_gflops_wall"] == max(g["gflops_wall"] for g in gemms)
  for r in modes.values():
    assert r["gflop"] > 0 and r["pct_of_peak_wall"] > 0 and r["pct_of_peak_cpu"] > 0


def test_step_flops_formula():
  """The FLOP formula against counts taken another way: kernel and adapter parameter counts."""
  import jax
  import lowrank_jax as lj
  params, cfg, _ = bench.build_model(preset="tiny")
  b, t, r = 2, 8, 4
  n = b * t
  named, _ = lj.tree.flatten_with_names(params["encoder"])
  f = 2 * n * sum(x.size for k, x in named if k.endswith("kernel"))       # 2 flops per MAC
  att = cfg.num_layers * 2 * (2 * b * t * t * cfg.hidden_size)            # q·kᵀ and p·v
  hd = 2 * b * cfg.hidden_size * 41
  fwd = f + att + hd
  assert bench.step_flops(params, cfg, b, t, "forward") == fwd
  assert bench.step_flops(params, cfg, b, t, "full") == 3 * fwd
  assert bench.step_flops(params, cfg, b, t, "head") == fwd + 2 * hd
  _, st = lj.lora(r, targets=bench.ALL_LINEAR).init(jax.random.key(0), params)
  # per layer r·(d_in + d_out): q, k, v, o 4·(64 + 64), MLP 2·(64 + 128); 2 layers
  assert lj.count_params(st) == 2 * r * (4 * 128 + 2 * 192)
  ad = 2 * n * lj.count_params(st)       # every A and B entry is one MAC per token
  assert bench.step_flops(params, cfg, b, t, "factored", bench.ALL_LINEAR, r) == (
      fwd + ad + f + 2 * att + 2 * hd + 2 * ad)
  with pytest.raises(ValueError, match="kind="):
    bench.step_flops(params, cfg, b, t, "sideways")


def test_bench_seed():
  rows = _rows(bench_seed.main, _SMOKE + ["--nola_k", "16", "--fastfood_d", "16,64"])
  modes = {r["mode"]: r for r in rows[1:]}
  assert set(modes) == {"lora", "krona", "diffkrona", "nola", "loldu", "sorsa",
                       "fastfood_d16", "fastfood_d64"}
  assert modes["lora"]["paired_ratio"] == 1.0
  assert {m: modes[m].get("goal") for m in bench_seed.GOALS} == {
      "krona": "<= 1.2x", "diffkrona": "<= 1.2x", "nola": "<= 1.5x", "loldu": "<= 1.2x",
      "sorsa": "<= 1.2x"}
  assert modes["loldu"]["trainable_params"] == 8 * 12   # r per target, 2 layers x 6
  for d in (16, 64):
    ff = modes[f"fastfood_d{d}"]
    assert ff["d"] == d
    assert ff["step_total_MB"] > 0
    assert np.isfinite(ff["loss"])

