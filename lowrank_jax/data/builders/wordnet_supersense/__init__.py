"""WordNet supersense builder package."""
from lowrank_jax.data.builders.wordnet_supersense.wordnet_supersense_dataset_builder import Builder
