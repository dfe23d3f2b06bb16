"""`optim.make_schedule` / `make_optimizer` from config blocks."""
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lowrank_jax import optim


def _ocfg(**kw):
  c = dict(name="adamw", lr=1.0, head_lr=0.5, wd=0.0, b1=0.9, b2=0.999, schedule="cosine",
           warmup_steps=2, grad_clip=1.0)
  c.update(kw)
  return ml_collections.ConfigDict(c)


def test_optimizer_schedules():
  for sched in optim.SCHEDULES:
    o = ml_collections.ConfigDict(dict(name="adamw", lr=1.0, head_lr=0.5, wd=0.0, b1=0.9,
                                       b2=0.999, schedule=sched, warmup_steps=2, grad_clip=1.0))
    s = optim.make_schedule(o, 1.0, 10)
    assert float(s(0)) == pytest.approx(0.0, abs=5e-8)
    assert float(s(2)) == pytest.approx(1.0, abs=5e-6)
    optim.make_optimizer(o, 10)


def test_schedules_against_closed_forms():
  total, warm, lr = 10, 2, 1.0
  cos = lambda t: 0.5 * lr * (1 + np.cos(np.pi * (t - warm) / (total - warm)))
  expected = {"constant": lambda t: lr, "cosine": cos,
              "linear": lambda t: lr * (total - t) / (total - warm)}
  for name, f in expected.items():
    s = optim.make_schedule(_ocfg(schedule=name, warmup_steps=warm), lr, total)
    for t in range(total + 1):
      want = lr * t / warm if t < warm else f(t)
      assert float(s(t)) == pytest.approx(want, abs=5e-6), f"{name} at {t}"


def test_adapter_and_head_get_their_own_learning_rates():
  # sgd without momentum, decay or warm-up: one step moves each part by -lr * grad.
  tx = optim.make_optimizer(_ocfg(name="sgd", b1=0.0, schedule="constant", warmup_steps=0,
                                  grad_clip=0.0, lr=0.1, head_lr=0.01), 10)
  params = {"adapter": {"w": jnp.ones(2)}, "head": {"h": jnp.ones(3)}}
  grads = {"adapter": {"w": jnp.full(2, 2.0)}, "head": {"h": jnp.full(3, 2.0)}}
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["adapter"]["w"], -0.2, rtol=1e-6)
  np.testing.assert_allclose(updates["head"]["h"], -0.02, rtol=1e-6)


def test_unknown_names():
  with pytest.raises(ValueError, match=r"Unknown optimizer.name 'adam9'; valid: "
                     r"\['adamw', 'sgd'\]"):
    optim.make_optimizer(_ocfg(name="adam9"), 10)
  with pytest.raises(ValueError, match=r"Unknown optimizer.schedule 'cos'"):
    optim.make_schedule(_ocfg(schedule="cos"), 1.0, 10)
