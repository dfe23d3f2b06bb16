"""Every config in configs/ builds (default and runlocal); its sweep expands into valid points."""
import glob
import importlib
import os

import ml_collections
import pytest

from configs import common
from experiments import sweep as sweep_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not os.path.basename(p).startswith(("_", "common")))
# The configs that declare an ablation grid (`sweep(add)`).
SWEEPS = [n for n in CONFIGS if hasattr(importlib.import_module(f"configs.{n}"), "sweep")]


def test_parse_arg_types_and_flags():
  a = common.parse_arg("rank=4,lr=0.5,runlocal,name=x,t=a+b", rank=8, lr=1.0, runlocal=False,
                       name="y", t=("c",))
  assert (a.rank, a.lr, a.runlocal, a.name, a.t) == (4, 0.5, True, "x", ("a", "b"))


def test_parse_arg_defaults():
  assert common.parse_arg(None, rank=8).rank == 8
  assert common.parse_arg("", rank=8).rank == 8


def test_parse_arg_unknown_key():
  with pytest.raises(ValueError, match=r"Unhandled config arg 'rnak'.*valid args: \['rank'\]"):
    common.parse_arg("rnak=4", rank=8)


def test_parse_arg_strict_types():
  with pytest.raises(ValueError, match="not an int"):
    common.parse_arg("rank=four", rank=8)
  with pytest.raises(ValueError, match="not a bool"):
    common.parse_arg("runlocal=maybe", runlocal=False)
  with pytest.raises(ValueError, match="needs a value"):
    common.parse_arg("rank", rank=8)


def test_unknown_method_lists_valid_names():
  with pytest.raises(ValueError, match=r"Unknown adapter method 'foo'; valid names: \[.*'lora'"):
    common.adapter_config("foo", rank=2, targets=[".*"])


def test_adapter_config_reads_the_method_facts():
  config = lambda method, **kw: common.adapter_config(method, rank=4, targets=["x"], **kw)
  assert (config("lora").rank, config("lora").alpha) == (4, 8.0)
  assert config("lora", alpha=3.0).alpha == 3.0
  assert config("sorsa").alpha == 4.0            # SORSA's own scale alpha/r = 1
  assert (config("nola").k, config("nola").l) == (64, 64)
  assert config("intrinsic").d == 256
  assert config("krona").to_dict() == {"method": "krona", "targets": ["x"]}
  assert config("increlora", total_steps=50).incre_interval == 5
  assert config("lora", dropout=0.1).dropout == 0.1


def test_arg():
  assert common.arg(method="lora", rank=4) == {"arg": "method=lora,rank=4"}


def test_sweep_points_and_overrides():
  class Module:
    @staticmethod
    def get_config(arg=None):
      a = common.parse_arg(arg, rank=8)
      c = common.base_config()
      c.adapter.rank = a.rank
      return c

    @staticmethod
    def sweep(add):
      add(**common.arg(rank=2))
      add(arg="rank=4", **{"optimizer.lr": 0.5})

  points = sweep_lib.expand(Module)
  assert [p.name for p in points] == ["rank-2", "rank-4_optimizer.lr-0.5"]
  c = sweep_lib.point_config(Module, points[1])
  assert (c.adapter.rank, c.optimizer.lr) == (4, 0.5)
  with pytest.raises(ValueError, match="config has no field 'lrr'"):
    sweep_lib.apply_overrides(Module.get_config(), {"optimizer.lrr": 1.0})


def test_sweep_duplicate_points():
  class Module:
    @staticmethod
    def sweep(add):
      add(arg="rank=1")
      add(arg="rank=1")
  with pytest.raises(ValueError, match="duplicate points"):
    sweep_lib.expand(Module)


def test_digits_sweep_every_method_but_the_baseline_and_one_point_where_rank_is_ignored():
  from configs import digits_sweep  # pylint: disable=g-import-not-at-top
  from lowrank_jax import registry  # pylint: disable=g-import-not-at-top
  points = [p.name for p in sweep_lib.expand(digits_sweep)]
  methods = {n.split("_")[0].split("-", 1)[1] for n in points}
  assert methods == set(registry.list_methods()) - {"none"}
  for method, n in (("lora", 2), ("krona", 1), ("diffusekrona", 1)):
    assert len([p for p in points if p.startswith(f"method-{method}_")]) == n, method


def test_found_configs():
  assert "quickstart" in CONFIGS
  assert "digits_lora" in CONFIGS


@pytest.mark.parametrize("name", CONFIGS)
def test_get_config(name):
  module = importlib.import_module(f"configs.{name}")
  assert module.__doc__ and "python -m experiments." in module.__doc__, (
      f"configs/{name}.py needs a docstring with the command")
  for arg in (None, "runlocal"):
    c = module.get_config(arg)
    assert isinstance(c, ml_collections.ConfigDict)
    for field in ("seed", "total_steps", "batch_size", "model", "dataset", "adapter",
                  "optimizer", "head"):
      assert field in c, f"configs/{name}.py lacks {field}"
  c_local = module.get_config("runlocal")
  assert c_local.total_steps <= module.get_config().total_steps


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_expands(name):
  module = importlib.import_module(f"configs.{name}")
  points = sweep_lib.expand(module)
  assert len(points) > 0
  names = [p.name for p in points]
  assert len(set(names)) == len(names), "sweep point names must be unique"
  for p in points:
    c = sweep_lib.point_config(module, p)
    assert isinstance(c, ml_collections.ConfigDict)


def test_parse_flags_with_config_gives_defaults_that_flags_override(tmp_path):
  import argparse  # pylint: disable=g-import-not-at-top
  path = tmp_path / "flags.py"
  path.write_text("import ml_collections\n"
                  "def get_config(arg=None):\n"
                  "  n = 7 if arg == 'small' else 70\n"
                  "  return ml_collections.ConfigDict({'part': {'steps': n, 'grid': (1.0, 2.0)}})\n")

  def parser():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--grid", type=float, nargs=2, default=(0.0, 0.0))
    return ap

  args = common.parse_flags_with_config(parser(), "part", ["--config", f"{path}:small"])
  assert (args.steps, args.grid) == (7, [1.0, 2.0])
  args = common.parse_flags_with_config(parser(), "part", ["--config", str(path), "--steps", "3"])
  assert args.steps == 3
  assert common.parse_flags_with_config(parser(), "part", []).steps == 1
  narrow = argparse.ArgumentParser()
  narrow.add_argument("--steps", type=int)
  with pytest.raises(ValueError, match=r"\['grid'\] are not flags of this experiment; "
                                       r"valid: \['steps'\]"):
    common.parse_flags_with_config(narrow, "part", ["--config", str(path)])
