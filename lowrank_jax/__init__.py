"""lowrank_jax: low-rank and decomposition-based adaptation as pure functions on pytrees.

>>> import jax, jax.numpy as jnp, lowrank_jax as lj
>>> params = {'layer': {'kernel': jnp.ones((8, 8))}}
>>> adapter = lj.lora(rank=2, targets=r'layer/kernel')
>>> base, state = adapter.init(jax.random.key(0), params)
>>> y = lj.ops.dense(jnp.ones((1, 8)), adapter.apply(base, state)['layer']['kernel'])
>>> y.tolist()            # B starts at zero: at init the adapted layer computes the base layer
[[8.0, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0]]
>>> lj.count_params(state)  # A is 8x2, B is 2x8
32

Submodules loaded on first use: `models`, `data`, `train`, `steps`, `tasks`, `optim`, `calibrate`,
`implicit`, `bilevel`, `stn`, `adapter_io`, `checkpoint`, `registry`, `testing`, `metrics`,
`multi` (per-example adapters), `arithmetic` (adapter combination), `interop` (stock linen / nnx
models, factored), `rl` (policy-gradient fine-tuning of adapters), `compress` (MoDeGPT),
`host_memory` (XLA:CPU's per-step scratch memory kept mapped; call first on CPU). Loaded
with the package: `ops`, `quant` (quantized frozen bases), `targeting`, `tree`.
"""
import importlib as _importlib

from lowrank_jax import ops
from lowrank_jax import quant
from lowrank_jax import targeting
from lowrank_jax import tree
from lowrank_jax.adapters.adalora import adalora
from lowrank_jax.adapters.corda import corda
from lowrank_jax.adapters.flora import flora
from lowrank_jax.adapters.increlora import increlora
from lowrank_jax.adapters.intrinsic import intrinsic_dimension
from lowrank_jax.adapters.krona import diffusekrona, krona
from lowrank_jax.adapters.loldu import loldu
from lowrank_jax.adapters.lora import LoRAFactors, lora, pissa
from lowrank_jax.adapters.nola import nola
from lowrank_jax.adapters.sorsa import sorsa
from lowrank_jax.base import (Adapter, AdapterState, EmptyState, count_params, identity,
                              with_trainable)
from lowrank_jax.combine import chain, partition
from lowrank_jax.introspect import describe, unmerge
from lowrank_jax.structured import LowRank, Structured, materialize, merge
from lowrank_jax.targeting import KernelAxes

__version__ = "0.1.0"

_LAZY = ("models", "data", "train", "steps", "tasks", "optim", "calibrate", "implicit", "bilevel",
         "stn", "adapter_io", "checkpoint", "registry", "testing", "metrics", "multi", "arithmetic",
         "interop", "rl", "compress", "host_memory")


def __getattr__(name):
  if name in _LAZY:
    return _importlib.import_module(f"lowrank_jax.{name}")
  raise AttributeError(f"module 'lowrank_jax' has no attribute {name!r}")
