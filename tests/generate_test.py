"""`generate`: cached greedy decoding against a naive loop that re-runs the uncached forward on the
growing sequence (dense, factored LoRA and merged params; left- and right-padded prompts), top-k /
top-p sampling against a float64 numpy computation of the allowed tokens, stop tokens, input
errors raised before any work, and one compilation per shape."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax import generate as gen
from lowrank_jax.models import llama
from tests.models.llama_cache_test import lora_params, sharp_params

pytestmark = pytest.mark.usefixtures("fast_compile")

CFG = llama.LlamaConfig.preset("tiny")
REF_LEN = 16   # the naive reference runs one row right-padded to this length
MAX_LEN = 13   # one cache length for the (3, 5) prompts: one compiled `generate`
_apply = jax.jit(llama.apply, static_argnums=2)

# Three prompts of lengths 5, 3 and 4 in one (3, 5) batch: row 1 left-padded, row 2 right-padded.
PROMPTS = [[11, 42, 7, 99, 3], [250, 18, 64], [5, 6, 120, 33]]
PROMPT_IDS = np.array([[11, 42, 7, 99, 3], [0, 0, 250, 18, 64], [5, 6, 120, 33, 0]])
PROMPT_MASK = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])


def _last_logits(params, seq):
  """Uncached logits after `seq` (one row, no cache): the row is right-padded to REF_LEN, which
  the causal mask keeps away from the tokens before."""
  buf = np.zeros((1, REF_LEN), np.int32)
  buf[0, :len(seq)] = seq
  return np.asarray(_apply(params, jnp.asarray(buf), CFG)[0, len(seq) - 1], np.float64)


def _naive_greedy(params, prompt, n):
  seq = list(prompt)
  for _ in range(n):
    seq.append(int(np.argmax(_last_logits(params, seq))))
  return seq[len(prompt):]


@pytest.mark.parametrize("kind", ["dense", "lora", "merged"])
def test_greedy_matches_naive_uncached_loop(kind):
  params = sharp_params()
  if kind != "dense":
    params = lora_params(params)
  if kind == "merged":
    params = lj.merge(params)
  n = 6
  ids, lengths = gen.generate(params, CFG, PROMPT_IDS, n, prompt_mask=PROMPT_MASK,
                              max_len=MAX_LEN)
  assert ids.shape == (3, n) and ids.dtype == jnp.int32
  np.testing.assert_array_equal(lengths, [n, n, n])
  want = [_naive_greedy(params, p, n) for p in PROMPTS]
  np.testing.assert_array_equal(ids, want)
  if kind == "lora":   # the adapter changes what is generated
    dense = gen.generate(sharp_params(), CFG, PROMPT_IDS, n, prompt_mask=PROMPT_MASK,
                         max_len=MAX_LEN)[0]
    assert (np.asarray(dense) != np.asarray(ids)).any()


def _np_allowed(logits, temperature, top_k, top_p) -> set[int]:
  """Float64 numpy: the top_k most likely tokens of softmax(logits / temperature), then the
  shortest prefix of them (by probability, renormalised) whose mass reaches top_p."""
  z = logits / temperature
  order = np.argsort(-z, kind="stable")[:top_k or len(z)]
  p = np.exp(z[order] - z[order].max())
  p /= p.sum()
  if top_p is not None:
    order = order[np.cumsum(p) - p < top_p]
  return set(order.tolist())


@pytest.mark.parametrize("top_k,top_p", [(6, None), (None, 0.7), (6, 0.8)])
def test_filter_logits_keeps_exactly_the_allowed_set(top_k, top_p):
  logits = 3 * jax.random.normal(jax.random.key(0), (64, CFG.vocab_size))
  out = np.asarray(jax.jit(gen.filter_logits)(logits, 0.7, top_k, top_p))
  z = np.asarray(logits, np.float64)
  sizes = []
  for row, kept in zip(z, out):
    allowed = _np_allowed(row, 0.7, top_k, top_p)
    assert set(np.flatnonzero(np.isfinite(kept)).tolist()) == allowed
    np.testing.assert_allclose(kept[sorted(allowed)], row[sorted(allowed)] / 0.7, rtol=1e-6)
    sizes.append(len(allowed))
  assert min(sizes) < max(sizes) or top_p is None   # the nucleus size follows the logits


@pytest.mark.parametrize("top_k,top_p", [(6, None), (None, 0.7), (6, 0.8)])
def test_sampling_never_leaves_the_allowed_set(top_k, top_p):
  params = sharp_params()
  n, temperature = 5, 0.8
  prompts = np.array([PROMPTS[0]] * 2 + [[9, 8, 7, 6, 5]])
  ids, lengths = gen.generate(params, CFG, prompts, n, temperature=temperature, top_k=top_k,
                              top_p=top_p, key=jax.random.key(7), max_len=MAX_LEN)
  ids = np.asarray(ids)
  np.testing.assert_array_equal(lengths, [n] * len(prompts))
  sizes = []
  for prompt, row in zip(prompts, ids):
    for j in range(n):
      allowed = _np_allowed(_last_logits(params, list(prompt) + list(row[:j])), temperature,
                            top_k, top_p)
      assert row[j] in allowed, (row, j, allowed)
      sizes.append(len(allowed))
  assert 1 < max(sizes) < CFG.vocab_size   # the constraint binds and still leaves a choice
  again = gen.generate(params, CFG, prompts, n, temperature=temperature, top_k=top_k, top_p=top_p,
                       key=jax.random.key(8), max_len=MAX_LEN)[0]
  assert (np.asarray(again) != ids).any()   # another key, other samples


def test_top_k_one_sampling_is_greedy():
  params = sharp_params()
  greedy = gen.generate(params, CFG, PROMPT_IDS, 5, prompt_mask=PROMPT_MASK, max_len=MAX_LEN)
  sampled = gen.generate(params, CFG, PROMPT_IDS, 5, prompt_mask=PROMPT_MASK, temperature=1.3,
                         top_k=1, key=jax.random.key(3), max_len=MAX_LEN)
  jax.tree.map(np.testing.assert_array_equal, sampled, greedy)


def test_stop_tokens_end_each_row():
  params = sharp_params()
  n, pad = 8, 7
  run = lambda **kw: gen.generate(params, CFG, PROMPT_IDS, n, prompt_mask=PROMPT_MASK,
                                  max_len=MAX_LEN, **kw)
  free = np.asarray(run()[0])
  stops = (int(free[0, 2]), int(free[1, 4]))
  ids, lengths = run(stop_tokens=stops, pad_id=pad)
  want_ids, want_len = np.full_like(free, pad), []
  for r, row in enumerate(free):
    hits = np.flatnonzero(np.isin(row, stops))
    length = hits[0] + 1 if hits.size else n   # the stop token is part of the output
    want_ids[r, :length] = row[:length]
    want_len.append(length)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(lengths, want_len)
  assert want_len[0] == 3 and min(want_len) < n
  # Every row stopping early ends the loop early; the output keeps its shape.
  ids, lengths = run(stop_tokens=free[:, 0].tolist(), pad_id=pad)
  np.testing.assert_array_equal(lengths, [1, 1, 1])
  np.testing.assert_array_equal(ids[:, 1:], np.full((3, n - 1), pad))


class _CountingApply:
  """Stands in for `llama.apply` and counts the calls (made only while tracing `generate`)."""

  def __init__(self, apply):
    self.apply, self.calls = apply, 0

  def __call__(self, *args, **kwargs):
    self.calls += 1
    return self.apply(*args, **kwargs)


@pytest.fixture
def counting_apply(monkeypatch):
  counter = _CountingApply(llama.apply)
  monkeypatch.setattr(llama, "apply", counter)
  return counter


def test_compiled_once_per_shape(counting_apply):
  params = sharp_params()
  prompts = jax.random.randint(jax.random.key(0), (5, 4), 1, CFG.vocab_size)   # shapes of its own
  gen.generate(params, CFG, prompts, 3, max_len=12, stop_tokens=(9,))
  traced = counting_apply.calls
  assert traced > 0
  # Other lengths, prompts, mask, sampling settings, stop tokens, pad id and a raw uint32 key.
  mask = np.ones((5, 4), np.int32)
  mask[1, :2] = 0
  gen.generate(params, CFG, prompts[::-1], 8, max_len=12, temperature=0.9, top_k=5, top_p=0.9,
               key=jax.random.PRNGKey(1), stop_tokens=(11, 12), pad_id=3, prompt_mask=mask)
  gen.generate(params, CFG, prompts, 1, max_len=12, temperature=2.0, key=jax.random.key(2))
  assert counting_apply.calls == traced
  gen.generate(params, CFG, prompts, 3, max_len=13, stop_tokens=(9,))   # a new cache length
  assert counting_apply.calls > traced


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_len=4), r"prompt \(5 tokens\) is longer than the cache \(max_len=4\)"),
    (dict(max_len=7), r"prompt length 5 \+ max_new_tokens 3 exceeds the cache \(max_len=7\)"),
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(max_new_tokens=2.0), "max_new_tokens must be an integer >= 1"),
    (dict(temperature=-0.5, key=jax.random.key(0)), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(temperature=True, key=jax.random.key(0)), "temperature must be a finite number >= 0"),
    (dict(temperature=1.0, top_k=0, key=jax.random.key(0)), "top_k must be None or an integer"),
    (dict(temperature=1.0, top_k=257, key=jax.random.key(0)), r"top_k .* \[1, vocab_size=256\]"),
    (dict(temperature=1.0, top_p=0.0, key=jax.random.key(0)), r"top_p .* \(0, 1\]"),
    (dict(temperature=1.0, top_p=1.5, key=jax.random.key(0)), r"top_p .* \(0, 1\]"),
    (dict(temperature=0.7), "sampling .* needs a PRNG key"),
    (dict(prompt_mask=np.ones((3, 4))), r"prompt_mask must be a \{0,1\} array"),
    (dict(prompt_mask=np.array([[1] * 5, [0] * 5, [1] * 5])), r"prompt rows \[1\] have no token"),
    (dict(prompt_ids=PROMPT_IDS + 200), r"prompt_ids must lie in \[0, vocab_size=256\)"),
    (dict(prompt_ids=PROMPT_IDS[0]), "prompt_ids must be a non-empty integer"),
    (dict(stop_tokens=(3, 300)), r"stop_tokens must lie in \[0, vocab_size=256\)"),
    (dict(pad_id=-1), r"pad_id must lie in \[0, vocab_size=256\)"),
])
def test_bad_input_raises_before_any_work(counting_apply, kwargs, match):
  args = dict(prompt_ids=PROMPT_IDS, max_new_tokens=3)
  args.update(kwargs)
  params = llama.init(jax.random.key(0), CFG)
  with pytest.raises(ValueError, match=match):
    gen.generate(params, CFG, args.pop("prompt_ids"), args.pop("max_new_tokens"), **args)
  assert counting_apply.calls == 0
