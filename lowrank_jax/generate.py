"""Autoregressive generation from the Llama decoder with a KV cache.

One jitted call per batch: a prefill pass over the prompts fills the cache, then a
`jax.lax.while_loop` decodes one token per step (greedy or sampled) until every row has emitted a
stop token or `max_new_tokens` tokens. The loop bound, temperature, top-k, top-p, pad id and the
stop tokens are traced, so the compiled program is reused for every call with the same batch
size, prompt length, cache length (`max_len`) and params structure;
pad prompts to one length (with `prompt_mask`) to reuse it across prompt lengths. Params may hold
structured (adapted) weights, which run factored, or dense ones.

>>> import jax, jax.numpy as jnp
>>> from lowrank_jax.models import llama
>>> cfg = llama.LlamaConfig.preset("tiny")
>>> params = llama.init(jax.random.key(0), cfg)
>>> ids, lengths = generate(params, cfg, jnp.array([[5, 6, 7]]), 4)
>>> ids.shape, lengths.tolist()
((1, 4), [4])
"""
from __future__ import annotations

import math
from typing import Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax import multi
from lowrank_jax.models import llama


def filter_logits(logits: jax.Array, temperature, top_k=None, top_p=None) -> jax.Array:
  """Sampling logits: `logits / temperature`, with the tokens outside the top-k and the top-p
  nucleus set to -inf.

  Top-k keeps the `top_k` largest logits; top-p then keeps, of those, the smallest set of most
  likely tokens whose probability (renormalised over the top-k) reaches `top_p`: a token is kept
  iff the mass of the tokens ranked before it is below `top_p`. Tokens tied with the last kept one
  are kept too. `top_k` and `top_p` may be traced.

  Args:
    logits: (..., vocab).
    temperature: > 0.
    top_k: None (all tokens) or an integer in [1, vocab].
    top_p: None (no nucleus) or a number in (0, 1].
  """
  vocab = logits.shape[-1]
  scaled = logits.astype(jnp.float32) / temperature
  descending = -jnp.sort(-scaled, axis=-1)
  kept = jnp.broadcast_to(jnp.arange(vocab) < (vocab if top_k is None else top_k), scaled.shape)
  if top_p is not None:
    probs = jax.nn.softmax(jnp.where(kept, descending, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = kept & ((mass_before < top_p) | (top_p >= 1.0))
  num_kept = jnp.sum(kept, axis=-1, keepdims=True)
  threshold = jnp.take_along_axis(descending, num_kept - 1, axis=-1)
  return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def _next_token(logits, key, temperature, top_k, top_p):
  """Greedy (argmax) when temperature is 0, else a sample of `filter_logits`. (B, V) -> (B,)."""
  return jax.lax.cond(
      temperature > 0,
      lambda: jax.random.categorical(key, filter_logits(logits, temperature, top_k, top_p)),
      lambda: jnp.argmax(logits, axis=-1)).astype(jnp.int32)


class _Loop(NamedTuple):
  step: jax.Array       # () tokens emitted so far
  tokens: jax.Array     # (B, max_len - T) generated ids, pad after each row's end
  lengths: jax.Array    # (B,) tokens generated per row, its stop token included
  done: jax.Array       # (B,) the row has emitted a stop token
  last: jax.Array       # (B,) the token emitted at this step
  positions: jax.Array  # (B,) the RoPE position of the next token fed
  cache: dict


def _generate(params, prompt_ids, prompt_mask, key, max_new_tokens, temperature, top_k, top_p,
              is_stop, pad_id, *, cfg, max_len, cache_dtype):
  b, t = prompt_ids.shape

  def emit(s: _Loop, logits) -> _Loop:
    token = _next_token(logits.astype(jnp.float32), jax.random.fold_in(key, s.step), temperature,
                        top_k, top_p)
    token = jnp.where(s.done, pad_id, token)
    return s._replace(step=s.step + 1, tokens=s.tokens.at[:, s.step].set(token),
                      lengths=s.lengths + (~s.done).astype(jnp.int32),
                      done=s.done | is_stop[token], last=token)

  def decode(s: _Loop) -> _Loop:
    logits, cache = llama.apply(params, s.last[:, None], cfg, positions=s.positions[:, None],
                                cache=s.cache)
    return emit(s._replace(positions=s.positions + 1, cache=cache), logits[:, 0])

  logits, cache = llama.apply(params, prompt_ids, cfg,
                              positions=jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0),
                              segment_ids=prompt_mask,
                              cache=llama.init_cache(cfg, b, max_len, cache_dtype))
  last_real = t - 1 - jnp.argmax(prompt_mask[:, ::-1], axis=1)
  start = _Loop(step=jnp.zeros((), jnp.int32),
                tokens=jnp.full((b, max_len - t), pad_id, jnp.int32),
                lengths=jnp.zeros((b,), jnp.int32), done=jnp.zeros((b,), bool),
                last=jnp.zeros((b,), jnp.int32), positions=prompt_mask.sum(axis=1), cache=cache)
  s = emit(start, logits[jnp.arange(b), last_real])
  s = jax.lax.while_loop(lambda s: (s.step < max_new_tokens) & ~jnp.all(s.done), decode, s)
  return s.tokens, s.lengths


_generate_jit = jax.jit(_generate, static_argnames=("cfg", "max_len", "cache_dtype"))


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_token_ids(field: str, ids: np.ndarray, vocab: int) -> None:
  if ids.size and (ids.min() < 0 or ids.max() >= vocab):
    raise ValueError(f"generate: {field} must lie in [0, vocab_size={vocab}), got values in "
                     f"[{ids.min()}, {ids.max()}]")


def _check_prompt(prompt_ids, prompt_mask, vocab: int) -> tuple[np.ndarray, np.ndarray]:
  ids = np.asarray(prompt_ids)
  if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or 0 in ids.shape:
    raise ValueError(f"generate: prompt_ids must be a non-empty integer (batch, length) array, got "
                     f"{ids.dtype} {ids.shape}")
  _check_token_ids("prompt_ids", ids, vocab)
  mask = np.ones(ids.shape, np.int32) if prompt_mask is None else np.asarray(prompt_mask)
  if mask.shape != ids.shape or not np.isin(mask, (0, 1)).all():
    raise ValueError(f"generate: prompt_mask must be a {{0,1}} array of prompt_ids' shape "
                     f"{ids.shape}, got {mask.dtype} {mask.shape}")
  if not mask.any(axis=1).all():
    raise ValueError(f"generate: prompt rows {np.flatnonzero(~mask.any(axis=1)).tolist()} have no "
                     f"token (prompt_mask all 0)")
  return ids.astype(np.int32), mask.astype(np.int32)


def _check_sampling(temperature, top_k, top_p, key, vocab: int) -> None:
  if not isinstance(temperature, (int, float, np.number)) or isinstance(temperature, bool) \
      or not math.isfinite(temperature) or temperature < 0:
    raise ValueError(f"generate: temperature must be a finite number >= 0 (0: greedy), got "
                     f"{temperature!r}")
  if top_k is not None and (not _is_int(top_k) or not 1 <= top_k <= vocab):
    raise ValueError(f"generate: top_k must be None or an integer in [1, vocab_size={vocab}], got "
                     f"{top_k!r}")
  if top_p is not None and (not isinstance(top_p, (int, float, np.number)) or not 0 < top_p <= 1):
    raise ValueError(f"generate: top_p must be None or a number in (0, 1], got {top_p!r}")
  if temperature > 0 and key is None:
    raise ValueError(f"generate: sampling (temperature={temperature}) needs a PRNG key; pass key= "
                     f"or temperature=0 for greedy decoding")


def generate(params: dict, cfg: llama.LlamaConfig, prompt_ids, max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             key: jax.Array | None = None, stop_tokens: Iterable[int] = (), pad_id: int = 0,
             prompt_mask=None, max_len: int | None = None,
             cache_dtype=None, adapter_index=None) -> tuple[jax.Array, jax.Array]:
  """Continues each prompt by up to `max_new_tokens` tokens, sampling from `llama.apply`.

  Greedy (argmax) when `temperature` is 0, else sampled from softmax(logits / temperature)
  restricted to the top-k / top-p tokens (`filter_logits`; ignored when greedy). A row ends after
  it emits one of `stop_tokens` (the stop token is part of its output); it then emits `pad_id`.
  Call it outside `jax.jit` (inputs are checked eagerly); the work runs in one compiled program.

  Args:
    params: Llama params; kernels may be structured weights (e.g. `lj.lora(...).apply(...)`).
    cfg: the model config.
    prompt_ids: int (B, T) prompts; rows of different lengths are padded (left or right) to T.
    max_new_tokens: tokens to generate per row, >= 1.
    temperature: 0 (greedy) or the softmax temperature (> 0).
    top_k: keep only the k most likely tokens when sampling (None: all).
    top_p: keep only the smallest set of most likely tokens of mass >= top_p when sampling.
    key: PRNG key; required when sampling.
    stop_tokens: token ids that end a row.
    pad_id: the id emitted by rows that have ended.
    prompt_mask: {0,1} (B, T), 1 on prompt tokens, 0 on padding; default all ones.
    max_len: the cache length: the longest prompt + generated sequence; default
      T + max_new_tokens.
    cache_dtype: dtype of the cached keys/values; default the embedding table's dtype.
    adapter_index: int (B,) adapter of each prompt (-1: none) when `params` hold a stack of
      per-example adapters (`lowrank_jax.multi.apply`): one call generates with a different
      adapter per prompt.

  Returns:
    (ids, lengths): int32 (B, max_new_tokens) generated ids, `pad_id` after each row's end, and
    int32 (B,) the number of tokens each row generated (its stop token included).

  Raises:
    ValueError: malformed prompts or mask, token ids outside the vocabulary, max_new_tokens < 1, a
      prompt longer than the cache (`max_len`) or prompt + max_new_tokens beyond it, a bad
      temperature/top_k/top_p, no key when sampling, or a bad `adapter_index`.
  """
  vocab = cfg.vocab_size
  ids, mask = _check_prompt(prompt_ids, prompt_mask, vocab)
  t = ids.shape[1]
  if not _is_int(max_new_tokens) or max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
  max_len = t + max_new_tokens if max_len is None else max_len
  if not _is_int(max_len):
    raise ValueError(f"generate: max_len must be an integer, got {max_len!r}")
  if t > max_len:
    raise ValueError(f"generate: the prompt ({t} tokens) is longer than the cache "
                     f"(max_len={max_len})")
  if t + max_new_tokens > max_len:
    raise ValueError(f"generate: prompt length {t} + max_new_tokens {max_new_tokens} exceeds the "
                     f"cache (max_len={max_len}); raise max_len or lower max_new_tokens")
  _check_sampling(temperature, top_k, top_p, key, vocab)
  stops = np.asarray(list(stop_tokens), np.int64).reshape(-1)
  _check_token_ids("stop_tokens", stops, vocab)
  is_stop = np.zeros(vocab, bool)
  is_stop[stops] = True
  if not _is_int(pad_id):
    raise ValueError(f"generate: pad_id must be an integer, got {pad_id!r}")
  _check_token_ids("pad_id", np.asarray([pad_id]), vocab)
  if key is None:
    key = jax.random.key(0)     # unused: greedy decoding draws nothing
  elif not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)
  if adapter_index is not None:
    if np.shape(adapter_index) != (ids.shape[0],):
      raise ValueError(f"generate: adapter_index must have one entry per prompt, shape "
                       f"{(ids.shape[0],)}, got {np.shape(adapter_index)}")
    params = multi.with_index(params, adapter_index)
  if cache_dtype is None:
    cache_dtype = params["embed"]["embedding"].dtype
  tokens, lengths = _generate_jit(
      params, jnp.asarray(ids), jnp.asarray(mask), key, jnp.int32(max_new_tokens),
      jnp.float32(temperature), jnp.int32(vocab if top_k is None else top_k),
      jnp.float32(1.0 if top_p is None else top_p), jnp.asarray(is_stop),
      jnp.int32(pad_id), cfg=cfg, max_len=max_len, cache_dtype=jnp.dtype(cache_dtype))
  return tokens[:, :max_new_tokens], lengths
