"""Target resolution: patterns, their bad-input errors, and kernel axes."""
import jax
import pytest

import lowrank_jax as lj
from lowrank_jax import targeting
from lowrank_jax import testing

P = testing.tiny_params()


def test_resolve_fullmatches_each_pattern_and_returns_the_sorted_union():
  assert targeting.resolve(P, r"dense_\d/kernel") == ["dense_0/kernel", "dense_1/kernel"]
  assert targeting.resolve(P, ["embed/.*", "dense_0/kernel"]) == ["dense_0/kernel",
                                                                 "embed/embedding"]
  with pytest.raises(ValueError, match="'kernel' matches no parameter path"):
    targeting.resolve(P, "kernel")  # a search would hit every kernel; fullmatch hits none


def test_resolve_callable_sees_path_and_leaf():
  chosen = targeting.resolve(P, lambda path, leaf: leaf.ndim == 2 and path.startswith("dense"))
  assert chosen == ["dense_0/kernel", "dense_1/kernel"]
  with pytest.raises(ValueError, match="the callable selected no leaf among 7 paths"):
    targeting.resolve(P, lambda path, leaf: False)


@pytest.mark.parametrize("spec,expected", [
    (None, ((0,), (1,))),
    ("conv", ((0, 1, 2), (3,))),
    (2, ((0, 1), (2, 3))),
    ({r"other": 1, r"c.*": "conv"}, ((0, 1, 2), (3,))),
    (lambda path, shape: 1, ((0,), (1, 2, 3))),
])
def test_kernel_axes_specs(spec, expected):
  shape = (3, 3, 2, 5) if spec is not None else (6, 8)
  assert tuple(targeting.kernel_axes("c/kernel", shape, spec)) == expected


def test_target_matching_nothing_names_nearest():
  with pytest.raises(ValueError,
                     match=r"matches no parameter path. Nearest paths: \['dense_0/kernel'"):
    lj.lora(2, targets="dense_0/kernal").init(jax.random.key(0), P)


def test_leading_slash_and_bad_regex():
  with pytest.raises(ValueError, match="starts with '/'"):
    lj.lora(2, targets="/dense_0/kernel").init(jax.random.key(0), P)
  with pytest.raises(ValueError, match="not a valid regex"):
    lj.lora(2, targets="dense_0/(kernel").init(jax.random.key(0), P)


def test_kernel_axes_ambiguous():
  with pytest.raises(ValueError, match=r"conv/kernel: kernel axes ambiguous for a 4-D kernel"):
    lj.lora(2, targets="conv/kernel").init(jax.random.key(0), P)
  with pytest.raises(ValueError, match="must list leading input axes"):
    lj.lora(2, targets="conv/kernel",
            kernel_axes=lj.KernelAxes((1, 2, 3), (0,))).init(jax.random.key(0), P)
