"""Policy-gradient fine-tuning (`lowrank_jax.rl`): a toy bandit learns its target token, the
REINFORCE gradient equals the score-function estimator derived by hand (float64 numpy), the KL to
the reference is exactly 0 at init, and the base params never change."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_jax as lj
from lowrank_jax import rl
from lowrank_jax import steps
from lowrank_jax.models import llama

pytestmark = pytest.mark.usefixtures("fast_compile")
TARGET = 5


def _cfg(vocab):
  return llama.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_layers=1,
                           num_heads=2, num_kv_heads=1)


def _bandit_reward(prompts, completions):
  del prompts
  return np.array([float(c[0] == TARGET) for c in completions])


def _target_prob(params, cfg, prompt):
  """Probability of TARGET after `prompt`, from the dense (merged) model's last logits."""
  logits = np.asarray(llama.apply(lj.merge(params), jnp.asarray(prompt[None]), cfg), np.float64)
  p = np.exp(logits[0, -1] - logits[0, -1].max())
  return p[TARGET] / p.sum()


@pytest.mark.parametrize("objective", ["ppo", "reinforce"])
def test_bandit_reward_rises_base_unchanged_kl_zero_at_init(objective):
  cfg = _cfg(8)
  params = llama.init(jax.random.key(0), cfg)
  adapter = lj.lora(rank=4, targets=r".*kernel")
  base, st = adapter.init(jax.random.key(1), params)
  base_before = jax.tree.map(np.array, base)
  pg = rl.PolicyGradient(adapter, cfg, optax.adam(0.03), _bandit_reward, objective=objective,
                         baseline="ema" if objective == "reinforce" else "mean", kl_coef=0.01,
                         max_new_tokens=1)
  state = pg.init(st, jax.random.key(2))
  prompt = np.array([1, 2, 3], np.int32)
  prompts = np.tile(prompt, (32, 1))
  p0 = _target_prob(pg.policy_params(state, base), cfg, prompt)
  kls, probs = [], []
  for _ in range(10):   # usually above 0.99 after the first 10 updates
    for _ in range(10):
      state, metrics = pg.step(state, base, prompts)
      kls.append(metrics["kl"])
    probs.append(_target_prob(pg.policy_params(state, base), cfg, prompt))
    if probs[-1] > 0.9:
      break
  assert p0 < 0.3 and probs[-1] > 0.9, (p0, probs)
  assert kls[0] == 0.0 and kls[-1] > 0.0
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(base),
                                                   jax.tree.leaves(base_before)))
  # From the tuned adapter: KL 0 to itself (default reference), > 0 to the un-adapted model.
  tuned = steps.adapter_state(state)
  _, again = pg.step(pg.init(tuned, jax.random.key(3)), base, prompts)
  _, to_init = pg.step(pg.init(tuned, jax.random.key(3), reference=st), base, prompts)
  assert again["kl"] == 0.0 and to_init["kl"] > 0.1


def test_reinforce_gradient_is_the_score_function_estimator_by_hand():
  """Vocabulary {0, 1}; LoRA on the lm head only, so logits z = h (W + s A B) with h the frozen
  base's final hidden states; d log softmax(z)[y] / dz = onehot(y) - softmax(z)."""
  cfg = _cfg(2)
  rank, alpha = 2, 3.0
  params = llama.init(jax.random.key(0), cfg)
  adapter = lj.lora(rank=rank, alpha=alpha, targets=r"lm_head/kernel")
  base, st = adapter.init(jax.random.key(1), params)
  b = jax.random.normal(jax.random.key(2), st.trainable["lm_head"]["kernel"].b.shape)
  trainable = {"lm_head": {"kernel": st.trainable["lm_head"]["kernel"]._replace(b=b)}}
  rng = np.random.default_rng(0)
  batch, t, n = 3, 2, 3
  prompt_ids = rng.integers(0, 2, (batch, t)).astype(np.int32)
  completion_ids = rng.integers(0, 2, (batch, n)).astype(np.int32)
  mask = np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0]], np.float32)
  advantages = np.array([0.7, -1.2, 0.4], np.float32)
  data = {"prompt_ids": prompt_ids, "prompt_mask": np.ones_like(prompt_ids),
          "completion_ids": completion_ids, "mask": mask, "advantages": advantages,
          "old_logp": np.zeros((batch, n), np.float32),
          "ref_log_probs": np.zeros((batch, n, 2), np.float32)}
  loss = rl.PolicyGradientLoss(cfg, objective="reinforce")

  def objective(tr):
    return loss(adapter.apply(base, lj.AdapterState(tr, st.frozen)), data)[0]

  grads = jax.grad(objective)(trainable)["lm_head"]["kernel"]

  # By hand: J = (1/B) sum_i A_i sum_t m_it log pi(y_it); loss = -J.
  ids = np.concatenate([prompt_ids, completion_ids], axis=1)
  h = np.asarray(llama.hidden_states(base, jnp.asarray(ids), cfg), np.float64)
  h = h[:, t - 1:t + n - 1]                           # the positions predicting the completion
  a64 = np.asarray(trainable["lm_head"]["kernel"].a, np.float64)
  b64 = np.asarray(b, np.float64)
  s = alpha / rank
  z = h @ (np.asarray(base["lm_head"]["kernel"], np.float64) + s * a64 @ b64)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  dj_dz = (advantages[:, None, None] * mask[:, :, None] / batch) * (np.eye(2)[completion_ids] - p)
  g = np.einsum("bnd,bnv->dv", h, dj_dz)             # dJ/dW of the dense kernel
  np.testing.assert_allclose(grads.b, -s * a64.T @ g, rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(grads.a, -s * g @ b64.T, rtol=2e-4, atol=1e-6)


def test_advantages_and_baseline():
  r = np.array([1.0, 0.0, 0.0, 1.0])
  adv, carried = rl.advantages_and_baseline(r, "mean", 0.9, None)
  np.testing.assert_allclose(adv, r - 0.5)
  adv, carried = rl.advantages_and_baseline(r, "ema", 0.9, None)   # first batch: b = its mean
  np.testing.assert_allclose(adv, r - 0.5)
  assert carried == pytest.approx(0.5)
  adv, carried = rl.advantages_and_baseline(np.ones(4), "ema", 0.9, 0.5)
  np.testing.assert_allclose(adv, np.full(4, 0.5))
  assert carried == pytest.approx(0.9 * 0.5 + 0.1)
  adv, _ = rl.advantages_and_baseline(r, "none", 0.9, None)
  np.testing.assert_allclose(adv, r)


def test_ppo_clip_loss_by_hand():
  logp = jnp.log(jnp.array([[0.5, 0.9]]))
  old = jnp.log(jnp.array([[0.25, 0.9]]))               # ratios 2 and 1
  loss, frac = rl.ppo_clip_loss(logp, old, jnp.ones((1, 2)), jnp.array([1.0]), 0.2)
  np.testing.assert_allclose([loss, frac], [-(1.2 + 1.0) / 2, 0.5], rtol=1e-6)
  loss, _ = rl.ppo_clip_loss(logp, old, jnp.ones((1, 2)), jnp.array([-1.0]), 0.2)
  np.testing.assert_allclose(loss, (2.0 + 1.0) / 2, rtol=1e-6)  # negative A: min keeps rho=2


@pytest.mark.parametrize("kw, match", [
    ({"objective": "a2c"}, "objective='a2c' is not valid"),
    ({"baseline": "median"}, "baseline='median' is not valid"),
    ({"clip_eps": 0.0}, "clip_eps must be > 0"),
    ({"epochs": 0}, "epochs must be an integer >= 1"),
    ({"temperature": 0.0}, "temperature must be > 0"),
])
def test_bad_arguments(kw, match):
  with pytest.raises(ValueError, match=match):
    rl.PolicyGradient(lj.lora(rank=1), _cfg(4), optax.sgd(0.1), _bandit_reward, **kw)


def test_rewards_of_the_wrong_shape():
  cfg = _cfg(8)                     # the bandit's shapes: the sampler is compiled once
  adapter = lj.lora(rank=4, targets=r".*kernel")
  base, st = adapter.init(jax.random.key(1), llama.init(jax.random.key(0), cfg))
  pg = rl.PolicyGradient(adapter, cfg, optax.sgd(0.1), lambda p, c: np.zeros(3),
                         max_new_tokens=1)
  with pytest.raises(ValueError, match=r"rewards returned shape \(3,\), expected \(32,\)"):
    pg.step(pg.init(st, jax.random.key(2)), base, np.ones((32, 3), np.int32))
