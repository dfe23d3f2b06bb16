"""The registry walk: every registered method declares its facts, builds from its config mapping,
records its hyperparameters, has a contract case and, if PEFT-exportable, exports; a broken
method module breaks only its own method."""
import inspect
import tempfile

import chex
import jax
import numpy as np
import pytest

from configs import common
import lowrank_jax as lj
from lowrank_jax import adapter_io
from lowrank_jax import base as base_lib
from lowrank_jax import calibrate
from lowrank_jax import registry
from lowrank_jax import tree as tree_lib
from lowrank_jax.models import llama
from tests.adapters import contract_test

METHODS = registry.list_methods()
# 64x64 kernels: every method's config mapping fits them (DiffuseKronA's a1 = 64 included).
TARGETS = [r"layers/layer_\d+/attention/q_proj/kernel"]
TOTAL_STEPS = 100


def _llama_tiny():
  cfg = llama.LlamaConfig.preset("tiny")
  return llama.init(jax.random.key(0), cfg), cfg


def _config_kwargs(name):
  """The factory arguments a run of `name` gets: the config mapping, plus the run length for a
  factory that asks for it (as the trainer adds it)."""
  kw = common.adapter_config(name, rank=2, targets=TARGETS, total_steps=TOTAL_STEPS).to_dict()
  assert kw.pop("method") == name
  if "total_steps" in inspect.signature(registry.get_factory(name)).parameters:
    kw["total_steps"] = TOTAL_STEPS
  return kw


def _init(name, adapter, params, cfg):
  stats = None
  if registry.needs_stats(name):
    ids = jax.random.randint(jax.random.key(1), (2, 8), 0, cfg.vocab_size)
    stats = calibrate.collect(lambda p, b: llama.apply(p, b, cfg), params, [ids], TARGETS)
  return adapter.init(jax.random.key(2), params, stats)


@pytest.mark.parametrize("name", METHODS)
def test_method_declares_its_facts(name):
  facts = registry.facts(name)
  assert isinstance(facts, base_lib.MethodFacts)
  assert registry.get_factory(name) is facts.factory
  assert registry.needs_stats(name) is facts.needs_stats
  assert registry.rank_allocation_fn(name) is facts.rank_allocation


@pytest.mark.parametrize("name", METHODS)
def test_config_mapping_builds_an_adapter_that_records_its_arguments(name):
  params, cfg = _llama_tiny()
  kw = _config_kwargs(name)
  adapter = registry.make_adapter(name, **kw)
  base, state = _init(name, adapter, params, cfg)
  found = registry.method_of(adapter)   # what export_peft and adapter files go by
  assert found is not None, f"{adapter.name!r} is no registered name nor in adapter_names"
  assert (registry.facts(found).peft_exportable, registry.facts(found).residual_init) == (
      registry.facts(name).peft_exportable, registry.facts(name).residual_init)
  for key, value in kw.items():
    assert adapter.hparams[key] == value, key
  named_args = [p.name for p in inspect.signature(registry.get_factory(name)).parameters.values()
                if p.kind is not inspect.Parameter.VAR_KEYWORD]
  assert set(named_args) <= set(adapter.hparams)
  assert (lj.count_params(state) > 0) == (name != "none")
  chex.assert_trees_all_equal_structs(lj.merge(adapter.apply(base, state)), params)
  if registry.rank_allocation_fn(name) is not None:
    ranks = registry.rank_allocation_fn(name)(state)
    assert set(ranks) == {f"layers/layer_{i}/attention/q_proj/kernel" for i in range(2)}


@pytest.mark.parametrize("name", METHODS)
def test_method_has_a_contract_case(name):
  assert name not in contract_test.methods_without_case(contract_test.CASES)


@pytest.mark.parametrize("name", [m for m in METHODS if registry.facts(m).peft_exportable])
def test_peft_export_loads_as_the_trained_adapter(name):
  params, cfg = _llama_tiny()
  adapter = registry.make_adapter(name, **_config_kwargs(name))
  base, initial = _init(name, adapter, params, cfg)
  leaves, treedef = jax.tree.flatten(initial.trainable)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  trained = lj.AdapterState(jax.tree.unflatten(treedef, [
      x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]),
      initial.frozen)
  d = tempfile.mkdtemp()
  adapter_io.export_peft(d, adapter, trained, model="llama", cfg=cfg,
                         initial=initial if registry.facts(name).residual_init else None)
  imported, imported_state, _ = adapter_io.import_peft(d, model="llama", cfg=cfg)
  want = tree_lib.unnest(lj.merge(adapter.apply(base, trained)))
  got = tree_lib.unnest(lj.merge(imported.apply(params, imported_state)))
  for path in want:
    np.testing.assert_allclose(got[path], want[path], rtol=1e-4, atol=1e-4, err_msg=path)


# ---------------------------------------------------------------------------------------------
# What the walk relies on can fail: a method without a case, a broken or fact-less module.
# ---------------------------------------------------------------------------------------------

def test_a_method_without_case_is_reported(monkeypatch):
  monkeypatch.setitem(registry.METHODS, "newmethod", "lowrank_jax.adapters.lora")
  assert contract_test.methods_without_case(contract_test.CASES) == ["newmethod"]


def test_a_broken_module_breaks_only_its_method(monkeypatch):
  monkeypatch.setitem(registry.METHODS, "broken", "lowrank_jax.adapters.does_not_exist")
  monkeypatch.setitem(registry.METHODS, "factless", "lowrank_jax.tree")
  assert "broken" in registry.list_methods()
  available = registry.list_methods(available_only=True)
  assert "broken" not in available and "factless" not in available and "lora" in available
  assert registry.make_adapter("lora", rank=2).name == "lora"
  with pytest.raises(ValueError, match=r"'broken' is registered but not available: module "
                     r"lowrank_jax.adapters.does_not_exist cannot be imported"):
    registry.needs_stats("broken")
  with pytest.raises(ValueError, match=r"module lowrank_jax.tree declares no "
                     r"METHOD_FACTS\['factless'\]"):
    registry.make_adapter("factless")
  with pytest.raises(ValueError, match=r"Unknown adapter method 'lora2'; valid names: \[.*'lora'"):
    registry.facts("lora2")


def test_make_adapter_rejects_unknown_arguments():
  with pytest.raises(ValueError, match=r"'none' rejected its arguments \['rank'\]"):
    registry.make_adapter("none", rank=2)


# ---------------------------------------------------------------------------------------------
# Hyperparameters an adapter carries.
# ---------------------------------------------------------------------------------------------

def test_hparams_include_defaults_and_delegated_arguments():
  hp = lj.pissa(4, targets="x", dropout=0.0).hparams
  assert (hp["rank"], hp["alpha"], hp["targets"], hp["init"], hp["use_rslora"], hp["niter"],
          hp["dropout"]) == (4, None, "x", "pissa", False, None, 0.0)
  hp = lj.diffusekrona(targets="x", scale=0.5).hparams
  assert (hp["a1"], hp["a2"], hp["init"], hp["scale"]) == (64, 8, "diffusekrona", 0.5)
  with pytest.raises(TypeError, match="rnk"):
    lj.lora(rnk=2)
  assert lj.identity().hparams == {}


def test_combinators_describe_their_parts():
  a, b = lj.lora(2, targets="x"), lj.pissa(1, targets="y")
  hp = lj.chain(a, b).hparams
  assert [(p["name"], p["hparams"]["rank"]) for p in hp["adapters"]] == [("lora", 2), ("pissa", 1)]
  labels = lambda path, leaf: "a"
  hp = lj.partition({"a": a, "b": b}, labels).hparams
  assert hp["labels"] is labels
  assert {k: v["hparams"]["init"] for k, v in hp["adapters"].items()} == {
      "a": "kaiming_uniform", "b": "pissa"}
