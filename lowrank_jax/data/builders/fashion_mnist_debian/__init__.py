"""Fashion-MNIST (Debian package) builder package."""
from lowrank_jax.data.builders.fashion_mnist_debian.fashion_mnist_debian_dataset_builder import Builder
