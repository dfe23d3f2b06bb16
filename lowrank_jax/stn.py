"""Self-Tuning Networks (MacKay, Vicol, Lorraine, Duvenaud & Grosse, ICLR 2019) as pure functions.

An STN replaces the weights ``w`` by a best-response approximation ``w_phi(lam)`` fitted around
the current hyperparameters and tunes ``lam`` by gradient descent on the validation loss through
it. No derivative of the training loss with respect to ``lam`` is needed, so dropout rates,
augmentation strengths and other knobs that only act by sampling can be tuned.

Best response, per layer (`HyperKernel`, a structured weight that stands where a dense or conv
kernel stood, so the existing models run it unchanged)::

  out = W_elem x + b_elem + s(z) * (W_hyper x + b_hyper),    s(z) = z @ S

``z`` is the unconstrained hyperparameter vector (h,) or one per example (B, h); ``S`` is
(h, out). The layer's own bias is ``b_elem``; ``b_hyper`` lives in the `HyperKernel`. ``W_elem``
may itself be structured (a LoRA-style adapter) and ``W_hyper`` may be low rank
(`LowRankProduct`, ``wrap(..., hyper_rank=r)``).

Hyperparameters (`Hyperparameter`) are unconstrained reals mapped to their range by a sigmoid
(interval) or a softplus (lower bound only).

Alternating algorithm (`train_phase`, `hyper_phase`, `cycle`; each jitted, a `lax.scan` over a
stack of batches):

* train phase: steps of ``train_optimizer`` on phi against ``train_loss``, with ``z`` perturbed per
  example, ``z_i = lam + softplus(sigma) eps_i``, ``eps_i ~ N(0, I)``;
* hyper phase: steps of ``hyper_optimizer`` (Adam by default) on ``(lam, sigma)`` against
  ``val_loss(w_phi(lam + softplus(sigma) eps)) - tau * entropy``, the entropy of the Gaussian
  perturbation being ``sum log softplus(sigma)`` up to a constant.

Warm-up is `train_phase` alone. `fix` turns an STN back into plain dense parameters at given
hyperparameters (`lowrank_jax.merge` refuses a `HyperKernel` that carries a bias term).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank_jax import structured
from lowrank_jax import targeting
from lowrank_jax import tree as tree_lib

PyTree = Any

__all__ = [
    "HyperKernel",
    "Hyperparameter",
    "LowRankProduct",
    "STN",
    "STNState",
    "cycle",
    "fix",
    "hyper_objective",
    "hyper_init",
    "hyper_phase",
    "init",
    "train_phase",
    "with_hyperparameters",
    "wrap",
]


# ----------------------------------------------------------------------------------------------
# The best-response layer.
# ----------------------------------------------------------------------------------------------

@flax.struct.dataclass
class HyperKernel(structured.Structured):
  """``x -> elem(x) + s(z) * (hyper(x) + hyper_bias)`` with ``s(z) = z @ scale_map``.

  Kernels of flax Dense ``(d_in, d_out)`` and Conv ``(*window, c_in, c_out)`` layouts: one output
  axis, the last.

  Attributes:
    elem: the elementary kernel (dense or structured).
    hyper: kernel of the hyper branch, same shape as ``elem`` (dense, or structured such as a
      `LowRankProduct`).
    hyper_bias: (out,) bias of the hyper branch, or None for layers without bias.
    scale_map: (h, out) matrix ``S``.
    hyperparameters: the unconstrained hyperparameters ``z``, (h,) or per example (B, h); None
      until `with_hyperparameters` sets them.
  """
  elem: Any
  hyper: Any
  hyper_bias: Any
  scale_map: jax.Array
  hyperparameters: Any = None

  @property
  def shape(self):
    return tuple(self.elem.shape)

  @property
  def dtype(self):
    return self.elem.dtype

  def materialize(self):
    """``elem + hyper * s(z)`` when the kernel alone carries the layer at one vector ``z``.

    That is the case without a hyper bias and with hyperparameters of shape (h,) (the adapter
    `lowrank_jax.adapters.stn.stn_adapter` builds such kernels); otherwise the dense value also
    needs the bias (`fix`) or does not exist (unset or per-example hyperparameters).
    """
    z = self.hyperparameters
    if self.hyper_bias is not None or z is None or jnp.ndim(z) != 1:
      raise TypeError("HyperKernel has no single dense value here (it depends on the "
                      "hyperparameters and carries a bias term, or its hyperparameters are unset "
                      "or per example); use lowrank_jax.stn.fix(params, z) to get plain dense "
                      "parameters at fixed hyperparameters")
    elem = structured.materialize(self.elem)
    s = jnp.asarray(z).astype(self.scale_map.dtype) @ self.scale_map
    dt = structured.compute_dtype(elem, s)
    return (elem.astype(dt) + structured.materialize(self.hyper).astype(dt) * s.astype(dt)
            ).astype(elem.dtype)

  def _gate(self, y):
    """s(z) shaped to broadcast against an output ``y`` of shape (B, ..., out)."""
    z = self.hyperparameters
    if z is None:
      raise ValueError("HyperKernel: hyperparameters are unset; call "
                       "lowrank_jax.stn.with_hyperparameters(params, z) before applying the model")
    s = (z @ self.scale_map).astype(y.dtype)
    if s.ndim == 1:
      return s
    if s.shape[0] != y.shape[0]:
      raise ValueError(f"HyperKernel: per-example hyperparameters of shape {z.shape} do not match "
                       f"a batch of {y.shape[0]}")
    return s.reshape((s.shape[0],) + (1,) * (y.ndim - 2) + s.shape[1:])

  def _combine(self, y, h):
    if self.hyper_bias is not None:
      h = h + self.hyper_bias.astype(h.dtype)
    return y + self._gate(y) * h

  def matmul(self, x, in_ndim: int = 1):
    if in_ndim != self.ndim - 1:
      raise ValueError(f"HyperKernel: kernels with one output axis only; got in_ndim={in_ndim} "
                       f"for kernel shape {self.shape}")
    return self._combine(structured.dense(x, self.elem, in_ndim=in_ndim),
                         structured.dense(x, self.hyper, in_ndim=in_ndim))

  def conv(self, x, **conv_kwargs):
    return self._combine(structured.conv(x, self.elem, **conv_kwargs),
                         structured.conv(x, self.hyper, **conv_kwargs))

  def embed(self, ids):
    raise TypeError("HyperKernel wraps dense and conv kernels, not embedding tables")


def _is_hyper(x) -> bool:
  return isinstance(x, HyperKernel)


def _bias_path(kernel_path: str) -> str:
  """The path of a kernel's sibling bias: ``a/b/kernel -> a/b/bias``."""
  parent, _, _ = kernel_path.rpartition("/")
  return f"{parent}/bias" if parent else "bias"


@flax.struct.dataclass
class LowRankProduct(structured.Structured):
  """The kernel ``a @ b`` kept factored: a `(*in, r)`, b (r, out). The low-rank hyper branch."""
  a: jax.Array
  b: jax.Array

  @property
  def shape(self):
    return tuple(self.a.shape[:-1]) + tuple(self.b.shape[1:])

  @property
  def dtype(self):
    return self.a.dtype

  def materialize(self):
    return jnp.tensordot(self.a, self.b, axes=1)

  def matmul(self, x, in_ndim: int = 1):
    return structured.dense(structured.dense(x, self.a, in_ndim=in_ndim), self.b)

  def conv(self, x, **conv_kwargs):
    return structured.conv(x, self.a, **conv_kwargs) @ self.b.astype(x.dtype)


def hyper_init(key, shape, dtype, rank):
  """A random hyper kernel of ``shape`` (``(*in, out)``): N(0, 1/fan_in) entries when ``rank`` is
  None, else a `LowRankProduct` with N(0, 1/fan_in) and N(0, 1/rank) factors (so the branch's
  outputs have the scale of a fan-in-normalised dense layer's)."""
  fan_in = math.prod(shape[:-1])
  if rank is None:
    return jax.random.normal(key, shape, dtype) / math.sqrt(fan_in)
  key_a, key_b = jax.random.split(key)
  return LowRankProduct(
      jax.random.normal(key_a, tuple(shape[:-1]) + (rank,), dtype) / math.sqrt(fan_in),
      jax.random.normal(key_b, (rank, shape[-1]), dtype) / math.sqrt(rank))


def wrap(params: PyTree, key: jax.Array, num_hyperparameters: int,
         targets: targeting.Targets = r"(.*/)?kernel", hyper_rank: int | None = None) -> PyTree:
  """Replaces the selected kernels by `HyperKernel` leaves whose best response starts at the kernel.

  ``hyper`` is drawn at random (see `hyper_init`), ``scale_map`` and ``hyper_bias`` start at
  zero, so the wrapped model computes exactly what the original did, for any hyperparameters.
  A target may already be structured (e.g. a `LowRank` adapter): it becomes ``elem`` unchanged,
  which is where STN meets parameter-efficient fine-tuning (train only the adapter factors and the
  hyper branch, e.g. with `optax.masked`).

  Args:
    params: model parameters (dicts with ``.../kernel`` and optional sibling ``.../bias``).
    key: PRNG key for ``hyper``.
    num_hyperparameters: h, the length of the hyperparameter vector.
    targets: regex(es) or callable selecting the kernels (`lowrank_jax.targeting.resolve`).
    hyper_rank: None for a dense hyper kernel, or r for a `LowRankProduct` hyper branch.

  Raises:
    ValueError: ``num_hyperparameters < 1``, ``hyper_rank < 1``, or a target that is not a kernel
      of rank >= 2.
  """
  if not isinstance(num_hyperparameters, int) or num_hyperparameters < 1:
    raise ValueError(f"stn.wrap: `num_hyperparameters` must be a positive int, got "
                     f"{num_hyperparameters!r}")
  if hyper_rank is not None and (not isinstance(hyper_rank, int) or hyper_rank < 1):
    raise ValueError(f"stn.wrap: `hyper_rank` must be None or a positive int, got {hyper_rank!r}")
  flat = dict(targeting.named_leaves(params))
  replacements = {}
  for path in targeting.resolve(params, targets):
    kernel = flat[path]
    shape = tuple(getattr(kernel, "shape", ()))
    if len(shape) < 2 or _is_hyper(kernel):
      raise ValueError(f"stn.wrap: target {path!r} must be a kernel of rank >= 2 (not already "
                       f"wrapped), got {type(kernel).__name__} of shape {shape}")
    replacements[path] = HyperKernel(
        elem=kernel, hyper=hyper_init(tree_lib.derive_key(key, path), shape, kernel.dtype,
                                       hyper_rank),
        hyper_bias=jnp.zeros(shape[-1:], kernel.dtype) if _bias_path(path) in flat else None,
        scale_map=jnp.zeros((num_hyperparameters, shape[-1]), kernel.dtype))
  return tree_lib.replace_by_name(params, replacements, is_leaf=structured.is_structured,
                                  what="stn.wrap")


def with_hyperparameters(params: PyTree, z: jax.Array) -> PyTree:
  """Sets the unconstrained hyperparameters ``z`` ((h,) or per example (B, h)) in every
  `HyperKernel` of ``params``."""
  return jax.tree_util.tree_map(
      lambda w: w.replace(hyperparameters=z) if _is_hyper(w) else w, params, is_leaf=_is_hyper)


def fix(params: PyTree, z: jax.Array) -> PyTree:
  """Plain dense parameters of the best response at hyperparameters ``z`` (h,): every kernel
  becomes ``elem + hyper * s`` and its sibling bias gains ``s * hyper_bias``."""
  z = jnp.asarray(z)
  if z.ndim != 1:
    raise ValueError(f"stn.fix: `z` must be one hyperparameter vector (h,), got shape {z.shape}")
  flat = dict(targeting.named_leaves(params))
  replacements = {}
  for path, w in flat.items():
    if not _is_hyper(w):
      continue
    s = z.astype(w.scale_map.dtype) @ w.scale_map
    elem = structured.materialize(w.elem)
    replacements[path] = (elem + structured.materialize(w.hyper) * s).astype(elem.dtype)
    if w.hyper_bias is not None:
      bias_path = _bias_path(path)
      replacements[bias_path] = flat[bias_path] + (s * w.hyper_bias).astype(flat[bias_path].dtype)
  return tree_lib.replace_by_name(params, replacements, is_leaf=structured.is_structured,
                                  what="stn.fix")


# ----------------------------------------------------------------------------------------------
# Hyperparameters and the alternating algorithm.
# ----------------------------------------------------------------------------------------------

def _softplus_inverse(x: float) -> float:
  return float(np.log(np.expm1(x)))


@dataclasses.dataclass(frozen=True)
class Hyperparameter:
  """A tuned hyperparameter: ``low + (high - low) sigmoid(z)`` when ``high`` is set, else
  ``low + softplus(z)``.
  """
  name: str
  low: float = 0.0
  high: float | None = None

  def __post_init__(self):
    if self.high is not None and not self.high > self.low:
      raise ValueError(f"Hyperparameter {self.name!r}: need high > low, got low={self.low}, "
                       f"high={self.high}")

  def value(self, z):
    """Unconstrained -> constrained."""
    if self.high is None:
      return self.low + jax.nn.softplus(z)
    return self.low + (self.high - self.low) * jax.nn.sigmoid(z)

  def unconstrained(self, x: float) -> float:
    """Constrained -> unconstrained (float64 numpy). Raises ValueError outside the open range."""
    top = np.inf if self.high is None else self.high
    if not self.low < x < top:
      raise ValueError(f"Hyperparameter {self.name!r}: value {x} must lie strictly inside "
                       f"({self.low}, {top})")
    if self.high is None:
      return _softplus_inverse(x - self.low)
    t = (x - self.low) / (self.high - self.low)
    return float(np.log(t) - np.log1p(-t))


@dataclasses.dataclass(frozen=True)
class STN:
  """Static description of an STN run (hashable; passed to the jitted phases as static).

  Attributes:
    hyperparameters: the tuned hyperparameters, in the order of the vector ``z``.
    train_loss: ``(params, values, batch, key) -> scalar``: the training loss of the model whose
      `HyperKernel` leaves already hold the per-example perturbed ``z`` (B, h); ``values``
      (B, h) are the constrained values, for the loss to apply (dropout rates, augmentation
      strengths, ...).
    val_loss: ``(params, batch) -> scalar``: the validation loss (no dropout, no augmentation),
      the hyperparameters acting only through the best response.
    train_optimizer: optax transformation for phi.
    hyper_optimizer: optax transformation for ``(lam, sigma)``.
    entropy_weight: tau, the weight of the perturbation entropy in the hyper objective.
    bind: ``(params, z) -> what train_loss / val_loss get as params``: how the hypernetwork
      input ``z`` reaches the model. The default `with_hyperparameters` sets it in the
      `HyperKernel` leaves of ``params``; a runner whose phi is an adapter state rather than the
      model's params applies the adapter there (`lowrank_jax.stn_train`).
    centered: feed the hypernetwork ``z - stop_gradient(lam)`` instead of ``z`` (the centring of
      Bae & Grosse's Delta-STN, NeurIPS 2020). With the raw ``z``, which varies little around a
      nonzero ``lam``, ``s(z) = z @ S`` mostly learns a constant shift instead of the local slope
      of the best response; on sklearn digits with an input-noise hyperparameter the uncentred
      form moved the noise the wrong way (up) while the centred form moved it down. With
      centring, `fix` at ``z = 0`` gives the best response at the current ``lam``.
  """
  hyperparameters: tuple[Hyperparameter, ...]
  train_loss: Callable
  val_loss: Callable
  train_optimizer: optax.GradientTransformation
  hyper_optimizer: optax.GradientTransformation = optax.adam(3e-3)
  entropy_weight: float = 1e-3
  centered: bool = True
  bind: Callable[[PyTree, jax.Array], PyTree] = with_hyperparameters

  def __post_init__(self):
    if not self.hyperparameters or not all(
        isinstance(h, Hyperparameter) for h in self.hyperparameters):
      raise TypeError("STN.hyperparameters must be a non-empty tuple of Hyperparameter")
    if not self.entropy_weight >= 0:
      raise ValueError(f"STN.entropy_weight must be >= 0, got {self.entropy_weight}")

  def hypernet_input(self, z: jax.Array, hyper: jax.Array) -> jax.Array:
    """What the `HyperKernel` leaves see for hyperparameters ``z`` around the current ``hyper``."""
    return z - jax.lax.stop_gradient(hyper) if self.centered else z

  def values(self, z: jax.Array) -> jax.Array:
    """Constrained values of ``z`` (..., h)."""
    return jnp.stack([h.value(z[..., i]) for i, h in enumerate(self.hyperparameters)], axis=-1)


class STNState(NamedTuple):
  """Everything an STN run carries.

  Attributes:
    params: phi, the model parameters with `HyperKernel` leaves (hyperparameters unset).
    hyper: (h,) unconstrained hyperparameters lam.
    scale: (h,) unconstrained perturbation scale; the std of the perturbation is softplus(scale).
    train_opt: optimizer state of phi.
    hyper_opt: optimizer state of ``(hyper, scale)``.
  """
  params: PyTree
  hyper: jax.Array
  scale: jax.Array
  train_opt: PyTree
  hyper_opt: PyTree


def init(stn: STN, params: PyTree, initial_values: Sequence[float],
         perturbation_std: float = 0.5) -> STNState:
  """Initial state from wrapped ``params`` (see `wrap`) and the hyperparameters' starting values."""
  if len(initial_values) != len(stn.hyperparameters):
    raise ValueError(f"stn.init: {len(initial_values)} initial values for "
                     f"{len(stn.hyperparameters)} hyperparameters")
  if not perturbation_std > 0:
    raise ValueError(f"stn.init: `perturbation_std` must be positive, got {perturbation_std}")
  dtype = jnp.result_type(*[jnp.asarray(x).dtype for x in jax.tree.leaves(params)])
  hyper = jnp.asarray([h.unconstrained(v) for h, v in zip(stn.hyperparameters, initial_values)],
                      dtype)
  scale = jnp.full_like(hyper, _softplus_inverse(perturbation_std))
  return STNState(params, hyper, scale, stn.train_optimizer.init(params),
                  stn.hyper_optimizer.init((hyper, scale)))


def _batch_size(batch) -> int:
  return jax.tree.leaves(batch)[0].shape[0]


def _perturbed(hyper, scale, key, batch):
  eps = jax.random.normal(key, (_batch_size(batch),) + hyper.shape, hyper.dtype)
  return hyper + jax.nn.softplus(scale) * eps


def _train_step(stn: STN, state: STNState, batch, key) -> tuple[STNState, jax.Array]:
  key_eps, key_loss = jax.random.split(key)
  z = _perturbed(state.hyper, state.scale, key_eps, batch)
  inputs = stn.hypernet_input(z, state.hyper)
  loss_fn = lambda p: stn.train_loss(stn.bind(p, inputs), stn.values(z), batch, key_loss)
  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt = stn.train_optimizer.update(grads, state.train_opt, state.params)
  return state._replace(params=optax.apply_updates(state.params, updates), train_opt=opt), loss


def hyper_objective(stn: STN, params: PyTree, hyper: jax.Array, scale: jax.Array, batch,
                    key) -> jax.Array:
  """``val_loss(w_phi(lam + softplus(sigma) eps)) - tau sum log softplus(sigma)``."""
  z = _perturbed(hyper, scale, key, batch)
  entropy = jnp.sum(jnp.log(jax.nn.softplus(scale)))
  inputs = stn.hypernet_input(z, hyper)
  return stn.val_loss(stn.bind(params, inputs), batch) - stn.entropy_weight * entropy


def _hyper_step(stn: STN, state: STNState, batch, key) -> tuple[STNState, jax.Array]:
  objective = lambda hs: hyper_objective(stn, state.params, hs[0], hs[1], batch, key)
  loss, grads = jax.value_and_grad(objective)((state.hyper, state.scale))
  updates, opt = stn.hyper_optimizer.update(grads, state.hyper_opt, (state.hyper, state.scale))
  hyper, scale = optax.apply_updates((state.hyper, state.scale), updates)
  return state._replace(hyper=hyper, scale=scale, hyper_opt=opt), loss


def _scan_steps(step, stn, state, batches, key):
  keys = jax.random.split(key, jax.tree.leaves(batches)[0].shape[0])
  return jax.lax.scan(lambda s, xs: step(stn, s, *xs), state, (batches, keys))


@functools.partial(jax.jit, static_argnums=0)
def train_phase(stn: STN, state: STNState, batches, key) -> tuple[STNState, jax.Array]:
  """One train step per batch of ``batches`` (leaves stacked on a leading step axis).

  Returns the new state and the per-step training losses.
  """
  return _scan_steps(_train_step, stn, state, batches, key)


@functools.partial(jax.jit, static_argnums=0)
def hyper_phase(stn: STN, state: STNState, batches, key) -> tuple[STNState, jax.Array]:
  """One hyper step per validation batch of ``batches``; returns the state and the objectives."""
  return _scan_steps(_hyper_step, stn, state, batches, key)


@functools.partial(jax.jit, static_argnums=0)
def cycle(stn: STN, state: STNState, train_batches, val_batches, key):
  """A train phase then a hyper phase. Returns ``(state, (train_losses, hyper_objectives))``."""
  key_train, key_hyper = jax.random.split(key)
  state, train_losses = _scan_steps(_train_step, stn, state, train_batches, key_train)
  state, hyper_losses = _scan_steps(_hyper_step, stn, state, val_batches, key_hyper)
  return state, (train_losses, hyper_losses)
