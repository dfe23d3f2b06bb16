"""tfds builders of the offline datasets (they must live in packages; tfds needs that).

Importing a builder module registers it with tfds; `lowrank_jax.data.load` does so lazily.
"""
