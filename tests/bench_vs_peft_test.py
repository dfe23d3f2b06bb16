"""Side-by-side benchmark against PEFT: the goal arithmetic against hand-computed ratios, and the
whole command on CPU with our real tiny-Llama benchmark and a stand-in for the PEFT script (the
real one needs CUDA and torch)."""
import json
import subprocess
import sys
import textwrap

import pytest

from experiments import bench_vs_peft


def _ours(method, **fields):
  return {"framework": "lowrank_jax", "method": method, "batch": 8, "seq": 1024, **fields}


def _peft(method, compile_, **fields):
  return {"method": method, "compile": compile_, "batch": 8, "seq": 1024, **fields}


def test_goals_against_hand_computed_ratios():
  ours = [{"framework": "lowrank_jax", "params_total": 1},   # the header row has no method
          _ours("full", tokens_per_s=60000.0, ms_per_step=136.5, peak_gib=30.0),
          _ours("lora", tokens_per_s=100000.0, ms_per_step=80.0, peak_gib=15.0),
          _ours("lora_merged", tokens_per_s=50000.0, ms_per_step=160.0, peak_gib=16.0),
          _ours("krona", tokens_per_s=95000.0, ms_per_step=90.0, peak_gib=14.0),
          _ours("nola", tokens_per_s=70000.0, ms_per_step=110.0, peak_gib=14.0),
          _ours("sorsa", skipped="ValueError: too small")]
  peft = [_peft("full", False, tokens_per_s=51279.0, peak_gib=24.39),
          _peft("lora", False, tokens_per_s=35670.0, peak_gib=27.77),
          _peft("lokr", False, tokens_per_s=7000.0, peak_gib=31.15),
          _peft("lora", True, tokens_per_s=50000.0, peak_gib=20.0)]
  rows = {r["goal"]: r for r in bench_vs_peft.goals(ours, peft)}
  assert set(rows) == {"lora_vs_peft_compiled_tokens", "lora_vs_peft_compiled_memory",
                       "krona_vs_peft_lokr_tokens", "krona_vs_lora_tokens",
                       "krona_vs_lora_step", "nola_vs_lora_step", "sorsa_vs_lora_step"}
  expect = {"lora_vs_peft_compiled_tokens": (2.0, True),      # 100000 / 50000 >= 1.6
            "lora_vs_peft_compiled_memory": (0.75, True),     # 15 / 20 <= 1
            "krona_vs_peft_lokr_tokens": (13.571, True),      # 95000 / 7000 >= 8
            "krona_vs_lora_tokens": (0.95, True),             # 95000 / 100000 >= 0.9
            "krona_vs_lora_step": (1.125, True),              # 90 / 80 <= 1.3
            "nola_vs_lora_step": (1.375, False)}              # 110 / 80 > 1.3
  for name, (ratio, met) in expect.items():
    assert rows[name]["ratio"] == pytest.approx(ratio, abs=1e-3), name
    assert rows[name]["met"] is met, name
  assert rows["sorsa_vs_lora_step"]["met"] is None
  assert "too small" in rows["sorsa_vs_lora_step"]["why"]

  # The compiled PEFT run missing: its two goals say so instead of comparing with the eager one.
  rows = {r["goal"]: r for r in bench_vs_peft.goals(ours, peft[:3])}
  assert rows["lora_vs_peft_compiled_tokens"]["met"] is None
  assert "no row for peft lora + torch.compile" in rows["lora_vs_peft_compiled_tokens"]["why"]
  with pytest.raises(ValueError, match="different"):
    bench_vs_peft.goals(ours, [{**peft[0], "seq": 2048}])


def test_failing_command_is_named_with_its_stderr():
  cmd = [sys.executable, "-c", "import sys; print('{\"a\": 1}'); sys.exit('no CUDA device')"]
  with pytest.raises(RuntimeError, match=r"exited with status 1; stderr ends:\nno CUDA device"):
    bench_vs_peft.run_rows(cmd)


def test_bad_arguments_are_refused_before_any_work(tmp_path, capsys):
  with pytest.raises(SystemExit):
    bench_vs_peft.parse_args(["--peft_script", str(tmp_path / "absent.py")])
  assert "--peft_script: no file" in capsys.readouterr().err
  script = tmp_path / "peft.py"
  script.write_text("")
  with pytest.raises(SystemExit):
    bench_vs_peft.parse_args(["--peft_script", str(script), "--preset", "small"])
  assert "has no PEFT preset of its shape" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    bench_vs_peft.parse_args(["--peft_script", str(script), "--peft_steps", "0"])
  assert "--peft_steps must be >= 1, got 0" in capsys.readouterr().err


# Prints rows with the PEFT script's fields for the methods it is asked for; eager LoRA is slower
# than full fine-tuning and compiled LoRA, as measured on an H200.
FAKE_PEFT = textwrap.dedent("""
    import argparse, json
    ap = argparse.ArgumentParser()
    for flag in ("--preset", "--methods", "--batch", "--seq", "--rank", "--steps", "--peak-tflops"):
      ap.add_argument(flag)
    ap.add_argument("--compile", action="store_true")
    a = ap.parse_args()
    tokens = {("full", False): 51279.0, ("lora", False): 35670.0, ("lokr", False): 7335.0,
              ("lora", True): 54893.0}
    for m in a.methods.split(","):
      print(json.dumps({"method": m, "preset": a.preset, "batch": int(a.batch), "seq": int(a.seq),
                        "compile": a.compile, "tokens_per_s": tokens[(m, a.compile)],
                        "peak_gib": 20.2}))
""")


def test_an_interpreter_without_the_peft_packages_is_refused_first(monkeypatch):
  monkeypatch.setattr(bench_vs_peft, "PEFT_MODULES", ("no_such_module_for_peft",))
  with pytest.raises(RuntimeError, match=r"--peft_python .* cannot import "
                     r"no_such_module_for_peft \(ModuleNotFoundError"):
    bench_vs_peft.check_peft_python(sys.executable)


def _stand_in_python(tmp_path) -> str:
  """An interpreter that imports (empty) torch, transformers and peft modules."""
  site = tmp_path / "site"
  site.mkdir()
  for name in bench_vs_peft.PEFT_MODULES:
    (site / f"{name}.py").write_text("")
  python = tmp_path / "python"
  python.write_text(f'#!/bin/sh\nPYTHONPATH={site} exec {sys.executable} "$@"\n')
  python.chmod(0o755)
  return str(python)


def test_the_whole_command_on_cpu(tmp_path):
  script = tmp_path / "peft_stand_in.py"
  script.write_text(FAKE_PEFT)
  out = subprocess.run(
      [sys.executable, "-m", "experiments.bench_vs_peft", "--peft_script", str(script),
       "--peft_python", _stand_in_python(tmp_path),
       "--preset", "tiny", "--peft_preset", "llama1b", "--dtype", "f32", "--batch", "2", "--seq",
       "8", "--rank", "2", "--methods", "krona", "--rounds", "1", "--steps", "1"],
      capture_output=True, text=True, check=True, cwd=bench_vs_peft.REPO).stdout
  rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
  running = [r["running"] for r in rows if "running" in r]
  assert len(running) == 3 and "experiments.bench_llm" in running[0]
  assert "--remat nothing_saveable" in running[0]
  assert running[2].endswith("--methods lora --compile")
  ours = {r["method"]: r for r in rows if r.get("framework") == "lowrank_jax" and "method" in r}
  assert set(ours) == {"full", "lora", "lora_merged", "krona"}
  assert {r["remat"] for r in ours.values()} == {"nothing_saveable"}
  goals = {r["goal"]: r for r in rows if "goal" in r}
  tokens = goals["lora_vs_peft_compiled_tokens"]
  assert tokens["theirs_value"] == 54893.0
  assert tokens["ratio"] == pytest.approx(ours["lora"]["tokens_per_s"] / 54893.0, abs=1e-3)
  lokr = goals["krona_vs_peft_lokr_tokens"]
  assert lokr["ratio"] == pytest.approx(ours["krona"]["tokens_per_s"] / 7335.0, abs=1e-3)
  step = goals["krona_vs_lora_step"]
  assert step["ratio"] == pytest.approx(
      ours["krona"]["ms_per_step"] / ours["lora"]["ms_per_step"], abs=1e-3)
