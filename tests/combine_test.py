"""`partition`: routing leaves to adapters by label, and its label errors."""
import jax
import pytest

import lowrank_jax as lj
from lowrank_jax import testing

P = testing.tiny_params()


def test_partition_label_errors():
  ad = lj.partition({"a": lj.lora(2), "b": lj.lora(2)}, lambda p, x: "a")
  with pytest.raises(ValueError, match=r"adapters without label: \['b'\]"):
    ad.init(jax.random.key(0), P)
  ad = lj.partition({"a": lj.lora(2)}, lambda p, x: "zzz")
  with pytest.raises(ValueError, match=r"labels without adapter: \['zzz'\]"):
    ad.init(jax.random.key(0), P)
