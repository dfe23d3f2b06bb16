"""IncreLoRA tests: growth in the jitted step (compiles once), exact budget, allocation log,
importance identity, penalty formula, errors. `dense_ref` is used by the contract table."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax import testing
from lowrank_jax import tree as tree_lib
from lowrank_jax.adapters.increlora import (IncreLoRABuffers, component_inner, increlora,
                                            rank_allocation)
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


def test_penalty_formula():
  ad = increlora(target_rank=2, init_rank=1, targets=DENSE, add_r=1, orth_reg=0.1)
  base, state = ad.init(jax.random.key(0), testing.tiny_params())
  state = testing.perturb(state, jax.random.key(1))
  terms = []
  for path, t in tree_lib.unnest(state.trainable).items():
    a = np.asarray(t.a, np.float64)[:, :2]          # active (1) + reserve (1) components
    b = np.asarray(t.b, np.float64)[:2]
    terms.append(np.linalg.norm(a.T @ a - np.eye(2)) + np.linalg.norm(b @ b.T - np.eye(2)))
  np.testing.assert_allclose(float(ad.penalty(state)), 0.1 * np.mean(terms), rtol=1e-5)


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
