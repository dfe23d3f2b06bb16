"""LoRA (Hu et al. 2021, arXiv 2106.09685), rsLoRA (Kalajdzievski 2023) and PiSSA (Meng et al. 2024,
arXiv 2404.02948).

LoRA freezes W and learns W' = W + s·A·B in our (d_in, d_out) kernel layout: A (d_in, r) is PEFT's
`lora_A.weight`ᵀ and B (r, d_out) is `lora_B.weight`ᵀ. s = alpha/r, or alpha/√r with rsLoRA.
Init follows loralib/PEFT: A kaiming-uniform(a=√5), i.e. U(±1/√d_in); B = 0, so ΔW = 0. Embedding
tables (leaves named `embedding`) use PEFT's embedding init instead: A = 0, B ~ N(0, 1). Dropout
acts on the adapter branch input only.

PiSSA puts the top-r singular triplets of W into the adapter: with W = U S Vᵀ (fp32),
A = U_r·√(S_r/s), B = √(S_r/s)·V_rᵀ and the frozen base *becomes* W_res = W − s·A·B (no second copy
of W is kept), so W' = W at init. `niter` switches to a randomized SVD with that many power
iterations (PEFT's `pissa_niter_k`, q = r).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from lowrank_jax import _kernels
from lowrank_jax import base as base_lib
from lowrank_jax import targeting
from lowrank_jax.adapters import _leafwise
from lowrank_jax.adapters._lowrank import (LoRAFactors, lora_scale, lowrank_apply_leaf,
                                           validate_common)

INITS = ("kaiming_uniform", "gaussian", "pissa")


def randomized_svd(key, w, rank: int, niter: int, oversample: int = 0):
  """Halko et al. randomized SVD of a 2-D fp32 matrix with `niter` power iterations."""
  q = min(rank + oversample, min(w.shape))
  omega = jax.random.normal(key, (w.shape[1], q), w.dtype)
  y, _ = jnp.linalg.qr(w @ omega)
  for _ in range(niter):
    z, _ = jnp.linalg.qr(w.T @ y)
    y, _ = jnp.linalg.qr(w @ z)
  u_small, s, vt = jnp.linalg.svd(y.T @ w, full_matrices=False)
  return (y @ u_small)[:, :rank], s[:rank], vt[:rank]


@base_lib.records_hparams
def lora(rank: int = 8, alpha: Optional[float] = None, targets: targeting.Targets = r".*kernel",
         *, dropout: float = 0.0, use_rslora: bool = False, init: str = "kaiming_uniform",
         niter: Optional[int] = None, kernel_axes: targeting.AxesSpec = None,
         dtype=jnp.float32, impl: str = "custom_vjp"):
  """LoRA on the targeted kernels.

  Args:
    rank: adapter rank r (1 <= r <= min(d_in, d_out) of every target).
    alpha: scaling numerator; defaults to `rank` (s = 1, PEFT's r=8, alpha=8).
    targets: regex(es) over `/`-joined paths, or a callable `(path, leaf) -> bool`.
    dropout: adapter-branch input dropout rate in [0, 1); active when `apply` gets an `rng`.
    use_rslora: scale alpha/√r instead of alpha/r.
    init: "kaiming_uniform" (loralib/PEFT), "gaussian" (A ~ N(0, 1/r²), PEFT's "gaussian"), or
      "pissa" (principal singular triplets, residual base).
    niter: PiSSA only: None for the exact SVD, else randomized SVD with `niter` power iterations.
    kernel_axes: in/out axes for targets with more than 2 dims (see `targeting.kernel_axes`).
    dtype: adapter parameter dtype (fp32 by default, also with bf16 bases).
    impl: factored product, "custom_vjp" (default) or "autodiff" (see `structured.LowRank`).

  Returns:
    An `Adapter`.

  Raises:
    ValueError: bad rank/alpha/dropout/init (here) or targets/ranks/axes (at `init`).
  """
  name = "pissa" if init == "pissa" else "lora"
  validate_common(name, rank, alpha, dropout)
  if init not in INITS:
    raise ValueError(f"lora: unknown init {init!r}; valid: {INITS}")
  if niter is not None and (init != "pissa" or niter < 0):
    raise ValueError(f"lora: niter={niter!r} is only valid with init='pissa' and must be >= 0")
  _kernels.check_impl("lora", impl)
  alpha = float(rank) if alpha is None else float(alpha)
  scale = lora_scale(rank, alpha, use_rslora)

  def init_leaf(key, info, w, stats):
    del stats
    _leafwise.check_rank(name, info, rank)
    if init == "pissa":
      _leafwise.check_finite_weight(name, info, w)
      w2 = w.reshape(info.d_in, info.d_out).astype(jnp.float32)
      if niter is None:
        u, s, vt = jnp.linalg.svd(w2, full_matrices=False)
        u, s, vt = u[:, :rank], s[:rank], vt[:rank]
      else:
        u, s, vt = randomized_svd(key, w2, rank, niter)
      root = jnp.sqrt(s / scale)
      a = u * root
      b = root[:, None] * vt
      resid = (w2 - scale * (a @ b)).reshape(info.shape).astype(info.dtype)
      return resid, LoRAFactors(a.reshape(info.in_shape + (rank,)).astype(dtype),
                                b.reshape((rank,) + info.out_shape).astype(dtype)), None
    ka, kb = jax.random.split(key)
    a_shape, b_shape = info.in_shape + (rank,), (rank,) + info.out_shape
    if info.path.split("/")[-1] == "embedding":
      a = jnp.zeros(a_shape, dtype)
      b = jax.random.normal(kb, b_shape, dtype)
    elif init == "gaussian":
      a = jax.random.normal(ka, a_shape, dtype) / rank
      b = jnp.zeros(b_shape, dtype)
    else:
      bound = 1.0 / info.d_in ** 0.5
      a = jax.random.uniform(ka, a_shape, dtype, -bound, bound)
      b = jnp.zeros(b_shape, dtype)
    return None, LoRAFactors(a, b), None

  return _leafwise.leafwise(name, targets=targets, init_leaf=init_leaf,
                            apply_leaf=lowrank_apply_leaf(name, scale, dropout, impl),
                            kernel_axes=kernel_axes)


@base_lib.records_hparams
def pissa(rank: int = 8, alpha: Optional[float] = None, targets: targeting.Targets = r".*kernel",
          *, niter: Optional[int] = None, **kwargs):
  """PiSSA: `lora(..., init="pissa")` (see module docstring). Dropout should stay 0."""
  return lora(rank, alpha, targets, init="pissa", niter=niter, **kwargs)


# ---------------------------------------------------------------------------------------------
# Method facts, read by `lowrank_jax.registry`.
# ---------------------------------------------------------------------------------------------

def _config_kwargs(rank, alpha, targets, total_steps):
  """`rank` is the LoRA rank r; alpha defaults to 2·r (scale 2); no dropout."""
  del total_steps
  return dict(rank=rank, alpha=float(2 * rank if alpha is None else alpha), targets=targets,
              dropout=0.0)


METHOD_FACTS = {
    "lora": base_lib.MethodFacts(lora, _config_kwargs, peft_exportable=True),
    "pissa": base_lib.MethodFacts(pissa, _config_kwargs, peft_exportable=True,
                                  residual_init=True),
}
