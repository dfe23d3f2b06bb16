"""Structured compression of pretrained models into smaller dense models (MoDeGPT).

See `compress.modegpt` (the model-level entry point) and `compress.steps` (the per-module
formulas).
"""
from lowrank_jax.compress import steps
from lowrank_jax.compress.modegpt import (ALLOCATIONS, CompressConfig, block_influence,
                                          block_param_count, modegpt, svd_baseline)
