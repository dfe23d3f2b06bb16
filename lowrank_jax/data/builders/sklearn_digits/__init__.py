"""scikit-learn digits builder package."""
from lowrank_jax.data.builders.sklearn_digits.sklearn_digits_dataset_builder import Builder
