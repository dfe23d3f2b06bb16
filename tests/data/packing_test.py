"""Packing of tokenized examples: layout, the response-only loss mask, and packed loss == the
loss of the same examples run one by one (float64 numpy cross-entropy per example)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax import data
from lowrank_jax import tasks
from lowrank_jax import tokenizer as tok_lib
from lowrank_jax.models import llama

SEQ_LEN = 16
LENGTHS = (5, 9, 3, 12, 7, 4, 16, 2)


def _examples(seed=0):
  """Tokenized examples (random ids, a prompt of random length, masks as `lm_transform` makes)."""
  rng = np.random.default_rng(seed)
  out = []
  for n in LENGTHS:
    ids = rng.integers(3, 256, n).astype(np.int32)
    prompt = int(rng.integers(1, n)) if n > 1 else 1
    mask = np.zeros(n, np.float32)
    mask[prompt - 1:n - 1] = 1.0     # position t predicts token t + 1, a response token
    out.append({"input_ids": ids, "loss_mask": mask})
  return out


def _log_softmax64(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_rows_hold_every_example_whole():
  exs = _examples()
  rows = list(data.pack_rows(exs, SEQ_LEN))
  seen = []
  for r in rows:
    assert sorted(r) == sorted(data.PACKED_KEYS)
    seg, pos = r["segment_ids"], r["positions"]
    for s in range(1, seg.max() + 1):
      idx = np.flatnonzero(seg == s)
      np.testing.assert_array_equal(idx, np.arange(idx[0], idx[0] + len(idx)))   # contiguous
      np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))             # restart at 0
      seen.append((tuple(r["input_ids"][idx]), tuple(r["loss_mask"][idx])))
      assert r["loss_mask"][idx[-1]] == 0.0      # no target crosses examples
    assert np.all(r["loss_mask"][seg == 0] == 0)
    assert np.all(r["input_ids"][seg == 0] == 0)
  want = sorted((tuple(e["input_ids"]), tuple(e["loss_mask"])) for e in exs)
  assert sorted(seen) == want
  assert len(rows) < len(exs)                      # several examples share rows


def test_packed_loss_equals_examples_run_one_by_one():
  cfg = llama.LlamaConfig()
  params = llama.init(jax.random.key(1), cfg)
  exs = _examples(3)
  batch = data.packed_batches(data.pack_rows(exs, SEQ_LEN), 8, SEQ_LEN)
  assert len(batch) == 1
  task = tasks.get_task("causal_lm")
  logits = llama.causal_lm_logits(params, cfg, jax.tree.map(jnp.asarray, batch[0]))
  loss, aux = task.loss(logits, batch[0])
  ce_sum, count, correct = 0.0, 0.0, 0.0
  for e in exs:   # each example alone: no packing, default positions, one segment
    z = np.asarray(llama.apply(params, jnp.asarray(e["input_ids"][None]), cfg))[0]
    logp = _log_softmax64(z)[:-1]
    targets = e["input_ids"][1:]
    m = e["loss_mask"][:-1].astype(np.float64)
    ce_sum += float(np.sum(-logp[np.arange(len(targets)), targets] * m))
    correct += float(np.sum((z[:-1].argmax(-1) == targets) * m))
    count += float(m.sum())
  np.testing.assert_allclose(float(loss), ce_sum / count, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(float(aux["train_accuracy"]), correct / count, atol=1e-6)
  assert int(aux["tokens"]) == sum(LENGTHS)
  sums = task.eval_metrics(logits, batch[0])
  np.testing.assert_allclose(float(sums["loss"]), ce_sum, rtol=1e-6)
  assert float(sums["count"]) == count


def test_packed_pipeline_resumes_from_its_state():
  src = data.ArraySource({"n": np.arange(40)})
  transform = lambda e: {"input_ids": np.full(int(e["n"]) % 7 + 2, int(e["n"]), np.int32),
                         "loss_mask": np.ones(int(e["n"]) % 7 + 2, np.float32)}
  make = lambda: data.make_packed_pipeline(src, transform=transform, seq_len=SEQ_LEN,
                                           batch_size=3, seed=5, num_epochs=None,
                                           shard_index=0, shard_count=1)
  it = make()
  for _ in range(4):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(3)]
  it2 = make()
  it2.set_state(state)
  for w in want:
    got = next(it2)
    assert sorted(got) == sorted(data.PACKED_KEYS)
    for k in data.PACKED_KEYS:
      np.testing.assert_array_equal(got[k], w[k])


def test_padding_rows_fill_the_last_batch():
  batches = data.packed_batches(data.pack_rows(_examples(), SEQ_LEN), 4, SEQ_LEN)
  last = batches[-1]
  assert last["input_ids"].shape == (4, SEQ_LEN)
  assert np.all(last["loss_mask"][last["segment_ids"].max(1) == 0] == 0)


def test_lm_transform_trains_on_the_response_only():
  tok = tok_lib.train_bpe(["Define: dog", "a domestic animal", "a small cat"] * 10, 300)
  fmt = data.text_formatter("Define: {word}", "{gloss}", "Q: {prompt}\nA: ")
  fn = data.lm_transform(tok, fmt, 64)
  out = fn({"word": b"dog", "gloss": b"a domestic animal"})
  p = [tok_lib.special_id(tok, tok_lib.BOS)] + tok.encode("Q: Define: dog\nA: ").ids
  r = tok.encode("a domestic animal").ids + [tok_lib.special_id(tok, tok_lib.EOS)]
  np.testing.assert_array_equal(out["input_ids"], p + r)
  want = np.zeros(len(p) + len(r), np.float32)
  want[len(p) - 1:-1] = 1.0
  np.testing.assert_array_equal(out["loss_mask"], want)
  assert tok.decode(out["input_ids"][len(p):-1].tolist()) == "a domestic animal"


def test_format_errors_name_the_field():
  fmt = data.text_formatter("", "{lemma}: {gloss}", "", ("a", "b"))
  with pytest.raises(ValueError, match=r"fields: \['gloss', 'label', 'label_name'\]"):
    fmt({"gloss": b"x", "label": np.int64(1)})
  with pytest.raises(ValueError, match="has no '{prompt}' field"):
    data.text_formatter("Define: {word}", "{gloss}", "### Response:\n")

