"""AdaLoRA: adaptive budget allocation (Zhang et al., ICLR 2023, arXiv 2303.10512; PEFT `adalora`),
the comparator of IncreLoRA (`increlora.py`).

SVD-form update, our flax layout (W_k (d_in, d_out)):

    ΔW_k = α/(r + 1e-5) · Σ_i c_i λ_i · a_i b_iᵀ = s·(a·diag(c ⊙ λ))·b,   a (d_in, r), b (r, d_out)

= PEFT's `lora_B (lora_A ⊙ lora_E)` transposed (P = lora_B = bᵀ, Q = lora_A = aᵀ, Λ = lora_E = λ).
r = `init_r` slots per module; PEFT keeps `ranknum` = r fixed, so the scale does not change when
triplets are pruned. Init (PEFT): a, b ~ N(0, 0.02²), λ = 0 (ΔW = 0).

Pruning, as PEFT's in-place `masked_fill_` of E. The frozen mask m records the last allocation.
During the budgeting phase c = 1: a pruning step sets the pruned λ's to 0 in the state, but they
stay in the product, so they keep their gradient, train on, and a triplet whose score climbs back
into the budget at a later pruning step is re-activated (part of the method). Once the final mask
is fixed (`fixed` = 1), c = m: pruned λ's are hard-masked (gradient exactly 0) and kept at 0, as
PEFT re-applies the final rank pattern after every step.

`adapter.update(state, grads, step)` (every step, in the jitted step, gradients of
`state.trainable`; `update_grad="total"`: the scores see the gradient of task loss + orthogonal
penalty, as PEFT's `p.grad`):

* while `step < T − max(tfinal, 1)` (T = total_steps, PEFT's `total_step`): element-wise
  sensitivity `|θ·∇θ|` of a, b, λ, smoothed
  `Ī ← β1·Ī + (1−β1)·|θ∇θ|, Ū ← β2·Ū + (1−β2)·|θ∇θ − Ī|` (β1 = β2 = 0.85); per triplet
  score_i = Ī_λi·Ū_λi + mean_j(Ī·Ū)_{a, ji} + mean_k(Ī·Ū)_{b, ik} (λ_i with the mean scores of its
  P column and Q row, as PEFT's `_combine_ipt`).
* cubic budget (PEFT `budget_schedule`), over all modules, B_init = init_r·n, B_target = target_r·n:
  t <= tinit: no pruning; tinit < t < T − tfinal: every deltaT steps keep the top
  ⌊(B_init − B_target)·(1 − (t − tinit)/(T − tfinal − tinit))³ + B_target⌋ triplets;
  t >= T − max(tfinal, 1): at the first such step all triplets are ranked once more and the mask
  is fixed at exactly B_target triplets (ties broken by slot order, so the count is exact; PEFT's
  `<= kthvalue` threshold can prune more on ties). With
  `tfinal=0` the last step (t = T − 1, as the runner counts from 0) still fixes the final mask.
  `step` is the runner's step counter (`lowrank_jax.train` passes the 0-based step).

Penalty (PEFT `orth_reg_weight` 0.5): mean over the 2·n matrices of ‖QQᵀ − I‖_F and ‖PᵀP − I‖_F
(unsquared, all r slots), in our layout ‖aᵀa − I‖ and ‖b bᵀ − I‖.

>>> import jax
>>> from lowrank_jax import testing
>>> from lowrank_jax.adapters.adalora import adalora
>>> from lowrank_jax.adapters.increlora import rank_allocation
>>> ad = adalora(init_r=4, target_r=2, targets=["dense_0/kernel"], total_steps=10)
>>> _, state = ad.init(jax.random.key(0), testing.tiny_params())
>>> rank_allocation(state)
{'dense_0/kernel': 4}
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from lowrank_jax import _kernels
from lowrank_jax import base as base_lib
from lowrank_jax import structured
from lowrank_jax import targeting
from lowrank_jax import tree as tree_lib
from lowrank_jax.adapters import _leafwise
from lowrank_jax.adapters import _lowrank
from lowrank_jax.adapters import _triplet
from lowrank_jax.adapters._triplet import TripletFactors, rank_allocation


class AdaLoRABuffers(NamedTuple):
  """Frozen per-module buffers (changed only by `adapter.update`).

  mask (r,) fp32 in {0, 1}: the last allocation; ipt/unc: EMAs of the element sensitivity of a, b
  and λ; fixed: fp32 scalar, 1 once the final mask is fixed (pruned λ's are then hard-masked).
  """
  mask: jax.Array
  ipt: TripletFactors
  unc: TripletFactors
  fixed: jax.Array

  def active_rank(self):
    return jnp.sum(self.mask > 0).astype(jnp.int32)


def budget_schedule(step, *, init_bgt: int, target_bgt: int, tinit: int, tfinal: int,
                    total_steps: int):
  """(budget, prune_now_without_deltaT, final) for a (traced) step; see the module docstring."""
  step = jnp.asarray(step)
  span = max(total_steps - tfinal - tinit, 1)
  mul = 1.0 - (step.astype(jnp.float32) - tinit) / span
  cubic = jnp.floor((init_bgt - target_bgt) * jnp.clip(mul, 0.0, 1.0) ** 3 + target_bgt)
  final = step >= total_steps - max(tfinal, 1)
  budget = jnp.where(final, target_bgt, jnp.where(step <= tinit, init_bgt, cubic))
  return budget.astype(jnp.int32), (step > tinit) & ~final, final


@base_lib.records_hparams
def adalora(init_r: int = 12, target_r: int = 8, alpha: Optional[float] = None,
            targets: targeting.Targets = r".*kernel", *, total_steps: int, tinit: int = 0,
            tfinal: int = 0, deltaT: int = 1, beta1: float = 0.85, beta2: float = 0.85,
            orth_reg: float = 0.5, init_std: float = 0.02, dropout: float = 0.0,
            kernel_axes: targeting.AxesSpec = None, dtype=jnp.float32,
            impl: str = "custom_vjp") -> base_lib.Adapter:
  """AdaLoRA on the targeted kernels (see the module docstring).

  Args:
    init_r: initial rank (slots) per module (PEFT 12).
    target_r: average final rank per module (PEFT 8); the final budget is target_r·#modules.
    alpha: scale numerator (s = α/(init_r + 1e-5)); defaults to init_r.
    targets: regex(es) or callable selecting the kernels.
    total_steps: number of training steps T (required, as in PEFT).
    tinit: no pruning at steps <= tinit.
    tfinal: the mask is fixed at the target for the last max(tfinal, 1) steps.
    deltaT: prune every deltaT steps during the cubic phase.
    beta1, beta2: EMA factors (0.85).
    orth_reg: weight of the orthogonality penalty (0.5).
    init_std: a, b ~ N(0, init_std²).
    dropout: adapter-branch input dropout rate.
    kernel_axes: in/out axes for targets with more than 2 dims.
    dtype: adapter parameter dtype.
    impl: factored product ("custom_vjp" or "autodiff").

  Returns:
    An `Adapter` with `update`; state `AdapterState(TripletFactors, AdaLoRABuffers)`.

  Raises:
    ValueError: bad ranks or schedule (here), init_r > min(d_in, d_out) of a target (at init).
  """
  for nm, v, lo in (("init_r", init_r, 1), ("target_r", target_r, 1), ("deltaT", deltaT, 1),
                    ("total_steps", total_steps, 1), ("tinit", tinit, 0), ("tfinal", tfinal, 0)):
    _leafwise.check_int("adalora", nm, v, lo)
  if target_r > init_r:
    raise ValueError(f"adalora: target_r={target_r} > init_r={init_r}; AdaLoRA only prunes")
  if not tinit < total_steps - tfinal:
    raise ValueError(f"adalora: need tinit < total_steps - tfinal (got tinit={tinit}, "
                     f"total_steps={total_steps}, tfinal={tfinal}); the budgeting phase is empty")
  if alpha is not None and not alpha > 0:
    raise ValueError(f"adalora: alpha must be > 0, got {alpha!r}")
  if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
    raise ValueError(f"adalora: beta1={beta1!r}, beta2={beta2!r} must be in [0, 1)")
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"adalora: dropout must be in [0, 1), got {dropout!r}")
  if orth_reg < 0 or not init_std > 0:
    raise ValueError(f"adalora: orth_reg={orth_reg!r} must be >= 0, init_std={init_std!r} > 0")
  _kernels.check_impl("adalora", impl)
  scale = (float(init_r) if alpha is None else float(alpha)) / (init_r + 1e-5)

  def init_leaf(key, info, w, stats):
    del w, stats
    _leafwise.check_rank("adalora", info, init_r)
    ka, kb = jax.random.split(key)
    a = (init_std * jax.random.normal(ka, info.in_shape + (init_r,), jnp.float32)).astype(dtype)
    b = (init_std * jax.random.normal(kb, (init_r,) + info.out_shape, jnp.float32)).astype(dtype)
    lam = jnp.zeros((init_r,), dtype)
    zeros = TripletFactors(jnp.zeros(a.shape, jnp.float32), jnp.zeros(b.shape, jnp.float32),
                           jnp.zeros((init_r,), jnp.float32))
    buffers = AdaLoRABuffers(jnp.ones((init_r,), jnp.float32), zeros, zeros,
                             jnp.zeros((), jnp.float32))
    return None, TripletFactors(a, b, lam), buffers

  def apply_leaf(path, base_leaf, t, f, rng):
    _leafwise.check_state_shape("adalora", path, base_leaf, _lowrank.factors_shape(t))
    hard_mask = jnp.where(f.fixed > 0, f.mask, jnp.ones_like(f.mask))
    c = t.lam * hard_mask.astype(t.lam.dtype)
    return structured.LowRank(base_leaf, t.a * c, t.b, scale,
                              dropout_key=rng if dropout > 0 else None,
                              dropout_rate=dropout, impl=impl)

  def penalty_leaf(t, f):
    ra, rb = _lowrank.orth_residuals(t.a, t.b)
    return orth_reg * 0.5 * (ra + rb)   # mean over the module's two matrices

  def update(state, grads, step):
    t, f, g, paths = _triplet.update_leaves("adalora", state, grads)
    n = len(paths)
    step = jnp.asarray(step)
    budget, cubic_phase, final = budget_schedule(
        step, init_bgt=init_r * n, target_bgt=target_r * n, tinit=tinit, tfinal=tfinal,
        total_steps=total_steps)
    learning = ~final
    ipts, uncs, scores = {}, {}, []
    for p in paths:
      tp, gp, fp = t[p], g[p], f[p]
      new_i, new_u = [], []
      for x, gx, i0, u0 in zip(tp, gp, fp.ipt, fp.unc):
        sens = jnp.abs(x.astype(jnp.float32) * gx.astype(jnp.float32))
        i1 = beta1 * i0 + (1 - beta1) * sens
        u1 = beta2 * u0 + (1 - beta2) * jnp.abs(sens - i1)
        new_i.append(jnp.where(learning, i1, i0).astype(i0.dtype))
        new_u.append(jnp.where(learning, u1, u0).astype(u0.dtype))
      ipts[p], uncs[p] = TripletFactors(*new_i), TripletFactors(*new_u)
      sa = ipts[p].a * uncs[p].a
      sb = ipts[p].b * uncs[p].b
      s_a = jnp.mean(sa.reshape(-1, init_r), axis=0)
      s_b = jnp.mean(sb.reshape(init_r, -1), axis=1)
      scores.append(ipts[p].lam * uncs[p].lam + s_a + s_b)
    score = jnp.concatenate(scores)                        # (n·r,)
    masks0 = jnp.concatenate([f[p].mask for p in paths])
    order = jnp.argsort(-score, stable=True)
    pos = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))
    keep = (pos < budget).astype(jnp.float32)
    # The first final step re-ranks all triplets once more (PEFT's force_mask at T − tfinal): a
    # triplet re-activated since the last pruning step can still make the final allocation.
    first_final = final & (f[paths[0]].fixed == 0)
    prune_now = (cubic_phase & (step % deltaT == 0)) | first_final
    masks = jnp.where(prune_now, keep, masks0)
    zero_pruned = prune_now | final
    new_t, new_f = {}, {}
    for k, p in enumerate(paths):
      m = masks[k * init_r:(k + 1) * init_r].astype(f[p].mask.dtype)
      tp = t[p]
      lam = jnp.where(zero_pruned & (m == 0), jnp.zeros_like(tp.lam), tp.lam)
      new_t[p] = TripletFactors(tp.a, tp.b, lam)
      fixed = jnp.where(final, 1.0, f[p].fixed).astype(f[p].fixed.dtype)
      new_f[p] = AdaLoRABuffers(m, ipts[p], uncs[p], fixed)
    return base_lib.AdapterState(tree_lib.nest(new_t), tree_lib.nest(new_f))

  inner = _leafwise.leafwise("adalora", targets=targets, init_leaf=init_leaf,
                             apply_leaf=apply_leaf, penalty_leaf=penalty_leaf,
                             kernel_axes=kernel_axes, update=update, update_grad="total")
  return inner


# ---------------------------------------------------------------------------------------------
# Method facts, read by `lowrank_jax.registry`.
# ---------------------------------------------------------------------------------------------

def _config_kwargs(rank, alpha, targets, total_steps):
  """`rank` is the average target rank r, pruned from an initial max(1.5·r, r + 1); alpha defaults
  to 2·r. Pruning runs from `total_steps // 10` to `total_steps // 5` (each at least 1); the
  factory's own `total_steps` is left to the trainer."""
  return dict(init_r=max(rank + rank // 2, rank + 1), target_r=rank,
              alpha=float(2 * rank if alpha is None else alpha), targets=targets,
              tinit=max(total_steps // 10, 1), tfinal=max(total_steps // 5, 1))


METHOD_FACTS = {
    "adalora": base_lib.MethodFacts(adalora, _config_kwargs, rank_allocation=rank_allocation),
}
