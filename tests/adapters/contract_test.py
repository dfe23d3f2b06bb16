"""The shared contract table: every adapter of the project passes every check here.

The table is built from `lowrank_jax.registry`: each registered method's module `<module>.py` has
its cases in `tests/adapters/<module>_test.py` as `CONTRACT_CASES`, a list of `Case` keyword
dicts. A case belongs to method `m` when its name is `m` or starts with `m_`, and every
registered method but the baseline "none" (which adapts nothing) needs one
(`test_every_registered_method_has_a_case`). The combinators' cases and those of the LoRA family,
CorDA, IncreLoRA, AdaLoRA and DiffuseKronA are written below.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Iterator, NamedTuple, Optional

import jax
import jax.numpy as jnp
import pytest

import lowrank_jax as lj
from lowrank_jax import registry
from lowrank_jax import testing
from lowrank_jax import tree as tree_lib
from tests.adapters import adalora_test, corda_test, increlora_test, krona_test


class Case(NamedTuple):
  name: str
  make: Callable[[], lj.Adapter]                    # builds the adapter (called inside x64 too)
  dense_ref: Callable[[Any, lj.AdapterState], dict]  # {path: dense W'} from base and state
  stats_fn: Optional[Callable[[Any], Any]] = None    # params -> calibration stats
  learn_steps: int = 150
  learn_ratio: float = 0.5
  learn_lr: float = 1e-2


def method_test_modules() -> Iterator[Any]:
  """The test modules `tests/adapters/<module>_test.py` of the registered methods' modules."""
  for module in sorted({m.rsplit(".", 1)[-1] for m in registry.METHODS.values()}):
    name = f"tests.adapters.{module}_test"
    try:
      yield importlib.import_module(name)
    except ModuleNotFoundError as e:
      if e.name != name:
        raise


def case_method(case_name: str) -> Optional[str]:
  """The registered method a case belongs to: its name, or the longest `m` with `m_` prefix."""
  found = [m for m in registry.list_methods() if case_name == m or case_name.startswith(m + "_")]
  return max(found, key=len) if found else None


def methods_without_case(cases) -> list[str]:
  """Registered methods (but "none", which adapts nothing) that no case in `cases` exercises."""
  covered = {case_method(c.name) for c in cases}
  return [m for m in registry.list_methods() if m != "none" and m not in covered]


def lowrank_ref(scale):
  def ref(base, state):
    out = {}
    for path, f in tree_lib.unnest(state.trainable).items():
      w = testing.merged_leaf(base, path)
      out[path] = w + scale * jnp.tensordot(f.a, f.b, axes=1)
    return out
  return ref


ALL = list(testing.TINY_PATHS)
DENSE = ["dense_0/kernel", "dense_1/kernel"]

CASES = [
    # --- LoRA family (core) ---
    Case("lora", lambda: lj.lora(2, 4.0, ALL, kernel_axes="conv"), lowrank_ref(2.0)),
    Case("lora_gaussian_rslora",
         lambda: lj.lora(2, 4.0, DENSE, init="gaussian", use_rslora=True),
         lowrank_ref(4.0 / 2 ** 0.5)),
    Case("lora_autodiff", lambda: lj.lora(2, 2.0, DENSE, impl="autodiff"), lowrank_ref(1.0)),
    Case("pissa", lambda: lj.pissa(2, 2.0, ALL, kernel_axes="conv"), lowrank_ref(1.0)),
    Case("pissa_randomized", lambda: lj.pissa(2, 2.0, DENSE, niter=4), lowrank_ref(1.0)),
    Case("chain_pissa_lora",
         lambda: lj.chain(lj.pissa(2, 2.0, ["dense_0/kernel"]), lj.lora(1, 1.0, DENSE)),
         lambda base, s: {
             "dense_0/kernel": testing.merged_leaf(base, "dense_0/kernel")
             + jnp.tensordot(s.trainable[0]["dense_0"]["kernel"].a,
                             s.trainable[0]["dense_0"]["kernel"].b, axes=1)
             + jnp.tensordot(s.trainable[1]["dense_0"]["kernel"].a,
                             s.trainable[1]["dense_0"]["kernel"].b, axes=1),
             "dense_1/kernel": testing.merged_leaf(base, "dense_1/kernel")
             + jnp.tensordot(s.trainable[1]["dense_1"]["kernel"].a,
                             s.trainable[1]["dense_1"]["kernel"].b, axes=1)}),
    Case("partition_lora_pissa",
         lambda: lj.partition({"a": lj.lora(2, 2.0), "b": lj.pissa(1, 1.0)},
                              lambda p, x: "a" if p == "dense_0/kernel"
                              else "b" if p == "dense_1/kernel" else None),
         lambda base, s: {
             **lowrank_ref(1.0)(base, lj.AdapterState(s.trainable["a"], {})),
             **lowrank_ref(1.0)(base, lj.AdapterState(s.trainable["b"], {}))}),
    # --- the registered methods' own cases (CONTRACT_CASES of their test modules) ---
    *[Case(**c) for m in method_test_modules() for c in getattr(m, "CONTRACT_CASES", ())],
    Case("diffusekrona", lambda: lj.diffusekrona(2, 2, DENSE), krona_test.kron_ref(1.0)),
    # --- data-aware / dynamic-rank adapters ---
    # CorDA's stats come from lowrank_jax.calibrate.collect on the tiny model; the IncreLoRA and
    # AdaLoRA references are written slot by slot from their formulas in tests/adapters/*_test.py.
    # CorDA-IPA differs from KPA only in the index set (checked in tests/adapters/corda_test.py).
    Case("corda_kpa",
         lambda: lj.corda(2, 4.0, DENSE, mode="kpa"), lowrank_ref(2.0),
         stats_fn=corda_test.contract_stats),
    Case("increlora",
         lambda: lj.increlora(target_rank=2, init_rank=1, alpha=2.0, targets=DENSE, add_r=1),
         increlora_test.dense_ref(2.0, 1)),
    Case("adalora",
         lambda: lj.adalora(init_r=3, target_r=2, alpha=3.0, targets=DENSE, total_steps=100),
         adalora_test.dense_ref(3.0, 3)),
]

IDS = [c.name for c in CASES]


def _stats(case):
  return case.stats_fn(testing.tiny_params()) if case.stats_fn else None


def test_every_registered_method_has_a_case():
  assert not methods_without_case(CASES), (
      f"registered methods without a contract case: {methods_without_case(CASES)}; add one to "
      f"CONTRACT_CASES in tests/adapters/<module>_test.py, named after the method")


def test_ids_unique():
  assert len(set(IDS)) == len(IDS), sorted(i for i in IDS if IDS.count(i) > 1)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_identity_at_init(case):
  testing.check_identity_at_init(case.make(), stats=_stats(case))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_dense_reference(case):
  testing.check_dense_reference(case.make(), case.dense_ref, stats=_stats(case))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_grads_float64(case):
  testing.check_grads_f64(case.make, stats_fn=case.stats_fn)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_jit_stable(case):
  testing.check_jit_stable(case.make(), stats=_stats(case))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_only_trainable_change(case):
  testing.check_only_trainable_change(case.make(), stats=_stats(case))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_learns(case):
  testing.check_learns(case.make(), steps=case.learn_steps, max_ratio=case.learn_ratio,
                       lr=case.learn_lr, stats=_stats(case))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge_roundtrip(case):
  testing.check_merge_roundtrip(case.make(), stats=_stats(case))
