"""Timing helpers of experiments/bench.py (the benchmarks themselves are run by hand)."""
from absl.testing import absltest
import jax.numpy as jnp
import numpy as np

from experiments import bench


class PairedRatiosTest(absltest.TestCase):

  def test_per_round_ratio_of_step_means(self):
    # 3 rounds x 2 steps, round-major; the machine is 2x slower in round 2 for both runs.
    times = {"ref": [1.0, 1.0, 2.0, 2.0, 1.0, 1.0],
             "x": [1.2, 1.4, 2.6, 2.6, 1.1, 1.1]}
    out = bench.paired_ratios(times, "ref", steps=2)
    np.testing.assert_allclose(out["ref"], (1.0, 1.0, 1.0))
    np.testing.assert_allclose(out["x"], (1.3, 1.1, 1.3))   # rounds: 1.3, 1.3, 1.1

  def test_rejects_partial_rounds(self):
    with self.assertRaisesRegex(ValueError, "multiple of steps=2"):
      bench.paired_ratios({"ref": [1.0, 1.0, 1.0]}, "ref", steps=2)

  def test_round_robin_feeds_paired_ratios(self):
    runs = {"ref": lambda b: jnp.sum(b), "x": lambda b: jnp.sum(b * 2)}
    wall, cpu = bench.time_round_robin(runs, jnp.ones((8,)), rounds=3, steps=2)
    self.assertEqual({k: len(v) for k, v in wall.items()}, {"ref": 6, "x": 6})
    self.assertEqual({k: len(v) for k, v in cpu.items()}, {"ref": 6, "x": 6})
    med, lo, hi = bench.paired_ratios(wall, "ref", steps=2)["x"]
    self.assertTrue(0 < lo <= med <= hi)


if __name__ == "__main__":
  absltest.main()
