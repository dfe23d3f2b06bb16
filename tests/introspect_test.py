"""`describe`: the per-path table of an adapter's state."""
import lowrank_jax as lj
from lowrank_jax import testing

P = testing.tiny_params()


def test_describe_lists_paths_and_counts():
  text = lj.describe(lj.lora(2, targets=r"dense_\d/kernel"), P)
  assert "dense_0/kernel" in text and "dense_1/kernel" in text
  assert "trainable 56 of" in text
