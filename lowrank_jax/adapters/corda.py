"""CorDA: context-oriented decomposition adaptation (Yang et al., NeurIPS 2024, arXiv 2406.05223;
repo iboing/CorDA; PEFT `init_lora_weights="corda"`).

CorDA decomposes each weight *in the metric of its inputs*: with C the covariance of the layer's
inputs on calibration data, it takes the SVD of W·C and maps the right factor back with C⁻¹, so
`W = U·diag(S)·(C⁻¹V)ᵀ` exactly. The adapter takes r of those components and the rest stays as a
frozen residual, so the adapted model equals the original at init:

* **IPA** (instruction-previewed adaptation, `mode="ipa"`): the *largest* r components, from
  covariance collected on task data (the adapter starts in the directions the task uses);
* **KPA** (knowledge-preserved adaptation, `mode="kpa"`): the *smallest* r components, from
  covariance collected on data whose knowledge must be kept; the top components, which carry that
  knowledge, stay in the frozen residual.

Orientation. PEFT (PyTorch) writes W (d_out, d_in) and C = XᵀX/N (d_in, d_in). Our flax
kernel is W_k = Wᵀ (d_in, d_out), so W·C = (C·W_k)ᵀ and we take the SVD `C̃·W_k = V·diag(S)·Uᵀ`
(V: d_in×k right vectors of W·C̃, U: d_out×k left vectors, k = min(d_in, d_out)). With I the chosen
index set and s the adapter scale (PEFT divides S by s):

    a = C̃⁻¹·V_I·diag(√(S_I/s))      (d_in, r)   = PEFT lora_A.weightᵀ = (√S V̂ᵀ)ᵀ
    b = diag(√(S_I/s))·U_Iᵀ          (r, d_out)  = PEFT lora_B.weightᵀ = (U √S)ᵀ
    W_k,res = W_k − s·a·b            (the new frozen base; no copy of W is kept)

so in PyTorch orientation s·B·A = W·C̃·P_r·C̃⁻¹ with P_r = V_I·V_Iᵀ, the gauge-invariant identity
the tests check.

Damping (PEFT and the official code): C̃ = C + δ·mean(diag C)·I, δ starting at `damping` (0.01)
and doubled until ‖C̃·C̃⁻¹ − I‖_F < `damping_tol` (0.05). The loop runs eagerly at `init`
(outside jit); the δ used per target is stored in the frozen state (`CordaInfo.damping`). A
rank-deficient covariance (fewer calibration tokens than d_in) therefore still gives a finite
adapter. All decompositions run in fp32 (fp64 when the params are fp64).

Covariance comes from `lowrank_jax.calibrate.collect` (optionally `sample_scale="corda"`, the
per-sample `1/|max|` rescaling of the official hook). The differentiable projector lives in
`lowrank_jax.implicit`, not here.

>>> import jax, lowrank_jax as lj
>>> from lowrank_jax import calibrate, testing
>>> from lowrank_jax.adapters.corda import corda
>>> params = testing.tiny_params()
>>> stats = calibrate.collect(testing.tiny_apply, params, [testing.tiny_batch()],
...                           targets=["dense_0/kernel"])
>>> ad = corda(rank=2, targets=["dense_0/kernel"], mode="kpa")
>>> base, state = ad.init(jax.random.key(0), params, stats)
>>> merged = lj.merge(ad.apply(base, state))
>>> bool(jax.numpy.allclose(merged["dense_0"]["kernel"], params["dense_0"]["kernel"], atol=1e-5))
True
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax import _kernels
from lowrank_jax import base as base_lib
from lowrank_jax import targeting
from lowrank_jax.adapters import _leafwise
from lowrank_jax.adapters._lowrank import (LoRAFactors, lora_scale, lowrank_apply_leaf,
                                           validate_common)

MODES = ("ipa", "kpa")
GAUGES = ("official", "balanced")


class CordaInfo(NamedTuple):
  """Frozen per-target record: the damping δ that made C̃ invertible (fp32 scalar)."""
  damping: jax.Array


class CordaDecomposition(NamedTuple):
  """Result of `corda_decompose` (flax layout)."""
  a: jax.Array           # (d_in, r)
  b: jax.Array           # (r, d_out)
  residual: jax.Array    # (d_in, d_out) = W_k − s·a·b
  damping: float         # δ used
  singular_values: jax.Array  # all k singular values of W·C̃, descending
  inv_error: float       # ‖C̃·C̃⁻¹ − I‖_F at the accepted δ


def damped_inverse(cov, *, damping: float = 0.01, tol: float = 0.05, max_doublings: int = 40,
                   what: str = "covariance"):
  """Returns `(C̃, C̃⁻¹, δ, err)` with C̃ = C + δ·mean(diag C)·I, δ doubled until err < tol.

  Eager (not jittable): the loop length depends on the data, as in PEFT.

  Raises:
    ValueError: C is not finite, has mean(diag C) <= 0 (no calibration signal), or no δ within
      `max_doublings` doublings reaches the tolerance.
  """
  c = jnp.asarray(cov)
  if c.ndim != 2 or c.shape[0] != c.shape[1]:
    raise ValueError(f"corda: {what} must be a square matrix, got shape {tuple(c.shape)}")
  if not bool(jnp.all(jnp.isfinite(c))):
    raise ValueError(f"corda: {what} has non-finite entries")
  m = float(jnp.mean(jnp.diag(c)))
  if not m > 0:
    raise ValueError(f"corda: {what} has mean(diag C) = {m}; no calibration signal reached this "
                     f"layer (all-zero inputs or no tokens)")
  eye = jnp.eye(c.shape[0], dtype=c.dtype)
  delta = float(damping)
  for _ in range(max_doublings + 1):
    ct = c + (delta * m) * eye
    cinv = jnp.linalg.inv(ct)
    err = float(jnp.linalg.norm(ct @ cinv - eye))
    if np.isfinite(err) and err < tol and bool(jnp.all(jnp.isfinite(cinv))):
      return ct, cinv, delta, err
    delta *= 2.0
  raise ValueError(f"corda: {what}: no damping up to δ={delta / 2:g} gives "
                   f"‖C̃C̃⁻¹ − I‖_F < {tol}; raise damping or damping_tol")


def corda_decompose(w, cov, rank: int, mode: str = "ipa", *, scale: float = 1.0,
                    damping: float = 0.01, damping_tol: float = 0.05, gauge: str = "official",
                    what: str = "kernel") -> CordaDecomposition:
  """CorDA split of one 2-D kernel `w` (d_in, d_out) with input covariance `cov` (d_in, d_in).

  Runs in fp32 (fp64 if `w` is fp64). See the module docstring for the formulas and `corda` for
  `gauge`.
  """
  if mode not in MODES:
    raise ValueError(f"corda: mode={mode!r}; valid: {MODES}")
  if gauge not in GAUGES:
    raise ValueError(f"corda: gauge={gauge!r}; valid: {GAUGES}")
  dtype = jnp.promote_types(jnp.float32, w.dtype)
  wk = jnp.asarray(w, dtype)
  d_in, d_out = wk.shape
  cov = jnp.asarray(cov, dtype)
  if cov.shape != (d_in, d_in):
    raise ValueError(f"corda: covariance for {what} has shape {tuple(cov.shape)}, the kernel "
                     f"needs ({d_in}, {d_in}) (d_in = product of its input axes)")
  ct, cinv, delta, err = damped_inverse(cov, damping=damping, tol=damping_tol,
                                        what=f"covariance of {what}")
  v, s, ut = jnp.linalg.svd(ct @ wk, full_matrices=False)   # C̃W_k = (WC̃)ᵀ = V S Uᵀ
  k = s.shape[0]
  idx = np.arange(rank) if mode == "ipa" else np.arange(k - rank, k)
  root = jnp.sqrt(s[idx] / scale)
  a = (cinv @ v[:, idx]) * root[None, :]
  b = root[:, None] * ut[idx]
  if gauge == "balanced":
    # a_i b_iᵀ is unchanged by a_i·g, b_i/g; g = sqrt(‖b_i‖/‖a_i‖) equalizes the column norms.
    na = jnp.linalg.norm(a, axis=0)
    nb = jnp.linalg.norm(b, axis=1)
    g = jnp.sqrt(jnp.where(na > 0, nb / jnp.where(na > 0, na, 1.0), 1.0))
    g = jnp.where(g > 0, g, 1.0)
    a = a * g[None, :]
    b = b / g[:, None]
  resid = wk - scale * (a @ b)
  return CordaDecomposition(a, b, resid, delta, s, err)


@base_lib.records_hparams
def corda(rank: int = 8, alpha: Optional[float] = None,
          targets: targeting.Targets = r".*kernel", *, mode: str = "ipa",
          damping: float = 0.01, damping_tol: float = 0.05, gauge: str = "official",
          dropout: float = 0.0, use_rslora: bool = False, kernel_axes: targeting.AxesSpec = None,
          dtype=jnp.float32, impl: str = "custom_vjp"):
  """CorDA (IPA or KPA) on the targeted kernels; `init` needs calibration stats.

  Args:
    rank: adapter rank r (1 <= r <= min(d_in, d_out) of every target).
    alpha: scaling numerator (s = alpha/r); defaults to `rank` (s = 1, as the official code,
      which has no scale).
    targets: regex(es) over `/`-joined paths, or a callable `(path, leaf) -> bool`.
    mode: "ipa" (largest r components, task covariance) or "kpa" (smallest r, knowledge
      covariance).
    damping: initial δ of the damping C + δ·mean(diag C)·I (0.01, PEFT/official).
    damping_tol: δ doubles until ‖C̃C̃⁻¹ − I‖_F < damping_tol (0.05, PEFT/official).
    gauge: how the product s·a·b is split between the factors (it is the same either way, and so
      are the merged weights). "official": b = √S·Uᵀ, a = C̃⁻¹V·√S (official code and PEFT).
      "balanced": each component rescaled so that ‖a_i‖ = ‖b_i‖ (UNCONFIRMED addition, not in
      the paper). Why it matters: C̃⁻¹ makes a large and b small wherever the calibration inputs
      have little energy, and the split also depends on the covariance normalisation (C → cC
      scales a by 1/√c and b by √c: per-token vs per-sample normalisation, the per-sample
      `1/|max|` rescale). Adam moves every element by ~lr whatever its size, so with the official
      gauge a step of lr changes b by a large *relative* amount (the official scripts use lr 2e-5).
    dropout: adapter-branch input dropout rate (should stay 0, as for PiSSA).
    use_rslora: scale alpha/√r instead of alpha/r.
    kernel_axes: in/out axes for targets with more than 2 dims; the covariance must then be over
      the product of the input axes (`calibrate.collect(..., kernel_axes=...)`).
    dtype: adapter parameter dtype.
    impl: factored product, "custom_vjp" or "autodiff" (see `structured.LowRank`).

  Returns:
    An `Adapter` (name "corda_ipa" / "corda_kpa") whose `init(key, params, stats)` takes stats
    from `lowrank_jax.calibrate.collect` (or `{path: C}` / `{path: CalibStats}`) and returns the
    residual base and `AdapterState(LoRAFactors, CordaInfo)` per target.

  Raises:
    ValueError: bad rank/alpha/mode/damping (here) or missing/misshaped stats, a covariance with
      no signal, bad targets (at `init`).
  """
  name = f"corda_{mode}"
  validate_common("corda", rank, alpha, dropout)
  if mode not in MODES:
    raise ValueError(f"corda: mode={mode!r}; valid: {MODES}")
  if gauge not in GAUGES:
    raise ValueError(f"corda: gauge={gauge!r}; valid: {GAUGES}")
  if not damping > 0 or not damping_tol > 0:
    raise ValueError(f"corda: damping={damping!r} and damping_tol={damping_tol!r} must be > 0")
  _kernels.check_impl("corda", impl)
  alpha = float(rank) if alpha is None else float(alpha)
  scale = lora_scale(rank, alpha, use_rslora)

  def init_leaf(key, info, w, stats):
    del key
    _leafwise.check_rank(name, info, rank)
    _leafwise.check_finite_weight(name, info, w)
    cov = getattr(stats, "cov", stats)
    if cov is None:
      raise ValueError(f"{name}: stats for {info.path} have no input covariance; collect with "
                       f"kinds=('covariance', ...)")
    dec = corda_decompose(w.reshape(info.d_in, info.d_out), cov, rank, mode, scale=scale,
                          damping=damping, damping_tol=damping_tol, gauge=gauge,
                          what=info.path)
    resid = dec.residual.reshape(info.shape).astype(info.dtype)
    factors = LoRAFactors(dec.a.reshape(info.in_shape + (rank,)).astype(dtype),
                          dec.b.reshape((rank,) + info.out_shape).astype(dtype))
    return resid, factors, CordaInfo(jnp.asarray(dec.damping, jnp.float32))

  def state_spec(info):
    return (LoRAFactors(jax.ShapeDtypeStruct(info.in_shape + (rank,), dtype),
                        jax.ShapeDtypeStruct((rank,) + info.out_shape, dtype)),
            CordaInfo(jax.ShapeDtypeStruct((), jnp.float32)))

  return _leafwise.leafwise(name, targets=targets, init_leaf=init_leaf,
                            apply_leaf=lowrank_apply_leaf(name, scale, dropout, impl),
                            kernel_axes=kernel_axes, needs_stats=True, state_spec=state_spec)


def damping_used(state) -> dict[str, float]:
  """`{path: δ}` actually used per target (for logging)."""
  from lowrank_jax import tree as tree_lib
  return {p: float(f.damping) for p, f in tree_lib.unnest(state.frozen).items()}


# ---------------------------------------------------------------------------------------------
# Method facts, read by `lowrank_jax.registry`.
# ---------------------------------------------------------------------------------------------

def _config_kwargs(rank, alpha, targets, total_steps):
  """`rank` is the adapter rank r; alpha defaults to 2·r (scale 2); no dropout."""
  del total_steps
  return dict(rank=rank, alpha=float(2 * rank if alpha is None else alpha), targets=targets,
              dropout=0.0)


METHOD_FACTS = {
    "corda": base_lib.MethodFacts(corda, _config_kwargs, needs_stats=True, stats_sample_scale="corda",
                                  peft_exportable=True,
                                  residual_init=True,
                                  adapter_names=tuple(f"corda_{mode}" for mode in MODES)),
}
