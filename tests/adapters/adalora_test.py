"""AdaLoRA tests: pruning to the budget in the jitted step (compiles once), the cubic schedule,
triplet scores, penalty, errors. `dense_ref` is used by the contract table."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax import testing
from lowrank_jax import tree as tree_lib
from lowrank_jax.adapters.adalora import adalora, budget_schedule
from lowrank_jax.adapters.increlora import rank_allocation
from tests.adapters.rank_training import train_tracking_ranks

DENSE = ["dense_0/kernel", "dense_1/kernel"]


pytestmark = pytest.mark.usefixtures("fast_compile")


def dense_ref(alpha, init_r):
  """W + α/(r + 1e-5)·Σ_i c_i λ_i a_i b_iᵀ written from the formula (numpy); c = 1 while
  budgeting, c = the mask once it is fixed."""
  def ref(base, state):
    frozen = tree_lib.unnest(state.frozen)
    out = {}
    for path, t in tree_lib.unnest(state.trainable).items():
      f = frozen[path]
      m = np.asarray(f.mask, np.float64) if float(f.fixed) else np.ones(init_r)
      w = np.asarray(lj.merge(dict(tree_lib.flatten_with_names(base)[0])[path]), np.float64)
      a = np.asarray(t.a, np.float64).reshape(-1, init_r)
      b = np.asarray(t.b, np.float64).reshape(init_r, -1)
      lam = np.asarray(t.lam, np.float64)
      delta = sum(m[i] * lam[i] * np.outer(a[:, i], b[i]) for i in range(init_r))
      out[path] = w + alpha / (init_r + 1e-5) * delta.reshape(w.shape)
    return out
  return ref


def _peft_budget(step, init_bgt, target_bgt, tinit, tfinal, total_steps):
  """PEFT's budget_schedule, re-written from its description (int truncation)."""
  if step <= tinit:
    return init_bgt
  if step > total_steps - tfinal:
    return target_bgt
  mul = 1 - (step - tinit) / (total_steps - tfinal - tinit)
  return int((init_bgt - target_bgt) * mul ** 3 + target_bgt)


def test_budget_schedule_matches_cubic():
  kw = dict(init_bgt=24, target_bgt=16, tinit=10, tfinal=20, total_steps=100)
  for step in range(0, 100):
    b, _, _ = budget_schedule(step, **kw)
    if step == 100 - 20:     # we fix the final mask at T - tfinal (PEFT: the cubic hits target)
      assert int(b) == 16
      continue
    assert int(b) == _peft_budget(step, 24, 16, 10, 20, 100), step



def test_prunes_to_budget_and_compiles_once():
  total, tinit, tfinal = 16, 2, 4
  ad = adalora(init_r=4, target_r=2, alpha=4.0, targets=DENSE, total_steps=total, tinit=tinit,
               tfinal=tfinal, deltaT=2)
  _, s0, s, history, _ = train_tracking_ranks(ad, total)
  assert sum(rank_allocation(s0).values()) == 8
  totals = [sum(h.values()) for h in history]
  assert totals[-1] == 4                                  # target_r × 2 modules
  assert totals == sorted(totals, reverse=True)           # only prunes
  for i, tot in enumerate(totals):
    step = i + 1
    if step <= tinit:
      assert tot == 8
    elif step >= total - tfinal:
      assert tot == 4
    elif step % 2 == 0:
      assert tot == _peft_budget(step, 8, 4, tinit, tfinal, total), (step, totals)
  # Pruned triplets have λ = 0 and no effect; the mask is the logged allocation.
  for p, f in tree_lib.unnest(s.frozen).items():
    lam = np.asarray(tree_lib.unnest(s.trainable)[p].lam)
    assert np.all(lam[np.asarray(f.mask) == 0] == 0)


def test_triplet_scores_prune_least_important():
  """A module whose loss does not depend on it (zero gradients) loses its triplets first."""
  ad = adalora(init_r=3, target_r=2, targets=DENSE, total_steps=4, tinit=0, tfinal=0)
  params = testing.tiny_params()
  base, state = ad.init(jax.random.key(0), params)
  state = testing.perturb(state, jax.random.key(1))
  grads = jax.tree_util.tree_map(jnp.zeros_like, state.trainable)
  grads["dense_1"]["kernel"] = jax.tree_util.tree_map(jnp.ones_like, grads["dense_1"]["kernel"])
  # step 1 of 4 (tinit=0): scores learn from these grads; cubic budget ⌊2·0.75³ + 4⌋ = 4 of 6.
  new = jax.jit(ad.update)(state, grads, jnp.asarray(1))
  alloc = rank_allocation(new)
  assert alloc == {"dense_0/kernel": 1, "dense_1/kernel": 3}


def test_penalty_formula():
  ad = adalora(init_r=3, target_r=2, targets=DENSE, total_steps=10, orth_reg=0.5)
  base, state = ad.init(jax.random.key(0), testing.tiny_params())
  state = testing.perturb(state, jax.random.key(1))
  terms = []
  for t in tree_lib.unnest(state.trainable).values():
    a, b = np.asarray(t.a, np.float64), np.asarray(t.b, np.float64)
    terms += [np.linalg.norm(a.T @ a - np.eye(3)), np.linalg.norm(b @ b.T - np.eye(3))]
  np.testing.assert_allclose(float(ad.penalty(state)), 0.5 * np.mean(terms), rtol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(init_r=2, target_r=3), "target_r"),
    (dict(total_steps=0), "total_steps"),
    (dict(tinit=5, tfinal=5, total_steps=10), "tinit < total_steps - tfinal"),
    (dict(deltaT=0), "deltaT"),
])
def test_factory_errors(kwargs, match):
  args = dict(init_r=4, target_r=2, targets=DENSE, total_steps=10)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    adalora(**args)


def test_rank_too_large_at_init():
  with pytest.raises(ValueError, match="rank=7"):
    adalora(init_r=7, target_r=2, targets=DENSE, total_steps=10).init(jax.random.key(0),
                                                                     testing.tiny_params())


def _lam_grad_and_dense_ref(ad, base, state, path, alpha, init_r):
  """(∂L/∂λ from the adapter, the same from the dense formula s·a_iᵀ G b_i·c_i in float64)."""
  batch = testing.tiny_batch()
  loss = lambda tr: testing.tiny_loss(ad.apply(base, lj.AdapterState(tr, state.frozen)), batch)
  g = tree_lib.unnest(jax.grad(loss)(state.trainable))[path].lam
  merged = lj.merge(ad.apply(base, state))
  layer, leaf = path.split("/")

  def dense_loss(w):
    p = jax.tree_util.tree_map(lambda x: x, merged)
    p[layer][leaf] = w
    return testing.tiny_loss(p, batch)

  gw = np.asarray(jax.grad(dense_loss)(merged[layer][leaf]), np.float64)
  t = tree_lib.unnest(state.trainable)[path]
  f = tree_lib.unnest(state.frozen)[path]
  c = np.asarray(f.mask, np.float64) if float(f.fixed) else np.ones(init_r)
  a, b = np.asarray(t.a, np.float64), np.asarray(t.b, np.float64)
  s = alpha / (init_r + 1e-5)
  ref = np.array([s * c[i] * a[:, i] @ gw @ b[i] for i in range(init_r)])
  return np.asarray(g, np.float64), ref


def test_pruned_lambda_keeps_gradient_while_budgeting_and_is_hard_masked_after():
  """While budgeting a pruned λ is zeroed in place (PEFT's masked_fill_) but still in the product:
  its gradient is the dense one, nonzero. Once the final mask is fixed it gets exactly 0."""
  init_r, alpha, path = 3, 3.0, "dense_0/kernel"
  ad = adalora(init_r=init_r, target_r=1, alpha=alpha, targets=DENSE, total_steps=10, tinit=0,
               tfinal=2)
  base, state = ad.init(jax.random.key(0), testing.tiny_params())
  state = testing.perturb(state, jax.random.key(1))
  grads = jax.tree_util.tree_map(jnp.ones_like, state.trainable)
  budgeting = jax.jit(ad.update)(state, grads, jnp.asarray(4))      # cubic phase, deltaT = 1
  f = tree_lib.unnest(budgeting.frozen)[path]
  pruned = np.asarray(f.mask) == 0
  assert pruned.any() and float(f.fixed) == 0.0
  assert np.all(np.asarray(tree_lib.unnest(budgeting.trainable)[path].lam)[pruned] == 0)
  g, ref = _lam_grad_and_dense_ref(ad, base, budgeting, path, alpha, init_r)
  np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-9)
  assert np.all(np.abs(g[pruned]) > 1e-6)
  final = jax.jit(ad.update)(budgeting, grads, jnp.asarray(8))      # T - tfinal: final mask
  f = tree_lib.unnest(final.frozen)[path]
  pruned = np.asarray(f.mask) == 0
  assert pruned.any() and float(f.fixed) == 1.0
  g, ref = _lam_grad_and_dense_ref(ad, base, final, path, alpha, init_r)
  np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-9)
  assert np.all(g[pruned] == 0.0)


def test_update_sees_total_gradient():
  """PEFT scores with `p.grad`: the gradient of task loss + orthogonal penalty."""
  assert adalora(init_r=3, target_r=2, targets=DENSE, total_steps=4).update_grad == "total"


def test_first_final_step_reranks_by_score():
  """At T − tfinal PEFT re-ranks every triplet (force_mask) even when the previous mask already
  has the target count: a triplet re-activated since then takes the place of a weaker one."""
  ad = adalora(init_r=3, target_r=1, targets=DENSE, total_steps=10, tinit=0, tfinal=2)
  base, state = ad.init(jax.random.key(0), testing.tiny_params())
  frozen = tree_lib.unnest(state.frozen)
  strong = jnp.asarray([0.0, 0.0, 1.0])        # slot 2 scores highest (ipt·unc of λ)
  for p, f in frozen.items():
    ipt = f.ipt._replace(lam=strong)
    frozen[p] = f._replace(mask=jnp.asarray([1.0, 0.0, 0.0]), ipt=ipt, unc=ipt)
  state = lj.AdapterState(state.trainable, tree_lib.nest(frozen))
  grads = jax.tree_util.tree_map(jnp.zeros_like, state.trainable)
  final = jax.jit(ad.update)(state, grads, jnp.asarray(8))
  for f in tree_lib.unnest(final.frozen).values():
    np.testing.assert_array_equal(np.asarray(f.mask), [0.0, 0.0, 1.0])
    assert float(f.fixed) == 1.0
