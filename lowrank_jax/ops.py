"""Layer ops used by the project's models: they accept dense arrays and structured weights alike.

>>> import jax.numpy as jnp
>>> from lowrank_jax import ops
>>> ops.dense(jnp.ones((2, 3)), jnp.ones((3, 4))).shape
(2, 4)
"""
from lowrank_jax.structured import conv, dense, embed, materialize, merge

__all__ = ["dense", "conv", "embed", "materialize", "merge"]
