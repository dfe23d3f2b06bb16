"""IncreLoRA: incremental parameter allocation (Zhang et al. 2023, arXiv 2308.12043; repo
FeiyuZhang98/IncreLoRA).

Each module starts at a small rank and, on a schedule, rank-1 components are *added* to the
modules with the highest importance until a total rank budget is reached (AdaLoRA run in reverse;
see `adalora.py` for the comparator).

Parameterization (our flax layout, W_k (d_in, d_out)): per module

    ΔW_k = α/(ρ + 1e-5) · Σ_i c_i · a_i b_iᵀ  = s · (a·diag(c))·b,    a (d_in, R), b (R, d_out)

i.e. IncreLoRA's `B (A ⊙ E)` transposed (a = Aᵀ, b = Bᵀ, c = E). ρ is the number of *active*
components (the official `ranknum`), so the scale is α/ρ, not α/r. JAX needs static shapes, so R =
`max_rank` slots are preallocated per module and a frozen counter ρ says which are live:

* slots [0, ρ) are active: c_i = λ_i, trainable;
* slots [ρ, ρ + add_r) are the reserve ("advance learning"): their a, b train already, c_i is
  fixed at 1e-5 (0 with `advance_learn=False`, and 0 for everyone once the budget is reached —
  the official code zeroes the trailing reserve λ's);
* the other slots are dormant: c_i = 0, so they get zero gradients, and the restart warm-up below
  gives them no optimizer step at all (not even weight decay): their N(0, 0.02²) init stays
  untouched, i.e. they are "created" fresh when reached.

When a module is selected, its reserve becomes active with λ = 1e-5 (continuous with the reserve's
fixed coefficient) and the next add_r slots become its reserve.

`adapter.update(state, grads, step)` (call it every step, inside the jitted step, after the
optimizer step, with the gradients of `state.trainable`) does the bookkeeping with static shapes.
It sees the gradient of the task loss only (`update_grad="task"`): the official score is a
backward hook on ΔW, which the orthogonality penalty (a function of the factors, not of ΔW) never
reaches.

* importance per module, smoothed every step until the budget is reached:
  Ī ← β1·Ī + (1−β1)·s;  `Ū ← β2·Ū + (1−β2)·|s − Ī|`;  score = Ī·Ū  (β1 = β2 = 0.85);
* at step t > init_warmup with t % incre_interval == 0, while the active total is below the budget,
  the `top_h` highest-scoring modules (with free slots) gain `add_r` rank each, clipped so that the
  total lands exactly on the budget (the official `>=` threshold can select more than top_h modules
  on ties and overshoot).

Importance, `importance=`:

* "elementwise" (the paper's and the official hook's score):
  `s = Σ|ΔW ⊙ G| / √(d_out·d_in)` with
  G = ∂L_task/∂ΔW = xᵀg, the dense weight gradient. It needs G per target, which the factor
  gradients do not contain, so the state gets a zero dense leaf `probe` (the kernel's shape) per
  target, added to the base weight in `apply`: its gradient is G, and `update` resets it to 0
  after every step, so the model never sees it. Cost: the full fine-tuning weight gradient of every
  target each step (O(tokens·d_in·d_out) FLOPs, d_in·d_out memory), a dense ΔW in `update`, plus
  what the optimizer keeps for the probe (Adam: two more dense arrays); the probe counts in
  `count_params` and in gradient-norm clipping (mask it out of clipping with `optax.masked` where
  that matters). Opt-in for that cost.
* "factored" (the default; a variant, cheaper): `s = Σ_i |⟨ΔW_i, G⟩| / √(d_out·d_in)` over the
  rank-1 components ΔW_i, from ⟨ΔW_i, G⟩ = Σ_j a_ji·(∂L/∂a)_ji, exact and free from the factor
  gradients (cost O(R·(d_in + d_out)) per module per step). It is the Taylor sensitivity of each
  rank-1 piece rather than of each entry: `|Σ| ≤ Σ|·|` makes it smaller than the elementwise score
  and not proportional to it across modules, so the two can rank modules differently.

Both score the factors the step's forward pass used (kept in `IncreLoRABuffers.prev`) against that
pass's gradient, as the hook does.

Penalty (official trainer, `lora_type="svd"`): the mean over the 2n matrices of the n modules of
‖AAᵀ − I‖_F and ‖BᵀB − I‖_F (norms not squared; the official code divides their sum by 2n) over
all existing components (active + reserve), in our layout ‖aᵀa − I‖ and ‖b bᵀ − I‖, times
`orth_reg` (0.1).

Restart warm-up (the official `multi_lr`). The official code puts every set of new parameters (the
λ's of activated components, the a, b of new reserves) in a new optimizer group whose learning rate
restarts a linear warm-up of the run's warm-up length. Here each slot records when its a, b and
its λ start training (`born_ab`, `born_lam`: 0 for those that train from the start), and `update`
scales that slot's optimizer step at step t by min(1, (t − born)/`restart_warmup`) — the step is
re-done from `prev` (the factors the step started from), so it works for any optimizer (Adam's
moments and weight decay included, as a per-group learning rate would). Slots not yet born get
factor 0, so dormant slots stay exactly at their initial values. Not reproduced: the official new
groups also restart the linear decay (to 0 at the end of training) from their own start; here,
after its warm-up, a component follows the run's schedule. If the trainable state is replaced
from outside (not through the optimizer and `update`), replace `prev` with it.

>>> import jax, lowrank_jax as lj
>>> from lowrank_jax import testing
>>> from lowrank_jax.adapters.increlora import increlora, rank_allocation
>>> ad = increlora(target_rank=2, targets=["dense_0/kernel", "dense_1/kernel"])
>>> base, state = ad.init(jax.random.key(0), testing.tiny_params())
>>> rank_allocation(state)
{'dense_0/kernel': 1, 'dense_1/kernel': 1}
"""
from __future__ import annotations

import math
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
# rank_allocation(_arrays) serve IncreLoRA and AdaLoRA; importable from here as before.
from lowrank_jax.adapters._triplet import (TripletFactors, component_inner, rank_allocation,
                                           rank_allocation_arrays)

# Official add_r map from target_rank (IncreLoRA NLU scripts): {2: 1, 4: 2, 6: 3, 8: 4}.
_ADD_R = {2: 1, 4: 2, 6: 3, 8: 4}
IMPORTANCES = ("factored", "elementwise")
_NEVER = jnp.iinfo(jnp.int32).max       # birth step of a slot that has not started training


class ProbedTriplet(NamedTuple):
  """Trainable per-module state of IncreLoRA with `importance="elementwise"`: the factors and a
  zero dense `probe` of the kernel's shape whose gradient is the dense weight gradient."""
  a: jax.Array
  b: jax.Array
  lam: jax.Array
  probe: jax.Array


class IncreLoRABuffers(NamedTuple):
  """Frozen per-module buffers (changed only by `adapter.update`).

  Attributes:
    rank: int32 scalar ρ, number of active components (slots [0, ρ)).
    reserve_on: fp32 scalar, 1 while reserves carry their fixed coefficient, 0 afterwards.
    ipt, unc: fp32 scalars, the smoothed importance Ī and uncertainty Ū.
    born_ab, born_lam: int32 (R,), the step from which a slot's a, b (resp. λ) train; 0 from the
      start, int32 max not yet (drives the restart warm-up).
    prev: `TripletFactors`, the factors the current step's forward pass used.
  """
  rank: jax.Array
  reserve_on: jax.Array
  ipt: jax.Array
  unc: jax.Array
  born_ab: jax.Array
  born_lam: jax.Array
  prev: TripletFactors

  def active_rank(self):
    return self.rank


def factored_score(a, grad_a) -> jax.Array:
  """`Σ_i |⟨ΔW_i, ∂L/∂ΔW⟩|` over the rank-1 components (not normalized by the size)."""
  return jnp.sum(jnp.abs(component_inner(a, grad_a)))


def elementwise_score(delta, grad_w) -> jax.Array:
  """`Σ |ΔW ⊙ ∂L/∂ΔW|` over the entries (not normalized by the size)."""
  return jnp.sum(jnp.abs(delta.astype(jnp.float32) * grad_w.astype(jnp.float32)))


def restart_multiplier(born, step, warmup: int) -> jax.Array:
  """Per-slot factor of the optimizer step taken at `step`: 1 for slots trained from the start
  (born 0), min(1, (step − born)/warmup) for slots added later, 0 before they are born."""
  step = jnp.asarray(step, jnp.int32)
  if warmup == 0:
    ramp = (step >= born).astype(jnp.float32)
  else:
    ramp = jnp.clip((step - born).astype(jnp.float32) / warmup, 0.0, 1.0)
  return jnp.where(born == 0, 1.0, ramp)


def scaled_step(pre: TripletFactors, post, m_ab, m_lam) -> TripletFactors:
  """`pre + m·(post − pre)` per slot (a: last axis, b: first axis); exactly `post` where m = 1."""
  def mix(x0, x1, m):
    dt = jnp.promote_types(x1.dtype, jnp.float32)
    mixed = x0.astype(dt) + m.astype(dt) * (x1.astype(dt) - x0.astype(dt))
    return jnp.where(m == 1, x1, mixed.astype(x1.dtype))
  m_b = m_ab.reshape(m_ab.shape + (1,) * (post.b.ndim - 1))
  return TripletFactors(mix(pre.a, post.a, m_ab), mix(pre.b, post.b, m_b),
                        mix(pre.lam, post.lam, m_lam))


@base_lib.records_hparams
def increlora(target_rank: int = 2, init_rank: int = 1, alpha: Optional[float] = None,
              targets: targeting.Targets = r".*kernel", *, total_rank: Optional[int] = None,
              add_r: Optional[int] = None, max_rank: Optional[int] = None, top_h: int = 2,
              init_warmup: int = 100, incre_interval: int = 100, advance_learn: bool = True,
              reserve_lambda: float = 1e-5, beta1: float = 0.85, beta2: float = 0.85,
              orth_reg: float = 0.1, init_std: float = 0.02, dropout: float = 0.0,
              kernel_axes: targeting.AxesSpec = None, dtype=jnp.float32,
              impl: str = "custom_vjp", importance: str = "factored",
              restart_warmup: Optional[int] = None) -> base_lib.Adapter:
  """IncreLoRA on the targeted kernels (see the module docstring).

  Args:
    target_rank: average final rank per module; the budget is `target_rank × #modules`.
    init_rank: active rank of every module at init (official lora_r, 1 in the scripts).
    alpha: scale numerator (s = α/ρ); defaults to `init_rank` (official: α if > 0 else r).
    targets: regex(es) or callable selecting the kernels.
    total_rank: the budget as a total instead (overrides `target_rank × #modules`).
    add_r: rank gained per selection and reserve size; default from the official map
      {2: 1, 4: 2, 6: 3, 8: 4} of target_rank, else max(1, target_rank // 2).
    max_rank: preallocated slots per module (capped at min(d_in, d_out)); default
      `2·target_rank + add_r`. The budget must fit: Σ slots ≥ total budget.
    top_h: modules selected per growth step (official 1–3).
    init_warmup: no growth at steps <= init_warmup.
    incre_interval: growth at steps that are multiples of it.
    advance_learn: reserves train before selection (coefficient `reserve_lambda`); else 0.
    reserve_lambda: the reserves' fixed coefficient and the initial λ of activated slots (1e-5).
    beta1, beta2: EMA factors of importance and uncertainty (0.85).
    orth_reg: weight of the orthogonality penalty (0.1, official `reg_orth_coef`).
    init_std: a, b ~ N(0, init_std²) (0.02).
    dropout: adapter-branch input dropout rate.
    kernel_axes: in/out axes for targets with more than 2 dims.
    dtype: adapter parameter dtype.
    impl: factored product ("custom_vjp" or "autodiff").
    importance: "factored" (default, free from the factor gradients) or "elementwise" (the
      paper's Σ|ΔW ⊙ G|; costs the dense weight gradient of every target, see the module
      docstring).
    restart_warmup: warm-up length (steps) of the per-component restart warm-up; None uses
      `init_warmup` (the official scripts set the run's warm-up to init_warmup); 0: new slots
      take full steps from their start (slots not yet started still take none).

  Returns:
    An `Adapter` with `update` (`update_grad="task"`); state `AdapterState(TripletFactors, or
    ProbedTriplet with importance="elementwise", IncreLoRABuffers)`.

  Raises:
    ValueError: bad arguments here; at `init`, a budget that does not fit the preallocated slots
      or is below `init_rank × #modules`.
  """
  for nm, v, lo in (("target_rank", target_rank, 1), ("init_rank", init_rank, 1),
                    ("top_h", top_h, 1), ("incre_interval", incre_interval, 1),
                    ("init_warmup", init_warmup, 0)):
    _leafwise.check_int("increlora", nm, v, lo)
  for nm, v in (("total_rank", total_rank), ("add_r", add_r), ("max_rank", max_rank)):
    _leafwise.check_int("increlora", nm, v, allow_none=True)
  _leafwise.check_int("increlora", "restart_warmup", restart_warmup, 0, allow_none=True)
  if importance not in IMPORTANCES:
    raise ValueError(f"increlora: importance must be one of {IMPORTANCES}, got {importance!r}")
  if alpha is not None and not alpha > 0:
    raise ValueError(f"increlora: alpha must be > 0, got {alpha!r}")
  if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
    raise ValueError(f"increlora: beta1={beta1!r}, beta2={beta2!r} must be in [0, 1)")
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"increlora: dropout must be in [0, 1), got {dropout!r}")
  if orth_reg < 0 or reserve_lambda < 0 or not init_std > 0:
    raise ValueError(f"increlora: orth_reg={orth_reg!r}, reserve_lambda={reserve_lambda!r} must "
                     f"be >= 0 and init_std={init_std!r} > 0")
  _kernels.check_impl("increlora", impl)
  add = add_r if add_r is not None else _ADD_R.get(target_rank, max(1, target_rank // 2))
  slots = max_rank if max_rank is not None else 2 * target_rank + add
  if slots < init_rank:
    raise ValueError(f"increlora: max_rank={slots} < init_rank={init_rank}")
  alpha_ = float(init_rank) if alpha is None else float(alpha)
  res_coef = reserve_lambda if advance_learn else 0.0
  warmup = init_warmup if restart_warmup is None else restart_warmup
  elementwise = importance == "elementwise"

  def slots_for(info) -> int:
    return min(slots, min(info.d_in, info.d_out))

  def coefficients(t, f):
    r = t.lam.shape[0]
    i = jnp.arange(r)
    active = i < f.rank
    reserve = (i >= f.rank) & (i < f.rank + add)
    coef = jnp.asarray(res_coef, t.lam.dtype) * f.reserve_on.astype(t.lam.dtype)
    return jnp.where(active, t.lam, jnp.where(reserve, coef, jnp.zeros_like(t.lam)))

  def scale_of(f):
    return alpha_ / (f.rank.astype(jnp.float32) + 1e-5)

  def init_leaf(key, info, w, stats):
    del w, stats
    r = slots_for(info)
    if init_rank > r:
      raise ValueError(f"increlora: init_rank={init_rank} > min(d_in, d_out)={r} for "
                       f"{info.path} (shape {info.shape})")
    ka, kb = jax.random.split(key)
    a = init_std * jax.random.normal(ka, info.in_shape + (r,), jnp.float32)
    b = init_std * jax.random.normal(kb, (r,) + info.out_shape, jnp.float32)
    # First component(s): λ = 0 (ΔW = 0 at init); later slots start at the reserve value.
    i = jnp.arange(r)
    lam = jnp.where(i < init_rank, 0.0, reserve_lambda).astype(jnp.float32)
    factors = TripletFactors(a.astype(dtype), b.astype(dtype), lam.astype(dtype))
    trains_ab = init_rank + (add if advance_learn else 0)
    frozen = IncreLoRABuffers(jnp.asarray(init_rank, jnp.int32), jnp.ones((), jnp.float32),
                              jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
                              jnp.where(i < trains_ab, 0, _NEVER).astype(jnp.int32),
                              jnp.where(i < init_rank, 0, _NEVER).astype(jnp.int32), factors)
    if elementwise:
      return None, ProbedTriplet(*factors, jnp.zeros(info.shape, dtype)), frozen
    return None, factors, frozen

  def apply_leaf(path, base_leaf, t, f, rng):
    _leafwise.check_state_shape("increlora", path, base_leaf, _lowrank.factors_shape(t))
    c = coefficients(t, f)
    if elementwise:
      w = structured.materialize(base_leaf)
      base_leaf = w + t.probe.astype(w.dtype)
    return structured.LowRank(base_leaf, t.a * c, t.b, scale_of(f),
                              dropout_key=rng if dropout > 0 else None,
                              dropout_rate=dropout, impl=impl)

  def penalty_leaf(t, f):
    i = jnp.arange(t.lam.shape[0])
    live = i < f.rank + add      # active + reserve: the components that exist
    ra, rb = _lowrank.orth_residuals(t.a, t.b, live)
    return orth_reg * 0.5 * (ra + rb)   # mean over the module's two matrices

  def module_score(f, g):
    """The module's importance s (normalized by √(d_in·d_out)) of the factors the forward pass
    used (`f.prev`) against its gradient `g`."""
    pre = f.prev
    size = math.sqrt(math.prod(pre.a.shape[:-1]) * math.prod(pre.b.shape[1:]))
    if not elementwise:
      return factored_score(pre.a, g.a) / size
    delta = jnp.tensordot(pre.a.astype(jnp.float32) * coefficients(pre, f).astype(jnp.float32),
                          pre.b.astype(jnp.float32), axes=1) * scale_of(f)
    return elementwise_score(delta, g.probe) / size

  def update(state, grads, step):
    t, f, g, paths = _triplet.update_leaves("increlora", state, grads)
    n = len(paths)
    target = total_rank if total_rank is not None else target_rank * n
    step = jnp.asarray(step)
    ranks = jnp.stack([f[p].rank for p in paths]).astype(jnp.int32)
    room = jnp.asarray([t[p].lam.shape[0] for p in paths], jnp.int32) - ranks
    s = jnp.stack([module_score(f[p], g[p]) for p in paths])
    ipt0 = jnp.stack([f[p].ipt for p in paths]).astype(jnp.float32)
    unc0 = jnp.stack([f[p].unc for p in paths]).astype(jnp.float32)
    total = jnp.sum(ranks)
    growing = total < target
    ipt = beta1 * ipt0 + (1 - beta1) * s
    unc = beta2 * unc0 + (1 - beta2) * jnp.abs(s - ipt)
    ipt = jnp.where(growing, ipt, ipt0)
    unc = jnp.where(growing, unc, unc0)
    score = ipt * unc
    do = growing & (step > init_warmup) & (step % incre_interval == 0)
    eligible = room > 0
    key = jnp.where(eligible, score, -jnp.inf)
    order = jnp.argsort(-key, stable=True)
    j = jnp.arange(n)
    g_sorted = jnp.where((j < top_h) & eligible[order], jnp.minimum(add, room[order]), 0)
    before = jnp.cumsum(g_sorted) - g_sorted
    g_sorted = jnp.clip(target - total - before, 0, g_sorted)
    gain = jnp.zeros((n,), jnp.int32).at[order].set(g_sorted.astype(jnp.int32))
    gain = jnp.where(do, gain, 0)
    new_ranks = ranks + gain
    done = jnp.sum(new_ranks) >= target
    new_t, new_f = {}, {}
    for k, p in enumerate(paths):
      tp, fp = t[p], f[p]
      a, b, lam = scaled_step(fp.prev, tp, restart_multiplier(fp.born_ab, step, warmup),
                              restart_multiplier(fp.born_lam, step, warmup))
      i = jnp.arange(lam.shape[0])
      newly = (i >= ranks[k]) & (i < new_ranks[k])
      lam = jnp.where(newly, jnp.asarray(reserve_lambda, lam.dtype), lam)
      # Slots activated now, and (with advance learning) the new reserves, train from step + 1.
      starts = jnp.asarray(step + 1, jnp.int32)
      born_lam = jnp.where(newly, starts, fp.born_lam)
      new_ab = ((i >= ranks[k] + add) & (i < new_ranks[k] + add)) if advance_learn else newly
      born_ab = jnp.where(new_ab, starts, fp.born_ab)
      factors = TripletFactors(a, b, lam)
      new_t[p] = ProbedTriplet(*factors, jnp.zeros_like(tp.probe)) if elementwise else factors
      new_f[p] = IncreLoRABuffers(new_ranks[k].astype(fp.rank.dtype),
                                  jnp.where(done, 0.0, fp.reserve_on).astype(fp.reserve_on.dtype),
                                  ipt[k].astype(fp.ipt.dtype), unc[k].astype(fp.unc.dtype),
                                  born_ab, born_lam, factors)
    return base_lib.AdapterState(tree_lib.nest(new_t), tree_lib.nest(new_f))

  inner = _leafwise.leafwise("increlora", targets=targets, init_leaf=init_leaf,
                             apply_leaf=apply_leaf, penalty_leaf=penalty_leaf,
                             kernel_axes=kernel_axes, update=update)

  def init(key, params, stats=None):
    base, state = inner.init(key, params, stats)
    f = tree_lib.unnest(state.frozen)
    t = tree_lib.unnest(state.trainable)
    n = len(f)
    target = total_rank if total_rank is not None else target_rank * n
    capacity = sum(int(t[p].lam.shape[0]) for p in t)
    if target < init_rank * n:
      raise ValueError(f"increlora: total budget {target} < init_rank × #modules = "
                       f"{init_rank} × {n}")
    if capacity < target:
      raise ValueError(f"increlora: budget {target} does not fit the preallocated slots "
                       f"({capacity} over {n} modules; per module min(max_rank={slots}, "
                       f"min(d_in, d_out))); raise max_rank or lower target_rank/total_rank")
    return base, state

  return base_lib.Adapter(init=init, apply=inner.apply, penalty=inner.penalty, update=update,
                          name="increlora", update_grad="task")


# ---------------------------------------------------------------------------------------------
# Method facts, read by `lowrank_jax.registry`.
# ---------------------------------------------------------------------------------------------

def _config_kwargs(rank, alpha, targets, total_steps):
  """`rank` is the average target rank, grown from 1; alpha defaults to 2·r. Ranks grow every
  `total_steps // 10` steps (at least 1) after a warmup of that length."""
  interval = max(total_steps // 10, 1)
  return dict(target_rank=rank, init_rank=1, alpha=float(2 * rank if alpha is None else alpha),
              targets=targets, init_warmup=interval, incre_interval=interval)


METHOD_FACTS = {
    "increlora": base_lib.MethodFacts(increlora, _config_kwargs, rank_allocation=rank_allocation),
}
