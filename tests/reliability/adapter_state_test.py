"""Bad adapter states and targets: every one refused with one ValueError/TypeError that says what.

`apply` checks the state it is given against what its `init` makes on the params it is given
(paths, pytree structure, shapes, dtypes), so a state of another rank, for other paths, of another
dtype or of another method is refused instead of silently giving a wrong ΔW.
"""
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax import combine
from lowrank_jax import targeting
from lowrank_jax.adapters.adalora import adalora
from lowrank_jax.adapters.corda import corda
from lowrank_jax.adapters.flora import flora
from lowrank_jax.adapters.increlora import increlora
from lowrank_jax.adapters.intrinsic import FastfoodProjection, intrinsic_dimension
from lowrank_jax.adapters.krona import krona
from lowrank_jax.adapters.loldu import loldu
from lowrank_jax.adapters.lora import lora, pissa
from lowrank_jax.adapters.nola import nola
from lowrank_jax.adapters.sorsa import sorsa

D_IN, D_OUT = 8, 6
A, B, BOTH = "a/kernel", "b/kernel", "(a|b)/kernel"


def params():
  rng = np.random.default_rng(0)
  return {n: {"kernel": jnp.asarray(rng.normal(size=(D_IN, D_OUT)), jnp.float32)}
          for n in ("a", "b")}


def covariances():
  """Input covariances per target, as CorDA's calibration stats ({path: (d_in, d_in)})."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(64, D_IN))
  cov = jnp.asarray(x.T @ x / 64, jnp.float32)
  return {A: cov, B: cov}


class Method(NamedTuple):
  name: str
  make: Callable[[int, Any], lj.Adapter]   # (rank-like size, targets) -> adapter
  has_frozen: bool


METHODS = [
    Method("lora", lambda r, t: lora(r, 16.0, t), False),
    Method("pissa", lambda r, t: pissa(r, 16.0, t), False),
    Method("sorsa", lambda r, t: sorsa(r, targets=t), False),
    Method("loldu", lambda r, t: loldu(r, targets=t), True),
    Method("flora", lambda r, t: flora(r, targets=t), False),
    Method("corda", lambda r, t: corda(r, targets=t), True),
    Method("adalora", lambda r, t: adalora(r, 1, targets=t, total_steps=10), True),
    Method("increlora", lambda r, t: increlora(1, targets=t, max_rank=r), True),
    Method("nola", lambda r, t: nola(r, r, 2, targets=t), False),
    # Kronecker factor sizes must divide the kernel's: (a1, a2) = (2, 2) or (3, 4) on (8, 6).
    Method("krona", lambda r, t: krona(r, {2: 2, 3: 4}[r], targets=t), False),
]
IDS = [m.name for m in METHODS]


def init(ad, p=None):
  return ad.init(jax.random.key(0), params() if p is None else p, covariances())


def refused(ad, base, state, match):
  with pytest.raises(ValueError, match=match):
    ad.apply(base, state)


@pytest.mark.parametrize("m", METHODS, ids=IDS)
def test_own_state_accepted_eager_and_jit(m):
  ad = m.make(2, A)
  base, state = init(ad)
  fresh = m.make(2, A)      # an adapter that never ran init (state loaded from a file)
  eager = fresh.apply(base, state)["a"]["kernel"]
  jitted = jax.jit(fresh.apply)(base, state)["a"]["kernel"]
  np.testing.assert_allclose(np.asarray(lj.structured.materialize(jitted)),
                             np.asarray(lj.structured.materialize(eager)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m", METHODS, ids=IDS)
def test_state_of_another_rank_refused(m):
  base, state3 = init(m.make(3, A))
  # A fresh adapter (never ran init in this process) and one that did: both refuse.
  refused(m.make(2, A), base, state3,
          rf"{m.name}(_ipa)?: the state for a/kernel .* expected shape")
  ad2 = m.make(2, A)
  init(ad2)
  with pytest.raises(ValueError, match=r"the state for a/kernel .* expected shape"):
    jax.jit(ad2.apply)(base, state3)


@pytest.mark.parametrize("m", METHODS, ids=IDS)
def test_state_for_another_path_refused(m):
  base, state_b = init(m.make(2, B))
  refused(m.make(2, A), base, state_b,
          r"state paths not targeted \['b/kernel'\], targeted paths without state "
          r"\['a/kernel'\]")


@pytest.mark.parametrize("m", METHODS, ids=IDS)
def test_state_with_extra_path_refused(m):
  base, state_ab = init(m.make(2, BOTH))
  refused(m.make(2, A), base, state_ab,
          r"state paths not targeted \['b/kernel'\], targeted paths without state \[\]")


@pytest.mark.parametrize("m", METHODS, ids=IDS)
def test_state_with_missing_path_refused(m):
  base, state_a = init(m.make(2, A))
  refused(m.make(2, BOTH), base, state_a,
          r"state paths not targeted \[\], targeted paths without state \['b/kernel'\]")


@pytest.mark.parametrize("m", METHODS, ids=IDS)
def test_state_of_another_dtype_refused(m):
  base, state = init(m.make(2, A))
  half = jax.tree.map(lambda x: x.astype(jnp.bfloat16)
                      if jnp.issubdtype(x.dtype, jnp.floating) else x, state.trainable)
  refused(m.make(2, A), base, lj.AdapterState(half, state.frozen),
          r"the state for a/kernel .*trainable\S* expected shape .* dtype float32 \(or a wider "
          r"float for a float field\), got shape .* dtype bfloat16")


@pytest.mark.parametrize("m", METHODS, ids=IDS)
def test_state_of_another_method_refused(m):
  donor = flora(2, targets=A) if m.name != "flora" else lora(2, 16.0, A)
  base, _ = init(m.make(2, A))
  _, other = init(donor)
  refused(m.make(2, A), base, other, r"the state for a/kernel .* structure differs")


@pytest.mark.parametrize("m", [m for m in METHODS if m.has_frozen],
                         ids=[m.name for m in METHODS if m.has_frozen])
def test_frozen_buffer_of_wrong_shape_refused(m):
  base, state = init(m.make(2, A))
  leaves, treedef = jax.tree.flatten(state.frozen)
  leaves[0] = jnp.zeros(leaves[0].shape + (2,), leaves[0].dtype)
  bad = lj.AdapterState(state.trainable, jax.tree.unflatten(treedef, leaves))
  refused(m.make(2, A), base, bad, r"the state for a/kernel .*: frozen\S* expected shape")


def test_lora_rank4_state_under_rank2_adapter_refused_not_doubled():
  """The reported case: ΔW would be exactly 2x too large (alpha/2 applied to a rank-4 state)."""
  base, state4 = init(lora(4, 16.0, A))
  refused(lora(2, 16.0, A), base, state4,
          r"lora: the state for a/kernel \(params leaf shape \(8, 6\), dtype float32\) .*"
          r"trainable\.a expected shape \(8, 2\) dtype float32 .*got shape \(8, 4\)")


# --- methods that do not use the leafwise builder -------------------------------------------

@pytest.mark.parametrize("projection", ["dense", "sparse", "fastfood"])
def test_intrinsic_state_of_another_dimension_refused(projection):
  base, state = init(intrinsic_dimension(8, targets=A, projection=projection))
  refused(intrinsic_dimension(4, targets=A, projection=projection), base, state,
          r"intrinsic_dimension: theta has shape \(8,\) dtype float32, expected \(4,\) float32")


def test_intrinsic_state_for_another_path_refused():
  base, state = init(intrinsic_dimension(4, targets=B, projection="dense"))
  refused(intrinsic_dimension(4, targets=A, projection="dense"), base, state,
          r"state covers paths \['b/kernel'\], the targets select \['a/kernel'\]")


def test_intrinsic_theta_of_another_dtype_refused():
  base, state = init(intrinsic_dimension(4, targets=A, projection="dense"))
  half = lj.AdapterState({"theta": state.trainable["theta"].astype(jnp.bfloat16)}, state.frozen)
  refused(intrinsic_dimension(4, targets=A, projection="dense"), base, half,
          r"theta has shape \(4,\) dtype bfloat16, expected \(4,\) float32")


def test_intrinsic_state_of_another_projection_refused():
  base, state = init(intrinsic_dimension(4, targets=A, projection="fastfood"))
  refused(intrinsic_dimension(4, targets=A, projection="dense"), base, state,
          r"frozen block for a/kernel is a Covered, projection='dense' makes a DenseLeaf")


def test_intrinsic_dense_block_of_wrong_shape_refused():
  base, state = init(intrinsic_dimension(4, targets=A, projection="dense"))
  blocks = jax.tree.map(lambda x: x[:-1], state.frozen.leaves)
  bad = lj.AdapterState(state.trainable, state.frozen._replace(leaves=blocks))
  refused(intrinsic_dimension(4, targets=A, projection="dense"), base, bad,
          r"frozen block for a/kernel has shape \(47, 4\), expected \(48, 4\)")


def test_intrinsic_fastfood_vectors_of_wrong_length_refused():
  base, state = init(intrinsic_dimension(4, targets=A, projection="fastfood"))
  ff = FastfoodProjection(*(x[:32] for x in state.frozen.fastfood))
  bad = lj.AdapterState(state.trainable, state.frozen._replace(fastfood=ff))
  refused(intrinsic_dimension(4, targets=A, projection="fastfood"), base, bad,
          r"Fastfood vectors have shapes .*expected \(64,\) each")


def test_increlora_wrapper_refuses_state_of_another_rank():
  base, state = init(increlora(1, targets=A, max_rank=3))
  refused(increlora(1, targets=A, max_rank=2), base, state,
          r"increlora: the state for a/kernel .* expected shape")


def test_chain_refuses_state_with_another_count():
  base, state = init(combine.chain(lora(2, 16.0, A)))
  two = combine.chain(lora(2, 16.0, A), sorsa(2, targets=B))
  refused(two, base, state, r"chain: state does not come from this adapter \(expected 2")


def test_chain_refuses_inner_state_of_another_rank():
  base, state = init(combine.chain(lora(3, 16.0, A), sorsa(2, targets=B)))
  refused(combine.chain(lora(2, 16.0, A), sorsa(2, targets=B)), base, state,
          r"lora: the state for a/kernel .* expected shape \(8, 2\)")


def test_partition_refuses_inner_state_of_another_rank():
  labels = {"a": {"kernel": "x"}, "b": {"kernel": "y"}}
  make = lambda r: combine.partition({"x": lora(r, 16.0, ".*kernel"),
                                      "y": sorsa(2, targets=".*kernel")}, labels)
  base, state = init(make(3))
  good_base, good = init(make(2))
  make(2).apply(good_base, good)        # each label's adapter sees only its own leaves
  refused(make(2), base, state, r"lora: the state for a/kernel .* expected shape \(8, 2\)")


# --- targets of the wrong type --------------------------------------------------------------

@pytest.mark.parametrize("bad", [3, 2.5, None, {"a": 1}, b"a/kernel"],
                         ids=["int", "float", "None", "dict", "bytes"])
def test_targets_of_wrong_type_refused(bad):
  with pytest.raises(TypeError, match=r"targets must be a regex string, a list/tuple of regex "
                                      r"strings, or a callable \(path, leaf\) -> bool; got "
                                      + type(bad).__name__):
    lora(2, 16.0, bad).init(jax.random.key(0), params())


def test_targets_list_with_non_string_refused():
  with pytest.raises(TypeError, match=r"targets: patterns must be strings, got int"):
    targeting.resolve(params(), [A, 3])
