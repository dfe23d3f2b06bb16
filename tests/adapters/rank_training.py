"""Training loop shared by the rank-changing adapter tests (AdaLoRA, IncreLoRA)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank_jax import testing
from lowrank_jax.adapters.increlora import rank_allocation


def train_tracking_ranks(adapter, steps, lr=1e-2, batch=None):
  """Trains on the tiny model with `adapter.update` each step (compiled once, state shapes fixed).

  Returns (base, initial state, final state, per-step rank allocations, per-step losses).
  """
  params = testing.tiny_params()
  batch = testing.tiny_batch() if batch is None else batch
  base, state = adapter.init(jax.random.key(0), params)
  step, opt = testing.make_step(adapter, optax.adam(lr))

  def train_step(state, opt_state, step_count):
    return step(base, state, opt_state, batch, step_count)

  chex.clear_trace_counter()
  jitted = jax.jit(chex.assert_max_traces(train_step, n=1))
  opt_state = opt.init(state.trainable)
  s0, s, history, losses = state, state, [], []
  for i in range(1, steps + 1):
    s, opt_state, loss = jitted(s, opt_state, jnp.asarray(i, jnp.int32))
    chex.assert_trees_all_equal_shapes_and_dtypes(s, s0)
    history.append(rank_allocation(s))
    losses.append(float(loss))
  assert np.isfinite(losses[-1])
  return base, s0, s, history, losses
