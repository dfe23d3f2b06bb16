"""`optim.make_schedule` / `make_optimizer` from config blocks."""
from absl.testing import absltest
import jax.numpy as jnp
import ml_collections
import numpy as np

from lowrank_jax import optim


def _ocfg(**kw):
  c = dict(name="adamw", lr=1.0, head_lr=0.5, wd=0.0, b1=0.9, b2=0.999, schedule="cosine",
           warmup_steps=2, grad_clip=1.0)
  c.update(kw)
  return ml_collections.ConfigDict(c)


class OptimTest(absltest.TestCase):

  def test_optimizer_schedules(self):
    for sched in optim.SCHEDULES:
      o = ml_collections.ConfigDict(dict(name="adamw", lr=1.0, head_lr=0.5, wd=0.0, b1=0.9,
                                         b2=0.999, schedule=sched, warmup_steps=2, grad_clip=1.0))
      s = optim.make_schedule(o, 1.0, 10)
      self.assertAlmostEqual(float(s(0)), 0.0)
      self.assertAlmostEqual(float(s(2)), 1.0, places=5)
      optim.make_optimizer(o, 10)

  def test_schedules_against_closed_forms(self):
    total, warm, lr = 10, 2, 1.0
    cos = lambda t: 0.5 * lr * (1 + np.cos(np.pi * (t - warm) / (total - warm)))
    expected = {"constant": lambda t: lr, "cosine": cos,
                "linear": lambda t: lr * (total - t) / (total - warm)}
    for name, f in expected.items():
      s = optim.make_schedule(_ocfg(schedule=name, warmup_steps=warm), lr, total)
      for t in range(total + 1):
        want = lr * t / warm if t < warm else f(t)
        self.assertAlmostEqual(float(s(t)), want, places=5, msg=f"{name} at {t}")

  def test_adapter_and_head_get_their_own_learning_rates(self):
    # sgd without momentum, decay or warm-up: one step moves each part by -lr * grad.
    tx = optim.make_optimizer(_ocfg(name="sgd", b1=0.0, schedule="constant", warmup_steps=0,
                                    grad_clip=0.0, lr=0.1, head_lr=0.01), 10)
    params = {"adapter": {"w": jnp.ones(2)}, "head": {"h": jnp.ones(3)}}
    grads = {"adapter": {"w": jnp.full(2, 2.0)}, "head": {"h": jnp.full(3, 2.0)}}
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["adapter"]["w"], -0.2, rtol=1e-6)
    np.testing.assert_allclose(updates["head"]["h"], -0.02, rtol=1e-6)

  def test_unknown_names(self):
    with self.assertRaisesRegex(ValueError, r"Unknown optimizer.name 'adam9'; valid: "
                                r"\['adamw', 'sgd'\]"):
      optim.make_optimizer(_ocfg(name="adam9"), 10)
    with self.assertRaisesRegex(ValueError, r"Unknown optimizer.schedule 'cos'"):
      optim.make_schedule(_ocfg(schedule="cos"), 1.0, 10)


if __name__ == "__main__":
  absltest.main()
