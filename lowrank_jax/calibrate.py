"""Calibration statistics: per-target input (and output) covariance streamed over batches.

Data-aware methods (CorDA, MoDeGPT, ...) need second moments of the inputs of the layers they
adapt. `collect` computes them for any of the project's models *without editing model code*: the
targeted kernels are wrapped, inside a jitted function, in a `CalibrationProbe` structured weight.
The models call `lowrank_jax.ops.dense` / `ops.conv` for every weight product, and those ops
dispatch to the probe's `matmul` / `conv`, which returns the ordinary product and hands the batch's
sufficient statistics (`XᵀX`, token count, optionally `YᵀY`) to a recorder. The recorded values are
traced values of the same jitted function and are returned as its outputs, so the whole pass is a
pure JAX function `(params, batch) -> {path: sums}`; activations are never stored, and the
accumulated state is O(Σ d_in²) whatever the number of batches.

Layout: flax kernels are `(d_in, d_out)` with `y = x @ W_k`, so the covariance of target `p` is
`C = XᵀX / N` of shape `(d_in, d_in)` where the rows of X are the N (unmasked) inputs of that
layer; for kernels with several input axes (DenseGeneral, conv) `d_in` is the product of the
input axes in the kernel's own order (`kernel.reshape(d_in, d_out)`), and for convolutions the
rows are the im2col patches.

>>> import jax, jax.numpy as jnp
>>> from lowrank_jax import calibrate, testing
>>> params = testing.tiny_params()
>>> stats = calibrate.collect(testing.tiny_apply, params, [testing.tiny_batch()],
...                           targets=["dense_0/kernel", "dense_1/kernel"])
>>> stats["dense_0"]["kernel"].cov.shape, float(stats["dense_0"]["kernel"].count)
((6, 6), 20.0)
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from lowrank_jax import structured
from lowrank_jax import targeting
from lowrank_jax import tree as tree_lib

KINDS = ("covariance", "output_covariance")
SAMPLE_SCALES = (None, "corda")

_HI = jax.lax.Precision.HIGHEST


class CalibStats(NamedTuple):
  """Statistics of one target (fp32).

  Attributes:
    cov: input covariance `XᵀX / N`, shape `(d_in, d_in)` (None if not requested).
    count: N, the number of (unmasked) input rows seen, as an fp32 scalar (a sum of mask weights).
    out_cov: output covariance `YᵀY / N` of the product `Y = X @ W_k` (no bias), shape
      `(d_out, d_out)`, when `"output_covariance"` was requested (MoDeGPT), else None.
  """
  cov: Optional[jax.Array]
  count: jax.Array
  out_cov: Optional[jax.Array] = None


class _Recorder:
  """Python-side sink used while tracing one call of the stats function (never inside jit state)."""

  def __init__(self, kinds, mask, sample_scale, in_ndims):
    self.kinds = kinds
    self.mask = mask
    self.sample_scale = sample_scale
    self.in_ndims = in_ndims
    self.sums: dict[str, CalibStats] = {}

  def _rows(self, x: jax.Array, in_ndim: int):
    """(rows (n, d) fp32 with the optional per-sample rescale, weights (n,))."""
    lead = tuple(x.shape[:x.ndim - in_ndim])
    d = math.prod(x.shape[x.ndim - in_ndim:])
    n = math.prod(lead)
    x2 = x.reshape(n, d).astype(jnp.float32)
    w = jnp.ones((n,), jnp.float32)
    # The token mask applies when the layer sees one row per token (its leading shape is the
    # mask's shape); rows of other layers (e.g. a pooler on the first token) all count.
    if self.mask is not None and tuple(self.mask.shape) == lead:
      w = self.mask.reshape(n).astype(jnp.float32)
    if self.sample_scale == "corda" and lead:
      b = lead[0]
      xb = x2.reshape(b, -1, d)
      wb = w.reshape(b, -1)
      # CorDA/PEFT hook: X_s / |max(X_s)| with the *signed* max over the sample's token matrix.
      mx = jnp.max(jnp.where(wb[:, :, None] > 0, xb, -jnp.inf), axis=(1, 2))
      mag = jnp.abs(mx)
      scale = jnp.where(jnp.isfinite(mag) & (mag > 0), 1.0 / jnp.where(mag > 0, mag, 1.0), 1.0)
      x2 = (xb * scale[:, None, None]).reshape(n, d)
    return x2, w

  def add(self, path: str, x2, w, y2=None):
    cov = None
    if "covariance" in self.kinds:
      cov = jnp.matmul((x2 * w[:, None]).T, x2, precision=_HI)
    out = None
    if "output_covariance" in self.kinds:
      out = jnp.matmul((y2 * w[:, None]).T, y2, precision=_HI)
    new = CalibStats(cov, jnp.sum(w), out)
    old = self.sums.get(path)
    # A weight used several times (tied weights) accumulates all its uses.
    self.sums[path] = new if old is None else jax.tree_util.tree_map(jnp.add, old, new)

  def check_in_ndim(self, path, in_ndim):
    if in_ndim != self.in_ndims[path]:
      raise ValueError(f"calibrate: the model multiplies {path} with in_ndim={in_ndim} but its "
                       f"kernel_axes give {self.in_ndims[path]} input axes; pass a matching "
                       f"kernel_axes to collect")


@flax.struct.dataclass
class CalibrationProbe(structured.Wrapped):
  """A structured weight that computes the ordinary product and records its input statistics.

  Only meaningful inside `batch_stats_fn` / `collect` (it holds a Python recorder as static data).
  """
  w: Any
  path: str = flax.struct.field(pytree_node=False)
  recorder: Any = flax.struct.field(pytree_node=False)

  def matmul(self, x, in_ndim: int = 1):
    rec = self.recorder
    rec.check_in_ndim(self.path, in_ndim)
    y = structured.dense(x, self.w, in_ndim=in_ndim)
    x2, wts = rec._rows(x, in_ndim)
    y2 = None
    if "output_covariance" in rec.kinds:
      y2 = y.reshape(x2.shape[0], -1).astype(jnp.float32)
    rec.add(self.path, x2, wts, y2)
    return y

  def conv(self, x, *, strides=1, padding="SAME", dilation=1, feature_group_count=1):
    rec = self.recorder
    if feature_group_count != 1:
      raise ValueError(f"calibrate: {self.path} is a grouped convolution "
                       f"(feature_group_count={feature_group_count}); only ungrouped convs have "
                       f"an input covariance over the kernel's (spatial x c_in) axes")
    if rec.in_ndims[self.path] != len(self.shape) - 1:
      raise ValueError(f"calibrate: conv kernel {self.path} {self.shape} needs "
                       f"kernel_axes='conv' (all axes but the last are inputs)")
    kw = dict(strides=strides, padding=padding, dilation=dilation)
    y = structured.conv(x, self.w, **kw)
    # im2col through an identity kernel: patch feature j is kernel row j of
    # `kernel.reshape(d_in, c_out)`, so the covariance matches the kernel's matricization.
    d_in = math.prod(self.shape[:-1])
    eye = jnp.eye(d_in, dtype=jnp.float32).reshape(self.shape[:-1] + (d_in,))
    patches = structured.conv(x.astype(jnp.float32), eye, **kw)
    x2, wts = rec._rows(patches, 1)
    y2 = None
    if "output_covariance" in rec.kinds:
      y2 = y.reshape(x2.shape[0], -1).astype(jnp.float32)
    rec.add(self.path, x2, wts, y2)
    return y

  def embed(self, ids):
    raise ValueError(f"calibrate: {self.path} is used as an embedding table; the input "
                     f"covariance of one-hot ids is a (vocab x vocab) diagonal of token "
                     f"frequencies and is not collected; target dense/conv kernels only")


def _check_kinds(kinds) -> tuple[str, ...]:
  if isinstance(kinds, str):
    kinds = (kinds,)
  kinds = tuple(kinds)
  bad = [k for k in kinds if k not in KINDS]
  if bad or not kinds:
    raise ValueError(f"calibrate: kinds={kinds!r}; valid: a non-empty subset of {KINDS}")
  return kinds


def _batch_mask(batch, mask_key, mask_fn):
  if mask_fn is not None:
    return mask_fn(batch)
  if mask_key is None:
    return None
  if not isinstance(batch, dict) or mask_key not in batch:
    have = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
    raise ValueError(f"calibrate: mask_key={mask_key!r} is not in the batch (keys: {have})")
  return batch[mask_key]


def batch_stats_fn(apply_fn: Callable[[Any, Any], Any], params: Any, targets: targeting.Targets,
                   kinds: Sequence[str] = ("covariance",), *, mask_key: Optional[str] = None,
                   mask_fn: Optional[Callable[[Any], jax.Array]] = None,
                   sample_scale: Optional[str] = None,
                   kernel_axes: targeting.AxesSpec = None):
  """The pure per-batch statistics function used by `collect`.

  Targets are resolved here, eagerly. The returned `fn(params, batch)` runs `apply_fn` once with
  the targets wrapped in probes and returns `{path: CalibStats}` of *unnormalized sums*
  (`cov = Σ w·x xᵀ`, `count = Σ w`, `out_cov = Σ w·y yᵀ`). It is jittable and its outputs do
  not depend on the batch size.

  Args: as for `collect`.

  Returns:
    ``fn(params, batch) -> {path: CalibStats}`` (flat dict keyed by `/`-joined paths).
  """
  kinds = _check_kinds(kinds)
  if sample_scale not in SAMPLE_SCALES:
    raise ValueError(f"calibrate: sample_scale={sample_scale!r}; valid: {SAMPLE_SCALES}")
  if mask_key is not None and mask_fn is not None:
    raise ValueError("calibrate: pass at most one of mask_key and mask_fn")
  paths = targeting.resolve(params, targets)
  leaves = dict(targeting.named_leaves(params))
  in_ndims = {}
  for p in paths:
    shape = tuple(leaves[p].shape)
    in_ndims[p] = targeting.kernel_axes(p, shape, kernel_axes).in_ndim

  def fn(params, batch):
    rec = _Recorder(kinds, _batch_mask(batch, mask_key, mask_fn), sample_scale, in_ndims)
    named = dict(targeting.named_leaves(params))
    missing = [p for p in paths if p not in named]
    if missing:
      raise ValueError(f"calibrate: paths {missing[:5]} are not in the params tree")
    probes = {p: CalibrationProbe(named[p], p, rec) for p in paths}
    probed = tree_lib.replace_by_name(params, probes, is_leaf=structured.is_structured,
                                      what="calibrate targets")
    apply_fn(probed, batch)
    unused = [p for p in paths if p not in rec.sums]
    if unused:
      raise ValueError(f"calibrate: targets {unused[:5]} were never multiplied by the model "
                       f"through lowrank_jax.ops.dense/conv, so no statistics exist for them")
    return dict(rec.sums)

  return fn


def collect(apply_fn: Callable[[Any, Any], Any], params: Any, batches: Iterable[Any],
            targets: targeting.Targets, kinds: Sequence[str] = ("covariance",), *,
            mask_key: Optional[str] = None,
            mask_fn: Optional[Callable[[Any], jax.Array]] = None,
            sample_scale: Optional[str] = None, kernel_axes: targeting.AxesSpec = None,
            max_batches: Optional[int] = None) -> dict:
  """Streams `batches` through `apply_fn(params, batch)` and returns per-target fp32 statistics.

  One jitted step per batch shape accumulates the sums in fp32 (HIGHEST matmul precision, so TPUs
  do not round to bf16); activations are never stored. Batches of a fixed shape compile once.

  Args:
    apply_fn: `(params, batch) -> anything`; the model must multiply the targets through
      `lowrank_jax.ops.dense` / `ops.conv` (all of the project's models do).
    params: the parameter pytree (dense or already structured leaves).
    batches: an iterable of batches (e.g. numpy dicts).
    targets: regex(es) or callable selecting the kernels (see `targeting.resolve`).
    kinds: subset of `("covariance", "output_covariance")`. Output covariance is of the layer's
      product `X @ W_k` before bias, with no per-sample rescale (for MoDeGPT-style methods).
    mask_key: name of a `(batch, tokens)` 0/1 mask in the batch (e.g. `"attention_mask"`); rows
      with mask 0 (padding) are excluded. It applies to layers whose leading input shape equals
      the mask's shape; layers seeing another leading shape (a pooler on the first token) count
      every row.
    mask_fn: alternatively, `batch -> mask`.
    sample_scale: None, or `"corda"`: each sample's token matrix (leading axis 0) is divided by
      `|max(X_s)|`, the absolute value of its *signed* maximum over unmasked entries, as the CorDA
      hook does (official code and PEFT). Normalisation: we always divide by N = number of rows
      (tokens); the official CorDA code divides the sum by 256 (its sample count) and PEFT by the
      number of samples. The three differ by a constant factor, to which CorDA is invariant
      (damping is relative to mean(diag C) and C⁻¹ undoes the scale).
    kernel_axes: in/out axes for kernels of more than 2 dims (see `targeting.kernel_axes`).
    max_batches: stop after this many batches.

  Returns:
    A nested dict mirroring `params` (targets only) of `CalibStats` with `cov = XᵀX/N`,
    `count = N` and optionally `out_cov = YᵀY/N`; accepted by
    `adapter.init(key, params, stats=...)`.

  Raises:
    ValueError: bad kinds/sample_scale/mask options, targets matching nothing, no batches, a
      target never used by the model, or a target that saw no unmasked row.
  """
  fn = batch_stats_fn(apply_fn, params, targets, kinds, mask_key=mask_key, mask_fn=mask_fn,
                      sample_scale=sample_scale, kernel_axes=kernel_axes)
  if max_batches is not None and max_batches < 1:
    raise ValueError(f"calibrate: max_batches must be >= 1, got {max_batches!r}")

  @functools.partial(jax.jit, donate_argnums=0)
  def step(acc, params, batch):
    return jax.tree_util.tree_map(jnp.add, acc, fn(params, batch))

  acc = None
  n = 0
  for batch in batches:
    if max_batches is not None and n >= max_batches:
      break
    if mask_key is not None:
      _batch_mask(batch, mask_key, None)   # a missing key raises here, before jit
    if acc is None:
      shapes = jax.eval_shape(fn, params, batch)
      acc = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    acc = step(acc, params, batch)
    n += 1
  if acc is None:
    raise ValueError("calibrate: `batches` yielded no batch")
  out = {}
  for path, s in acc.items():
    c = float(s.count)
    if not c > 0:
      raise ValueError(f"calibrate: target {path} saw no unmasked input row (count=0); check "
                       f"the mask ({mask_key or mask_fn!r})")
    out[path] = CalibStats(None if s.cov is None else s.cov / s.count, s.count,
                           None if s.out_cov is None else s.out_cov / s.count)
  return tree_lib.nest(out)
