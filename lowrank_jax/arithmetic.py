"""Adapter arithmetic: exact weighted sums of LoRA adapters, and SVD re-compression.

`combine` adds LoRA updates ΔW_i = s_i·A_i·B_i (s_i = alpha_i/r_i, or alpha_i/√r_i with rsLoRA)
with any real weights w_i by concatenating the factors along the rank axis:

    A = [A_1 … A_n],   B = [w_1·s_1·B_1; … ; w_n·s_n·B_n],   scale 1,

so A·B = Σ w_i·ΔW_i exactly (each B_i is multiplied by one number, rounded once). The result is
a plain LoRA of rank Σ r_i (alpha = rank, scale 1). Splitting √(w_i·s_i) over both factors, as
PEFT's `add_weighted_adapter` does, is wrong for a negative weight (the square root of a negative
number) and for a scale other than the rank-based one it assumes (rsLoRA).

`compress` brings a LoRA to a lower rank per leaf: the best rank-k approximation of its update
(truncated SVD) computed from the factors alone (QR of A and Bᵀ, SVD of the small core), never
forming the d_in×d_out update, and reports the Frobenius error of each leaf,
√(Σ of the discarded squared singular values), and that error relative to ‖ΔW‖_F.

Only additive LoRA adapters (`lowrank_jax.lora` with a random init, plain or rsLoRA) qualify: a
residual init (PiSSA, CorDA) replaced the base weights by W − s·A₀·B₀, so its state alone is not
an update of the original weights, and other methods' updates are not products of two factors.
For sequential or routed composition see `lowrank_jax.combine` (`chain`, `partition`).

>>> import jax, jax.numpy as jnp, lowrank_jax as lj
>>> from lowrank_jax import arithmetic
>>> params = {'w': {'kernel': jnp.zeros((4, 3))}}
>>> ads = [lj.lora(rank=1, targets='w/kernel'), lj.lora(rank=2, targets='w/kernel')]
>>> states = [lj.testing.perturb(ad.init(jax.random.key(i), params)[1], jax.random.key(i))
...           for i, ad in enumerate(ads)]
>>> adapter, state = arithmetic.combine(ads, states, [1.0, -1.0])
>>> adapter.hparams['rank'], adapter.hparams['alpha']
(3, 3.0)
>>> _, small, errors = arithmetic.compress(adapter, state, rank=1)
>>> small.trainable['w']['kernel'].a.shape
(4, 1)
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from lowrank_jax import base as base_lib
from lowrank_jax import registry
from lowrank_jax import structured
from lowrank_jax import tree as tree_lib
from lowrank_jax.adapters import lora as lora_lib
from lowrank_jax.adapters._lowrank import LoRAFactors, lora_scale

# The hparams that must agree for two LoRA adapters to adapt the same kernels the same way.
SHARED_HPARAMS = ("targets", "kernel_axes")


class CompressionError(NamedTuple):
  """Error of one leaf's re-compression: ‖ΔW − ΔW_k‖_F and that divided by ‖ΔW‖_F (0 if ΔW = 0)."""
  frobenius: jax.Array
  relative: jax.Array


def _lora_hparams(where: str, adapter: base_lib.Adapter) -> dict:
  """The hparams of an additive LoRA adapter, else a ValueError naming what it is."""
  method = registry.method_of(adapter)
  if method != "lora":
    why = ("replaces the base weights by a residual at init (W - s·A0·B0), so its state is not an "
           "update of the original weights" if method is not None
           and registry.facts(method).residual_init else "is not a LoRA")
    raise ValueError(f"{where}: adapter {adapter.name!r} {why}; only additive LoRA adapters "
                     f"(lowrank_jax.lora, plain or rsLoRA) can be combined or compressed")
  hp = dict(adapter.hparams)
  missing = [k for k in ("rank", "alpha", "use_rslora") + SHARED_HPARAMS if k not in hp]
  if missing:
    raise ValueError(f"{where}: adapter.hparams lacks {missing}; build it with lowrank_jax.lora")
  return hp


def _scale(hp: dict) -> float:
  rank = int(hp["rank"])
  return lora_scale(rank, float(rank if hp["alpha"] is None else hp["alpha"]),
                    bool(hp["use_rslora"]))


def _factors(where: str, state: base_lib.AdapterState, rank: int) -> dict[str, LoRAFactors]:
  """{path: LoRAFactors} of a LoRA state whose factors have rank `rank`, else a ValueError."""
  flat = tree_lib.unnest(state.trainable)
  for path, f in flat.items():
    if not isinstance(f, LoRAFactors) or f.a.shape[-1] != rank or f.b.shape[0] != rank:
      raise ValueError(f"{where}: the state at {path} is not rank-{rank} LoRAFactors(a, b) (got "
                       f"{type(f).__name__}); pass each adapter's own state")
  if state.frozen:
    raise ValueError(f"{where}: a LoRA state has no frozen buffers, got {list(state.frozen)}")
  return flat


def _kernel_shape(f: LoRAFactors) -> tuple[tuple[int, ...], tuple[int, ...]]:
  return tuple(f.a.shape[:-1]), tuple(f.b.shape[1:])


def _lora_like(hp: dict, rank: int, dtype) -> base_lib.Adapter:
  """A scale-1 LoRA (alpha = rank) of `rank` on the targets of `hp`."""
  return lora_lib.lora(rank=rank, alpha=float(rank), targets=hp["targets"],
                       dropout=float(hp.get("dropout", 0.0)), kernel_axes=hp["kernel_axes"],
                       dtype=dtype, impl=hp.get("impl", "custom_vjp"))


def combine(adapters: Sequence[base_lib.Adapter], states: Sequence[base_lib.AdapterState],
            weights: Sequence[float]) -> tuple[base_lib.Adapter, base_lib.AdapterState]:
  """The LoRA whose update is Σ w_i·ΔW_i, exactly (see the module docstring).

  Args:
    adapters: n LoRA adapters (ranks, alphas and rsLoRA may differ) with the same targets and
      kernel axes.
    states: their states, made on params of the same shapes.
    weights: n real numbers, of any sign.

  Returns:
    `(adapter, state)`: a `lowrank_jax.lora` of rank Σ r_i with alpha = rank (scale 1), and its
    state; `adapter.apply(base, state)` runs it factored, on the additive adapters' base (the
    params). Its PEFT export (`adapter_io.export_peft`) has r = lora_alpha = Σ r_i.

  Raises:
    ValueError: lengths that differ, a non-finite weight, a method that is not additive LoRA,
      different targets or kernel axes, states of other paths or kernel shapes (made on other
      params), a combined rank above min(d_in, d_out) of a leaf.
  """
  adapters, states, weights = list(adapters), list(states), list(weights)
  if not adapters or not len(adapters) == len(states) == len(weights):
    raise ValueError(f"combine: needs as many adapters, states and weights (at least one), got "
                     f"{len(adapters)}, {len(states)}, {len(weights)}")
  if not all(isinstance(w, numbers.Real) and math.isfinite(w) for w in weights):
    raise ValueError(f"combine: weights must be finite real numbers, got {weights}")
  hps = [_lora_hparams(f"combine: adapter {i}", ad) for i, ad in enumerate(adapters)]
  for key in SHARED_HPARAMS:
    values = [hp[key] for hp in hps]
    if any(v != values[0] for v in values):
      raise ValueError(f"combine: the adapters have different {key}: {values}; only adapters of "
                       f"the same kernels can be combined")
  flats = [_factors(f"combine: state {i}", s, int(hp["rank"]))
           for i, (s, hp) in enumerate(zip(states, hps))]
  for i, flat in enumerate(flats[1:], 1):
    if sorted(flat) != sorted(flats[0]):
      raise ValueError(f"combine: state {i} adapts {sorted(flat)[:4]}, state 0 "
                       f"{sorted(flats[0])[:4]}; the states must adapt the same paths")
    for path, f in flat.items():
      if _kernel_shape(f) != _kernel_shape(flats[0][path]):
        raise ValueError(f"combine: state {i} at {path} adapts a kernel of (in, out) shape "
                         f"{_kernel_shape(f)}, state 0 one of {_kernel_shape(flats[0][path])}; "
                         f"the states were made on different base params")
  rank = sum(int(hp["rank"]) for hp in hps)
  dtype = jnp.result_type(*[x for flat in flats for f in flat.values() for x in f])
  out = {}
  for path in flats[0]:
    (in_shape, out_shape) = _kernel_shape(flats[0][path])
    if rank > min(math.prod(in_shape), math.prod(out_shape)):
      raise ValueError(f"combine: the combined rank {rank} exceeds min(d_in, d_out) = "
                       f"{min(math.prod(in_shape), math.prod(out_shape))} at {path}; combine "
                       f"fewer or lower-rank adapters (or compress them first)")
    a = jnp.concatenate([flat[path].a.astype(dtype) for flat in flats], axis=-1)
    b = jnp.concatenate([float(w * _scale(hp)) * flat[path].b.astype(dtype)
                         for flat, hp, w in zip(flats, hps, weights)], axis=0)
    out[path] = LoRAFactors(a, b)
  return (_lora_like(hps[0], rank, dtype),
          base_lib.AdapterState(tree_lib.nest(out), {}))


def _truncated(f: LoRAFactors, scale: float, rank: int):
  """(a_k, b_k, singular values) with a_k·b_k the best rank-k approximation of scale·a·b."""
  in_shape, out_shape = _kernel_shape(f)
  r = f.a.shape[-1]
  dt = structured.compute_dtype(f.a, f.b)
  a2 = f.a.reshape(-1, r).astype(dt)
  b2 = f.b.reshape(r, -1).astype(dt)
  qa, ra = jnp.linalg.qr(a2)                      # a2 = qa ra
  qb, rb = jnp.linalg.qr(b2.T)                    # b2 = rb.T qb.T
  u, s, vt = jnp.linalg.svd(scale * (ra @ rb.T))  # scale·a2·b2 = qa u diag(s) vt qb.T
  root = jnp.sqrt(s[:rank])
  a_k = (qa @ u[:, :rank]) * root
  b_k = root[:, None] * (vt[:rank] @ qb.T)
  return (a_k.reshape(in_shape + (rank,)).astype(f.a.dtype),
          b_k.reshape((rank,) + out_shape).astype(f.b.dtype), s)


def compress(adapter: base_lib.Adapter, state: base_lib.AdapterState,
             rank: int) -> tuple[base_lib.Adapter, base_lib.AdapterState,
                                 dict[str, CompressionError]]:
  """Re-compresses every leaf of a LoRA to `rank` by truncated SVD of its update.

  Args:
    adapter: an additive LoRA adapter (e.g. from `combine`).
    state: its state.
    rank: the target rank k, 1 <= k <= min(the adapter's rank, d_in, d_out) of every leaf.

  Returns:
    `(adapter, state, errors)`: a scale-1 LoRA of rank k (alpha = k) on the same targets, whose
    update at each leaf is the rank-k truncated SVD of the input's update (factors a = U_k·√S_k,
    b = √S_k·V_kᵀ), and `{path: CompressionError}`.

  Raises:
    ValueError: not an additive LoRA adapter, a state that is not its own, a bad rank.
  """
  hp = _lora_hparams("compress", adapter)
  flat = _factors("compress: state", state, int(hp["rank"]))
  limit = min([int(hp["rank"])] + [min(math.prod(s) for s in _kernel_shape(f))
                                   for f in flat.values()])
  if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
    raise ValueError(f"compress: rank must be an int in 1..{limit} (the adapter's rank "
                     f"{hp['rank']} and min(d_in, d_out) of every leaf), got {rank!r}")
  scale = _scale(hp)
  out, errors = {}, {}
  for path, f in flat.items():
    a_k, b_k, s = _truncated(f, scale, rank)
    out[path] = LoRAFactors(a_k, b_k)
    err = jnp.sqrt(jnp.sum(jnp.square(s[rank:])))
    total = jnp.sqrt(jnp.sum(jnp.square(s)))
    errors[path] = CompressionError(err, jnp.where(total > 0, err / jnp.where(total > 0, total, 1),
                                                   0.0))
  dtype = jnp.result_type(*[x for f in flat.values() for x in f])
  return _lora_like(hp, rank, dtype), base_lib.AdapterState(tree_lib.nest(out), {}), errors
