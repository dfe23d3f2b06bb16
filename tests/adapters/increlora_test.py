"""IncreLoRA tests: growth in the jitted step (compiles once), exact budget, allocation log,
importance identity, penalty formula, errors. `dense_ref` is used by the contract table."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax import testing
from lowrank_jax import tree as tree_lib
from lowrank_jax.adapters.increlora import (IncreLoRABuffers, TripletFactors, component_inner,
                                            increlora, rank_allocation)
from tests.adapters.rank_training import train_tracking_ranks

DENSE = ["dense_0/kernel", "dense_1/kernel"]


pytestmark = pytest.mark.usefixtures("fast_compile")


def dense_ref(alpha, add_r, reserve_lambda=1e-5, advance_learn=True):
  """W + α/(ρ + 1e-5)·Σ_i c_i a_i b_iᵀ written from the formulas (numpy, slot by slot)."""
  def ref(base, state):
    frozen = tree_lib.unnest(state.frozen)
    out = {}
    for path, t in tree_lib.unnest(state.trainable).items():
      f = frozen[path]
      rho = int(f.rank)
      w = np.asarray(lj.merge(dict(tree_lib.flatten_with_names(base)[0])[path]), np.float64)
      a = np.asarray(t.a, np.float64).reshape(-1, t.a.shape[-1])
      b = np.asarray(t.b, np.float64).reshape(t.b.shape[0], -1)
      delta = np.zeros_like(w.reshape(a.shape[0], b.shape[1]))
      for i in range(a.shape[1]):
        if i < rho:
          c = float(t.lam[i])
        elif i < rho + add_r and advance_learn:
          c = reserve_lambda * float(f.reserve_on)
        else:
          c = 0.0
        delta += c * np.outer(a[:, i], b[i])
      out[path] = w + (alpha / (rho + 1e-5)) * delta.reshape(w.shape)
    return out
  return ref



def test_growth_compiles_once_and_hits_budget_exactly():
  ad = increlora(target_rank=3, init_rank=1, alpha=2.0, targets=DENSE, add_r=1, top_h=1,
                 init_warmup=2, incre_interval=2)
  _, s0, s, history, losses = train_tracking_ranks(ad, steps=16)
  assert rank_allocation(s0) == {"dense_0/kernel": 1, "dense_1/kernel": 1}
  totals = [sum(h.values()) for h in history]
  assert totals[-1] == 6                       # budget = 3 × 2 modules
  assert totals == sorted(totals)              # grows monotonically
  # growth only at steps > init_warmup that are multiples of incre_interval, top_h=1 -> +1.
  for i in range(1, len(totals)):
    step = i + 1
    inc = totals[i] - totals[i - 1]
    assert inc == (1 if step % 2 == 0 and step > 2 and totals[i - 1] < 6 else 0), (step, totals)
  # Once the budget is reached, reserves are switched off and importance is frozen.
  for f in tree_lib.unnest(s.frozen).values():
    assert float(f.reserve_on) == 0.0
  assert np.isfinite(losses).all()


def test_growth_top_h_and_add_r_clip_to_budget():
  ad = increlora(target_rank=2, init_rank=1, targets=DENSE, total_rank=5, add_r=2, top_h=2,
                 max_rank=4, init_warmup=1, incre_interval=3)
  _, _, s, history, _ = train_tracking_ranks(ad, steps=9)
  totals = [sum(h.values()) for h in history]
  # step 3: both modules +2 would give 6 > 5: clipped to +2 and +1.
  assert totals[1] == 2 and totals[2] == 5 and totals[-1] == 5
  assert sorted(history[2].values()) == [2, 3]


def test_selected_module_has_top_score():
  ad = increlora(target_rank=3, init_rank=1, targets=DENSE, add_r=1, top_h=1, init_warmup=0,
                 incre_interval=1)
  params = testing.tiny_params()
  batch = testing.tiny_batch()
  base, state = ad.init(jax.random.key(0), params)
  state = testing.perturb(state, jax.random.key(1))
  loss = lambda tr: testing.tiny_loss(ad.apply(base, lj.AdapterState(tr, state.frozen)), batch)
  grads = jax.jit(jax.grad(loss))(state.trainable)
  new = jax.jit(ad.update)(state, grads, jnp.asarray(1))
  f = tree_lib.unnest(new.frozen)
  scores = {p: float(x.ipt * x.unc) for p, x in f.items()}
  gained = [p for p in f if int(f[p].rank) > 1]
  assert len(gained) == 1 and gained[0] == max(scores, key=scores.get)
  # The activated slot starts at λ = 1e-5 (continuous with the reserve coefficient).
  lam = tree_lib.unnest(new.trainable)[gained[0]].lam
  np.testing.assert_allclose(float(lam[1]), 1e-5, rtol=1e-6)


def test_component_inner_is_dense_gradient_inner_product():
  """Σ_j a_ji (∂L/∂a)_ji == ⟨ΔW_i, ∂L/∂ΔW⟩ with the dense gradient: the importance is exact per
  rank-1 component without forming ΔW."""
  ad = increlora(target_rank=2, init_rank=2, alpha=3.0, targets=["dense_0/kernel"])
  params = testing.tiny_params()
  batch = testing.tiny_batch()
  base, state = ad.init(jax.random.key(0), params)
  state = testing.perturb(state, jax.random.key(1))
  loss = lambda tr: testing.tiny_loss(ad.apply(base, lj.AdapterState(tr, state.frozen)), batch)
  g = tree_lib.unnest(jax.grad(loss)(state.trainable))["dense_0/kernel"]
  t = tree_lib.unnest(state.trainable)["dense_0/kernel"]
  f = tree_lib.unnest(state.frozen)["dense_0/kernel"]
  merged = lj.merge(ad.apply(base, state))

  def dense_loss(w):
    p = jax.tree_util.tree_map(lambda x: x, merged)
    p["dense_0"]["kernel"] = w
    return testing.tiny_loss(p, batch)

  gw = np.asarray(jax.grad(dense_loss)(merged["dense_0"]["kernel"]), np.float64)
  s = 3.0 / (int(f.rank) + 1e-5)
  a, b = np.asarray(t.a, np.float64), np.asarray(t.b, np.float64)
  coef = [float(t.lam[0]), float(t.lam[1]), 1e-5]          # 2 active + 1 reserve slot
  for i, c in enumerate(coef):
    expected = np.sum(s * c * np.outer(a[:, i], b[i]) * gw)
    np.testing.assert_allclose(float(component_inner(t.a, g.a)[i]), expected, rtol=1e-3,
                               atol=1e-9)


def _at_forward_state(state, elementwise):
  """`state` with `prev` set to its trainable factors (as after an update) and a zero probe."""
  t = tree_lib.unnest(state.trainable)
  f = tree_lib.unnest(state.frozen)
  if elementwise:
    t = {p: x._replace(probe=jnp.zeros_like(x.probe)) for p, x in t.items()}
  f = {p: x._replace(prev=TripletFactors(t[p].a, t[p].b, t[p].lam)) for p, x in f.items()}
  return lj.AdapterState(tree_lib.nest(t), tree_lib.nest(f))


def _numpy_scores(ad, base, state, alpha, add_r):
  """{path: (factored, elementwise)} in float64 from the definitions, with the dense task gradient
  G = ∂L/∂W of the merged weights: Σ_i|⟨ΔW_i, G⟩|/√(mn) and Σ|ΔW ⊙ G|/√(mn)."""
  batch = testing.tiny_batch()
  merged = lj.merge(ad.apply(base, state))
  frozen = tree_lib.unnest(state.frozen)
  out = {}
  for path, t in tree_lib.unnest(state.trainable).items():
    layer, leaf = path.split("/")

    def dense_loss(w):
      p = jax.tree_util.tree_map(lambda x: x, merged)
      p[layer][leaf] = w
      return testing.tiny_loss(p, batch)

    gw = np.asarray(jax.grad(dense_loss)(merged[layer][leaf]), np.float64)
    rho = int(frozen[path].rank)
    a, b = np.asarray(t.a, np.float64), np.asarray(t.b, np.float64)
    coef = [float(t.lam[i]) if i < rho else (1e-5 if i < rho + add_r else 0.0)
            for i in range(a.shape[1])]
    parts = [alpha / (rho + 1e-5) * c * np.outer(a[:, i], b[i]) for i, c in enumerate(coef)]
    size = np.sqrt(gw.size)
    out[path] = (sum(abs(np.sum(d * gw)) for d in parts) / size,
                 np.sum(np.abs(sum(parts) * gw)) / size)
  return out


@pytest.mark.parametrize("importance", ["factored", "elementwise"])
def test_importance_scores_match_float64_definitions(importance):
  alpha, add_r, beta1 = 3.0, 1, 0.85
  ad = increlora(target_rank=3, init_rank=2, alpha=alpha, targets=DENSE, add_r=add_r,
                 init_warmup=100, importance=importance)
  base, state = ad.init(jax.random.key(0), testing.tiny_params())
  state = _at_forward_state(testing.perturb(state, jax.random.key(1)), importance == "elementwise")
  batch = testing.tiny_batch()
  loss = lambda tr: testing.tiny_loss(ad.apply(base, lj.AdapterState(tr, state.frozen)), batch)
  new = jax.jit(ad.update)(state, jax.grad(loss)(state.trainable), jnp.asarray(1))
  ref = _numpy_scores(ad, base, state, alpha, add_r)
  k = 0 if importance == "factored" else 1
  for path, f in tree_lib.unnest(new.frozen).items():
    # One EMA step from Ī = 0: Ī = (1 - β1)·s.
    np.testing.assert_allclose(float(f.ipt), (1 - beta1) * ref[path][k], rtol=1e-4)
    assert ref[path][0] < ref[path][1]          # |Σ| <= Σ|.|: the variant is smaller
  if importance == "elementwise":
    for t in tree_lib.unnest(new.trainable).values():
      assert float(jnp.abs(t.probe).max()) == 0.0     # reset: the model never sees it
    assert lj.count_params(state) == sum(
        t.a.size + t.b.size + t.lam.size + t.probe.size
        for t in tree_lib.unnest(state.trainable).values())


def test_update_sees_task_gradient():
  """The official score is a hook on ΔW, which the orthogonality penalty never reaches."""
  assert increlora(targets=DENSE).update_grad == "task"


def test_restart_warmup_scales_new_slots_steps():
  """After a growth at step 2, the activated λ and the new reserve's a, b train from step 3 with
  their optimizer step scaled by min(1, (t - 3)/restart_warmup); older slots take the full step,
  dormant ones none. Checked against the formula in numpy on a hand-made optimizer step."""
  ad = increlora(target_rank=3, init_rank=1, targets=DENSE, add_r=1, top_h=1, init_warmup=0,
                 incre_interval=2, restart_warmup=4)
  base, state = ad.init(jax.random.key(0), testing.tiny_params())
  grads = jax.tree_util.tree_map(jnp.ones_like, state.trainable)
  update = jax.jit(ad.update)
  grown = update(state, grads, jnp.asarray(2))
  path = [p for p, r in rank_allocation(grown).items() if r == 2][0]
  f = tree_lib.unnest(grown.frozen)[path]
  never = np.iinfo(np.int32).max
  np.testing.assert_array_equal(np.asarray(f.born_lam)[:4], [0, 3, never, never])
  np.testing.assert_array_equal(np.asarray(f.born_ab)[:4], [0, 0, 3, never])
  delta = testing.perturb(grown, jax.random.key(2), scale=0.1).trainable
  stepped = lj.AdapterState(delta, grown.frozen)
  new = update(stepped, grads, jnp.asarray(5))          # no growth at 5; (5 - 3)/4 = 0.5
  pre, post = f.prev, tree_lib.unnest(delta)[path]
  out = tree_lib.unnest(new.trainable)[path]
  m_ab = np.array([1.0, 1.0, 0.5] + [0.0] * (pre.lam.shape[0] - 3))
  m_lam = np.array([1.0, 0.5] + [0.0] * (pre.lam.shape[0] - 2))
  f64 = lambda x: np.asarray(x, np.float64)
  np.testing.assert_allclose(f64(out.a), f64(pre.a) + m_ab * (f64(post.a) - f64(pre.a)),
                             rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(f64(out.b), f64(pre.b) + m_ab[:, None] * (f64(post.b) - f64(pre.b)),
                             rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(f64(out.lam), f64(pre.lam) + m_lam * (f64(post.lam) - f64(pre.lam)),
                             rtol=1e-6, atol=1e-7)
  # `prev` follows the state the next forward pass uses.
  chex.assert_trees_all_equal(tree_lib.unnest(new.frozen)[path].prev, TripletFactors(*out))


def test_penalty_formula():
  ad = increlora(target_rank=2, init_rank=1, targets=DENSE, add_r=1, orth_reg=0.1)
  base, state = ad.init(jax.random.key(0), testing.tiny_params())
  state = testing.perturb(state, jax.random.key(1))
  # The official compute_svd_orth_regu: concatenated lora_A (k, d_in) = aᵀ and lora_B
  # (d_out, k) = bᵀ of the k existing components; Σ of the 2n norms / 2n.
  total, num = 0.0, 0
  for t in tree_lib.unnest(state.trainable).values():
    lora_a = np.asarray(t.a, np.float64)[:, :2].T   # active (1) + reserve (1) components
    lora_b = np.asarray(t.b, np.float64)[:2].T
    total += np.linalg.norm(lora_a @ lora_a.T - np.eye(2))
    total += np.linalg.norm(lora_b.T @ lora_b - np.eye(2))
    num += 2
  np.testing.assert_allclose(float(ad.penalty(state)), 0.1 * total / num, rtol=1e-5)


def test_rank_allocation_log_under_jit():
  from lowrank_jax.adapters.increlora import rank_allocation_arrays
  ad = increlora(target_rank=2, targets=DENSE)
  _, state = ad.init(jax.random.key(0), testing.tiny_params())
  out = jax.jit(rank_allocation_arrays)(state)
  assert {p: int(v) for p, v in out.items()} == rank_allocation(state)


@pytest.mark.parametrize("kwargs, match", [
    (dict(target_rank=0), "target_rank"),
    (dict(init_rank=0), "init_rank"),
    (dict(top_h=0), "top_h"),
    (dict(add_r=0), "add_r"),
    (dict(beta1=1.0), "beta1"),
    (dict(max_rank=1, init_rank=2), "max_rank"),
    (dict(importance="dense"), "importance"),
    (dict(restart_warmup=-1), "restart_warmup"),
])
def test_factory_errors(kwargs, match):
  args = dict(targets=DENSE)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    increlora(**args)


def test_budget_must_fit_slots():
  with pytest.raises(ValueError, match="does not fit"):
    increlora(target_rank=4, max_rank=3, targets=DENSE).init(jax.random.key(0),
                                                             testing.tiny_params())
  with pytest.raises(ValueError, match="init_rank"):
    increlora(target_rank=2, init_rank=2, total_rank=3, targets=DENSE).init(
        jax.random.key(0), testing.tiny_params())
