"""Policy-gradient fine-tuning of an adapter on the Llama decoder (REINFORCE or PPO-clip + KL).

One iteration (`PolicyGradient.step`):

1. Rollout: `generate` samples one completion per prompt from the adapted params (structured
   kernels, run factored) at `temperature`.
2. Scoring (one jitted forward over prompt + completion, fixed shapes (B, T + N)): the log-prob
   log pi(y_t | x, y_<t) of every sampled token under the current policy (the "old" policy of the
   PPO ratio) and the full next-token log-distribution of the reference model at every completion
   position. The reference is the same base under the adapter's *initial* state (kept in the train
   state as `reference`, an adapter-sized tree; the base is shared, never copied): for every
   adapter whose update starts at zero (LoRA's B = 0, ...) and for residual ones (PiSSA: residual
   + principal part), that is the un-adapted model, so the KL term is exactly 0 at init. Starting
   from a tuned adapter (after SFT), the reference is that tuned model, or any other state of the
   same adapter given to `init(..., reference=...)`.
3. Rewards: `rewards(prompts, completions) -> (B,)` on the host; `completions[i]` is the list of
   ids row i generated, its stop token included.
4. Advantages A_i = r_i - b with the baseline b (`baseline`):
   "mean": the batch mean reward; "ema": b_k = d * b_{k-1} + (1 - d) * mean(r_k) with
   d = `baseline_decay`, b_0 = mean of the first batch, *read before* it is updated with the
   current batch; "none": b = 0.
5. `epochs` optimizer steps on the same rollout (jitted `steps.make_train_step`; the adapter's
   penalty and update hooks apply as in supervised training). The loss, with m_it the completion
   mask (1 on the generated tokens up to and including the stop token), B the batch size and
   M = sum m:

   - "reinforce": L = -(1/B) sum_i A_i sum_t m_it log pi(y_it); its gradient is the
     score-function estimator -(1/B) sum_i A_i grad log pi(y_i | x_i).
   - "ppo": with rho_it = exp(log pi(y_it) - log pi_old(y_it)),
     L = -(1/M) sum_it m_it min(rho_it A_i, clip(rho_it, 1 - eps, 1 + eps) A_i).

   Both add `kl_coef` * KL, KL = (1/M) sum_it m_it sum_v pi(v | .) (log pi(v | .) - log
   pi_ref(v | .)): the exact KL over the vocabulary at each completion position (not a sampled
   estimate; the batch carries the reference log-probs (B, N, vocab)).

>>> import jax, jax.numpy as jnp, numpy as np, optax, lowrank_jax as lj
>>> from lowrank_jax.models import llama
>>> cfg = llama.LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=32, num_layers=1,
...                         num_heads=2, num_kv_heads=1)
>>> base = llama.init(jax.random.key(0), cfg)
>>> adapter = lj.lora(rank=2, targets=r'.*kernel')
>>> base, st = adapter.init(jax.random.key(1), base)
>>> reward = lambda prompts, completions: np.array([float(c[0] == 3) for c in completions])
>>> pg = PolicyGradient(adapter, cfg, optax.adam(0.05), reward, max_new_tokens=1)
>>> state = pg.init(st, jax.random.key(2))
>>> state, metrics = pg.step(state, base, np.ones((4, 2), np.int32))
>>> sorted(metrics)[:4], float(metrics['kl'])
(['advantage_std', 'baseline', 'clip_fraction', 'completion_tokens'], 0.0)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank_jax import base as base_lib
from lowrank_jax import generate as generate_lib
from lowrank_jax import steps
from lowrank_jax.models import llama

PyTree = Any
# rewards(prompts, completions) -> (B,) rewards; completions[i] = ids row i generated (stop
# token included).
RewardFn = Callable[[Any, list], Any]

OBJECTIVES = ("reinforce", "ppo")
BASELINES = ("mean", "ema", "none")


def completion_mask(lengths: jax.Array, max_new_tokens: int) -> jax.Array:
  """float32 (B, N): 1 on the first `lengths[i]` generated tokens of row i, else 0."""
  return (jnp.arange(max_new_tokens)[None, :] < lengths[:, None]).astype(jnp.float32)


def completion_log_probs(params: PyTree, cfg: llama.LlamaConfig, prompt_ids: jax.Array,
                         prompt_mask: jax.Array, completion_ids: jax.Array,
                         mask: jax.Array) -> jax.Array:
  """Next-token log-distributions float32 (B, N, vocab) at the N completion positions.

  One forward over prompt + completion (B, T + N), with the positions and segments `generate`
  uses: prompt padding (`prompt_mask` 0, left or right) and completion tokens after the end (mask
  0) are segment 0, so no real token attends them, and RoPE positions count real tokens only.
  Completion token j is predicted at the last real prompt token (j = 0) or at token j - 1.
  """
  t = prompt_ids.shape[1]
  n = completion_ids.shape[1]
  segments = jnp.concatenate([prompt_mask, mask], axis=1).astype(jnp.int32)
  ids = jnp.concatenate([prompt_ids, completion_ids], axis=1)
  positions = jnp.maximum(jnp.cumsum(segments, axis=1) - 1, 0)
  logits = llama.apply(params, ids, cfg, positions=positions, segment_ids=segments)
  last_real = t - 1 - jnp.argmax(prompt_mask[:, ::-1], axis=1)
  at = jnp.concatenate([last_real[:, None], jnp.broadcast_to(t + jnp.arange(n - 1), (ids.shape[0],
                                                                                     n - 1))], 1)
  picked = jnp.take_along_axis(logits, at[:, :, None], axis=1)
  return jax.nn.log_softmax(picked.astype(jnp.float32), axis=-1)


def token_log_probs(log_probs: jax.Array, tokens: jax.Array) -> jax.Array:
  """(B, N) log-probs of `tokens` (B, N) under log-distributions (B, N, vocab)."""
  return jnp.take_along_axis(log_probs, tokens[:, :, None], axis=-1)[:, :, 0]


def reinforce_loss(logp: jax.Array, mask: jax.Array, advantages: jax.Array) -> jax.Array:
  """-(1/B) sum_i A_i sum_t m_it logp_it: minus the REINFORCE objective (advantages are data)."""
  advantages = jax.lax.stop_gradient(advantages)
  return -jnp.mean(advantages * jnp.sum(logp * mask, axis=1))


def ppo_clip_loss(logp: jax.Array, old_logp: jax.Array, mask: jax.Array, advantages: jax.Array,
                  clip_eps: float) -> tuple[jax.Array, jax.Array]:
  """PPO's clipped surrogate, token-level and masked-mean: (loss, fraction of tokens clipped)."""
  advantages = jax.lax.stop_gradient(advantages)[:, None]
  ratio = jnp.exp(logp - jax.lax.stop_gradient(old_logp))
  clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  surrogate = jnp.minimum(ratio * advantages, clipped * advantages)
  count = jnp.maximum(jnp.sum(mask), 1.0)
  clip_fraction = jnp.sum((jnp.abs(ratio - 1.0) > clip_eps) * mask) / count
  return -jnp.sum(surrogate * mask) / count, clip_fraction


def kl_to_reference(log_probs: jax.Array, ref_log_probs: jax.Array, mask: jax.Array) -> jax.Array:
  """Masked mean over completion positions of KL(pi || pi_ref), exact over the vocabulary."""
  kl = jnp.sum(jnp.exp(log_probs) * (log_probs - jax.lax.stop_gradient(ref_log_probs)), axis=-1)
  return jnp.sum(kl * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def advantages_and_baseline(rewards: np.ndarray, kind: str, decay: float,
                            baseline: Optional[float]) -> tuple[np.ndarray, float]:
  """(A = r - b, the baseline carried to the next batch); see the module docstring.

  Args:
    rewards: (B,) rewards of this batch.
    kind: one of `BASELINES`.
    decay: the EMA decay d ("ema" only).
    baseline: the EMA carried from the previous batch; None before the first batch.
  """
  mean = float(np.mean(rewards))
  if kind == "mean":
    b, carried = mean, mean
  elif kind == "ema":
    b = mean if baseline is None else baseline
    carried = decay * b + (1.0 - decay) * mean
  else:
    b, carried = 0.0, 0.0
  return (rewards - b).astype(np.float32), carried


@dataclasses.dataclass(frozen=True)
class PolicyGradientLoss:
  """The task loss `(params, batch, rng) -> (loss, metrics)` of one rollout batch for
  `steps.make_train_step`. The batch holds `prompt_ids`, `prompt_mask` (B, T), `completion_ids`,
  `mask`, `old_logp` (B, N), `ref_log_probs` (B, N, vocab) and `advantages` (B,)."""
  cfg: llama.LlamaConfig
  objective: str = "ppo"
  clip_eps: float = 0.2
  kl_coef: float = 0.0

  def __call__(self, params, batch, rng=None):
    del rng
    log_probs = completion_log_probs(params, self.cfg, batch["prompt_ids"], batch["prompt_mask"],
                                     batch["completion_ids"], batch["mask"])
    logp = token_log_probs(log_probs, batch["completion_ids"])
    mask = batch["mask"]
    if self.objective == "reinforce":
      pg_loss, clip_fraction = reinforce_loss(logp, mask, batch["advantages"]), jnp.zeros(())
    else:
      pg_loss, clip_fraction = ppo_clip_loss(logp, batch["old_logp"], mask, batch["advantages"],
                                             self.clip_eps)
    kl = kl_to_reference(log_probs, batch["ref_log_probs"], mask)
    return pg_loss + self.kl_coef * kl, {"pg_loss": pg_loss, "kl": kl,
                                         "clip_fraction": clip_fraction}


def _check_choice(field: str, value: Any, valid: Sequence[str]) -> None:
  if value not in valid:
    raise ValueError(f"PolicyGradient: {field}={value!r} is not valid; valid: {list(valid)}")


class PolicyGradient:
  """Policy-gradient fine-tuning of `adapter` on a frozen Llama base (see the module docstring).

  The train state is `steps.init_train_state`'s dict plus `reference` (the adapter's initial
  trainable tree, the KL reference) and `baseline` (the EMA baseline; None before the first
  batch). Only the adapter (and `head`, if given) trains; the base is never modified.

  Args:
    adapter: any adapter (e.g. `registry.make_adapter(...)`).
    cfg: the decoder's config.
    optimizer: optax optimizer of the trainable tree `{"adapter": ..., "head": ...}`.
    rewards: `rewards(prompts, completions) -> (B,)`; see the module docstring.
    objective: "ppo" (clipped surrogate) or "reinforce".
    baseline: "mean", "ema" or "none".
    baseline_decay: the EMA decay, in [0, 1).
    clip_eps: PPO's clip range, > 0.
    kl_coef: weight of the KL to the reference, >= 0.
    epochs: optimizer steps per rollout batch, >= 1 (PPO reuses the rollout; REINFORCE's
      gradient is on-policy only at the first).
    max_new_tokens: completion length N (fixed: every batch compiles to the same shapes).
    temperature: sampling temperature, > 0.
    stop_tokens: ids that end a completion (included in it).
    pad_id: the id after a completion's end.

  Raises:
    ValueError: an unknown objective or baseline, or an out-of-range number (named).
  """

  def __init__(self, adapter: base_lib.Adapter, cfg: llama.LlamaConfig,
               optimizer: optax.GradientTransformation, rewards: RewardFn, *,
               objective: str = "ppo", baseline: str = "mean", baseline_decay: float = 0.9,
               clip_eps: float = 0.2, kl_coef: float = 0.0, epochs: int = 1,
               max_new_tokens: int = 8, temperature: float = 1.0,
               stop_tokens: Sequence[int] = (), pad_id: int = 0):
    _check_choice("objective", objective, OBJECTIVES)
    _check_choice("baseline", baseline, BASELINES)
    for field, value, ok, valid in (
        ("baseline_decay", baseline_decay, 0 <= baseline_decay < 1, "[0, 1)"),
        ("clip_eps", clip_eps, clip_eps > 0, "> 0"), ("kl_coef", kl_coef, kl_coef >= 0, ">= 0"),
        ("epochs", epochs, isinstance(epochs, int) and epochs >= 1, "an integer >= 1"),
        ("max_new_tokens", max_new_tokens, isinstance(max_new_tokens, int) and max_new_tokens >= 1,
         "an integer >= 1"),
        ("temperature", temperature, temperature > 0, "> 0 (sampling)")):
      if not ok:
        raise ValueError(f"PolicyGradient: {field} must be {valid}, got {value!r}")
    if not callable(rewards):
      raise TypeError(f"PolicyGradient: rewards must be callable (prompts, completions) -> (B,), "
                      f"got {type(rewards).__name__}")
    self.adapter, self.cfg, self.rewards = adapter, cfg, rewards
    self.baseline, self.baseline_decay, self.epochs = baseline, baseline_decay, epochs
    self.max_new_tokens, self.temperature = max_new_tokens, temperature
    self.stop_tokens, self.pad_id = tuple(stop_tokens), pad_id
    self.loss = PolicyGradientLoss(cfg, objective, clip_eps, kl_coef)
    self.optimizer = optimizer
    self._train_step = steps.make_train_step(adapter, self.loss, optimizer)
    self._score = jax.jit(self._score_fn)

  def init(self, adapter_state: base_lib.AdapterState, key: jax.Array, *,
           head: Optional[PyTree] = None,
           reference: Optional[base_lib.AdapterState] = None) -> dict:
    """The state at step 0. `key` drives sampling.

    Args:
      adapter_state: the adapter's state to start from.
      key: the loop key.
      head: params trained fully (see `steps.init_train_state`); None: none.
      reference: the adapter state of the KL reference (its trainable tree is kept; the frozen
        buffers are `adapter_state`'s); None: `adapter_state` itself. Pass `adapter.init`'s
        fresh state to penalize the distance to the un-adapted model when starting from a tuned
        adapter (e.g. after SFT).
    """
    state = steps.init_train_state(adapter_state, self.optimizer, head=head, rng=key)
    reference = adapter_state if reference is None else reference
    if jax.tree.structure(reference.trainable) != jax.tree.structure(adapter_state.trainable):
      raise ValueError("PolicyGradient.init: reference must have the adapter state's tree "
                       "structure (a state of the same adapter)")
    state["reference"] = jax.tree.map(jnp.copy, reference.trainable)
    state["baseline"] = None
    return state

  def policy_params(self, state: dict, base: PyTree) -> PyTree:
    """The adapted params of the current policy (structured kernels)."""
    return steps.adapted_params(self.adapter, base, steps.adapter_state(state), state["head"])

  def _score_fn(self, state, base, prompt_ids, prompt_mask, completion_ids, mask):
    policy = completion_log_probs(self.policy_params(state, base), self.cfg, prompt_ids,
                                  prompt_mask, completion_ids, mask)
    reference = self.adapter.apply(base, base_lib.AdapterState(state["reference"],
                                                               state["frozen"]))
    ref_log_probs = completion_log_probs(reference, self.cfg, prompt_ids, prompt_mask,
                                         completion_ids, mask)
    return token_log_probs(policy, completion_ids), ref_log_probs

  def sample(self, state: dict, base: PyTree, prompt_ids, prompt_mask=None, *,
             key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(completion ids (B, N), lengths (B,)) sampled from the current policy."""
    return generate_lib.generate(
        self.policy_params(state, base), self.cfg, prompt_ids, self.max_new_tokens,
        temperature=self.temperature, key=key, stop_tokens=self.stop_tokens, pad_id=self.pad_id,
        prompt_mask=prompt_mask)

  def step(self, state: dict, base: PyTree, prompt_ids, prompt_mask=None,
           prompts: Any = None) -> tuple[dict, dict]:
    """One rollout, its rewards and `epochs` updates. Returns (new state, metrics).

    The state is donated (do not reuse the one passed). `prompts` is handed to the reward
    function (default: the rows of `prompt_ids` as lists); metrics hold the batch's mean `reward`,
    the `baseline` used, the last update's `loss`, `pg_loss`, `kl`, `clip_fraction`, ... as
    floats.
    """
    prompt_ids = np.asarray(prompt_ids, np.int32)
    prompt_mask = (np.ones_like(prompt_ids) if prompt_mask is None
                   else np.asarray(prompt_mask, np.int32))
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    ids, lengths = self.sample(state, base, prompt_ids, prompt_mask, key=key)
    mask = completion_mask(lengths, self.max_new_tokens)
    old_logp, ref_log_probs = self._score(state, base, prompt_ids, prompt_mask, ids, mask)
    ids_np, lengths_np = np.asarray(ids), np.asarray(lengths)
    completions = [ids_np[i, :lengths_np[i]].tolist() for i in range(len(ids_np))]
    prompts = [row.tolist() for row in prompt_ids] if prompts is None else prompts
    rewards = np.asarray(self.rewards(prompts, completions), np.float32)
    if rewards.shape != (len(completions),):
      raise ValueError(f"PolicyGradient: rewards returned shape {rewards.shape}, expected "
                       f"({len(completions)},): one reward per completion")
    advantages, baseline = advantages_and_baseline(rewards, self.baseline, self.baseline_decay,
                                                   state["baseline"])
    batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": ids,
             "mask": mask, "old_logp": old_logp, "ref_log_probs": ref_log_probs,
             "advantages": advantages}
    extra = {"reference": state.pop("reference")}
    state.pop("baseline")
    for _ in range(self.epochs):
      state, metrics = self._train_step(state, base, batch)
    state.update(extra, baseline=baseline)
    out = {k: float(v) for k, v in metrics.items()}
    out.update(reward=float(rewards.mean()), baseline=float(rewards.mean() - advantages.mean()),
               advantage_std=float(advantages.std()),
               completion_tokens=float(lengths_np.mean()))
    return state, out
