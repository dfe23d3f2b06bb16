"""lowrank_jax: low-rank and decomposition-based adaptation of pretrained models in JAX."""
from setuptools import find_packages, setup

setup(
    name="lowrank_jax",
    version="0.1.0",
    description="Functional JAX/Flax low-rank adaptation (LoRA family, LoLDU, KronA, NOLA, SORSA, "
                "FLoRA, CorDA, IncreLoRA, intrinsic dimension), compression and implicit diff.",
    packages=find_packages(include=["lowrank_jax", "lowrank_jax.*", "experiments", "configs"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7,<0.11",
        "flax>=0.11,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "chex>=0.1.89,<0.2",
        "absl-py>=2.1,<3",
        "ml-collections>=1.0,<2",
        "numpy>=1.26",
        "tensorflow-datasets>=4.9.8,<5",
        # tfds 4.9.x imports it at run time but declares it only for Python < 3.9.
        "importlib_resources>=6",
        "array_record>=0.7",
        "grain>=0.2.10,<0.3",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "matplotlib>=3.8",
        "scikit-learn>=1.4",
        "tqdm>=4.60",
        "tensorboardX>=2.6",
    ],
    extras_require={"test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100", "sphinx>=8,<10",
                             "myst-parser>=4,<6"]},
)
