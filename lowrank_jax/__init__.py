"""lowrank_jax."""
