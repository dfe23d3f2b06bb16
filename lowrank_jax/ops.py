"""Layer ops used by the project's models: they accept dense arrays and structured weights alike.

>>> import jax.numpy as jnp, lowrank_jax as lj
>>> from lowrank_jax import ops
>>> x = jnp.ones((2, 3))
>>> ops.dense(x, 2 * jnp.ones((3, 4))).tolist()
[[6.0, 6.0, 6.0, 6.0], [6.0, 6.0, 6.0, 6.0]]
>>> w = lj.LowRank(jnp.ones((3, 4)), jnp.ones((3, 1)), jnp.ones((1, 4)), 0.5)  # W + 0.5·a·b
>>> ops.dense(x, w).tolist()                    # x @ W + 0.5·(x @ a) @ b, W + 0.5·a·b never formed
[[4.5, 4.5, 4.5, 4.5], [4.5, 4.5, 4.5, 4.5]]
"""
from lowrank_jax.structured import conv, dense, embed, materialize, merge

__all__ = ["dense", "conv", "embed", "materialize", "merge"]
