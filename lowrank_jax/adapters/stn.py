"""Self-Tuning Networks (MacKay, Vicol, Lorraine, Duvenaud & Grosse, ICLR 2019, arXiv 1903.03088)
as an adapter: the best-response layer of `lowrank_jax.stn` on each targeted kernel of a frozen
pretrained model, with a low-rank hyper branch.

Per targeted kernel ``W`` (flax layout ``(*in, out)``: Dense, or Conv with the kernel window and
input channels as inputs), the adapted layer is a `lowrank_jax.stn.HyperKernel`::

  out = W_elem x + s(z) * (A_h B_h x),    s(z) = z @ S,    W_elem = W + (alpha / r_d) A_d B_d

* ``W`` stays frozen. ``A_d`` ``(*in, r_d)``, ``B_d`` ``(r_d, out)`` is a LoRA delta of the
  elementary weight (kaiming-uniform ``A_d``, ``B_d = 0``), on by default with ``r_d = rank``;
  ``delta_rank=0`` leaves ``W_elem = W`` (frozen; only the hyper branch and the head train).
* The hyper branch ``A_h`` ``(*in, r)``, ``B_h`` ``(r, out)`` is low rank (r = `rank`), kept
  factored (a `lowrank_jax.stn.LowRankProduct`): ``A_h`` ~ N(0, 1/fan_in), ``B_h`` ~ N(0, 1/r).
* ``S`` ``(h, out)`` maps the h hyperparameters to a per-unit gate; it starts at 0, so the adapted
  model equals the pretrained one at init for every ``z``.
* There is no hyper bias, so that each adapted kernel alone has one dense value at fixed
  hyperparameters (``W_elem + A_h B_h * s(z)``, what `lowrank_jax.merge` returns), unlike
  `lowrank_jax.stn.wrap`, whose `HyperKernel` leaves also gate a bias.

`apply` sets the hypernetwork input ``z`` to `hypernet_input` (default zeros): in the centred form
the runner trains (`lowrank_jax.stn_train`: the hypernetwork sees ``z - lam``), ``z = 0`` is the
best response at the current hyperparameters ``lam``, so merging, saving or evaluating the
adapter as any other gives the model at the tuned hyperparameters. Training feeds per-example
``z`` with `lowrank_jax.stn.with_hyperparameters` on the applied params; merge with another ``z``
by building the adapter with that `hypernet_input`, or with `lowrank_jax.stn.fix` on the applied
params.

Trainable parameters per ``(d_in, d_out)`` kernel: ``r (d_in + d_out) + h d_out + r_d (d_in +
d_out)``. The hyperparameters themselves (``lam`` and the perturbation scale, 2h numbers) belong
to the STN loop, not to the adapter state.

Only kernels with one output axis can be targeted (not embedding tables, not DenseGeneral kernels
with several output axes): the gate acts per output unit.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from lowrank_jax import base as base_lib
from lowrank_jax import stn as stn_lib
from lowrank_jax import structured
from lowrank_jax import targeting
from lowrank_jax.adapters import _leafwise
from lowrank_jax.adapters._lowrank import LoRAFactors, factors_shape, lora_scale


class STNFactors(NamedTuple):
  """Trainable per-leaf state of the STN adapter.

  Attributes:
    hyper: the hyper branch ``A_h (*in, r)``, ``B_h (r, out)``.
    scale_map: ``S`` (h, out), the hyperparameters' gate of each output unit.
    delta: the LoRA delta ``A_d (*in, r_d)``, ``B_d (r_d, out)`` of the elementary weight, or None
      (``delta_rank=0``: the elementary weight is the frozen kernel).
  """
  hyper: LoRAFactors
  scale_map: jax.Array
  delta: Optional[LoRAFactors]


def _check_target(info: _leafwise.LeafInfo):
  """Raises a ValueError naming the path unless the leaf is a kernel with one output axis."""
  if info.path.split("/")[-1] == "embedding" or len(info.shape) < 2 or len(info.out_shape) != 1:
    raise ValueError(f"stn: target {info.path} (shape {info.shape}) must be a Dense or Conv kernel "
                     f"with one output axis (its last); embedding tables and kernels with several "
                     f"output axes have no per-unit gate; narrow `targets`")


@base_lib.records_hparams
def stn_adapter(rank: int = 4, targets: targeting.Targets = r".*kernel", *,
                num_hyperparameters: int = 1, delta_rank: Optional[int] = None,
                delta_alpha: Optional[float] = None,
                hypernet_input: Optional[Sequence[float]] = None,
                kernel_axes: targeting.AxesSpec = None, dtype=jnp.float32) -> base_lib.Adapter:
  """The STN adapter on the targeted kernels (see the module docstring).

  Args:
    rank: r, the rank of the hyper branch (1 <= r <= min(d_in, d_out) of every target).
    targets: regex(es) over `/`-joined paths, or a callable `(path, leaf) -> bool`.
    num_hyperparameters: h, the length of the hyperparameter vector the gate reads (the runner
      sets it to the number of tuned hyperparameters).
    delta_rank: rank r_d of the LoRA delta of the elementary weight; None: `rank`; 0: no delta
      (the elementary weight is the frozen kernel).
    delta_alpha: the delta's scale numerator (scale alpha / r_d); None: r_d (scale 1).
    hypernet_input: the h values of ``z`` that `apply` sets; None: zeros (the best response at
      the current hyperparameters in the centred form).
    kernel_axes: in/out axes for targets with more than 2 dims (see `targeting.kernel_axes`).
    dtype: dtype of the adapter's parameters.

  Returns:
    An `Adapter` named "stn".

  Raises:
    ValueError: a bad rank, delta rank, alpha, hyperparameter count or input length (here), or a
      target that is not a kernel with one output axis or is too small for the ranks (at `init`).
  """
  name = "stn"
  _leafwise.check_int(name, "rank", rank)
  _leafwise.check_int(name, "num_hyperparameters", num_hyperparameters)
  _leafwise.check_int(name, "delta_rank", delta_rank, 0, allow_none=True)
  if delta_alpha is not None and not delta_alpha > 0:
    raise ValueError(f"{name}: delta_alpha must be None or > 0, got {delta_alpha!r}")
  z0 = jnp.zeros((num_hyperparameters,), jnp.float32) if hypernet_input is None else \
      jnp.asarray(hypernet_input, jnp.float32)
  if z0.shape != (num_hyperparameters,):
    raise ValueError(f"{name}: hypernet_input must hold num_hyperparameters={num_hyperparameters} "
                     f"values, got {hypernet_input!r}")
  r_delta = rank if delta_rank is None else delta_rank
  delta_scale = lora_scale(r_delta, r_delta if delta_alpha is None else delta_alpha) \
      if r_delta else 0.0

  def init_leaf(key, info, w, stats):
    del w, stats
    _check_target(info)
    _leafwise.check_rank(name, info, max(rank, r_delta))
    k_hyper, k_delta = jax.random.split(key)
    hyper = stn_lib.hyper_init(k_hyper, info.shape, dtype, rank)
    delta = None
    if r_delta:
      bound = 1.0 / math.sqrt(info.d_in)
      delta = LoRAFactors(
          jax.random.uniform(k_delta, info.in_shape + (r_delta,), dtype, -bound, bound),
          jnp.zeros((r_delta,) + info.out_shape, dtype))
    return None, STNFactors(LoRAFactors(hyper.a, hyper.b),
                            jnp.zeros((num_hyperparameters,) + info.out_shape, dtype), delta), None

  def apply_leaf(path, base_leaf, t, f, rng):
    del f, rng
    _leafwise.check_state_shape(name, path, base_leaf, factors_shape(t.hyper))
    elem = base_leaf
    if t.delta is not None:
      elem = structured.LowRank(base_leaf, t.delta.a, t.delta.b, delta_scale)
    return stn_lib.HyperKernel(elem=elem, hyper=stn_lib.LowRankProduct(t.hyper.a, t.hyper.b),
                               hyper_bias=None, scale_map=t.scale_map, hyperparameters=z0)

  return _leafwise.leafwise(name, targets=targets, init_leaf=init_leaf, apply_leaf=apply_leaf,
                            kernel_axes=kernel_axes)


# ---------------------------------------------------------------------------------------------
# Method facts, read by `lowrank_jax.registry`.
# ---------------------------------------------------------------------------------------------

def _config_kwargs(rank, alpha, targets, total_steps):
  """`rank` is the rank r of the hyper branch and of the LoRA delta of the elementary weight
  (alpha, when given, is the delta's scale numerator); the runner sets the number of
  hyperparameters from `config.stn`."""
  del total_steps
  kw = dict(rank=rank, targets=targets)
  if alpha is not None:
    kw["delta_alpha"] = float(alpha)
  return kw


METHOD_FACTS = {"stn": base_lib.MethodFacts(stn_adapter, _config_kwargs)}
