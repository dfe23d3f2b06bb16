"""Smoke run of experiments.bench_flax on the tiny preset: it runs and prints well-formed rows (the
figures come from full runs by hand)."""
import contextlib
import io
import json

from experiments import bench_flax


def test_tiny_preset_prints_every_mode():
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    bench_flax.main(["--preset", "tiny", "--batch", "2", "--rank", "2", "--rounds", "1",
                     "--steps", "1"])
  header, *rows = [json.loads(line) for line in out.getvalue().splitlines()]
  assert header["batch"] == 2 and "stock linen ViT" in header["model"]
  assert [r["mode"] for r in rows] == ["full_ft", "lora_factored", "lora_merged"]
  for r in rows:
    assert {"ms_per_step", "ratio_to_full_ft", "paired_ratio", "paired_ratio_to_merged",
            "trainable_params"} <= set(r)
  assert rows[1]["trainable_params"] == rows[2]["trainable_params"] < rows[0]["trainable_params"]
