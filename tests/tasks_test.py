"""`tasks.Classification` against float64 numpy re-derivations."""
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax import tasks


def _log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


LOGITS = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0], [1.0, 1.0, 0.0], [0.0, -2.0, 4.0]])
LABELS = np.array([0, 1, 1, 2])


def test_loss_is_float32_mean_cross_entropy():
  task = tasks.get_task("classification")
  loss, aux = task.loss(jnp.asarray(LOGITS, jnp.bfloat16), {"label": jnp.asarray(LABELS)})
  assert loss.dtype == jnp.float32
  bf = np.asarray(jnp.asarray(LOGITS, jnp.bfloat16).astype(jnp.float32))
  want = -np.mean(_log_softmax(bf)[np.arange(4), LABELS])
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  np.testing.assert_allclose(aux["ce"], want, rtol=1e-6)
  # argmax: 0, 2, 0 (tie -> first), 2; correct: rows 0 and 3.
  assert float(aux["train_accuracy"]) == pytest.approx(0.5, abs=5e-8)


def test_eval_metrics_skip_the_padding():
  task = tasks.get_task("classification")
  mask = np.array([1.0, 1.0, 1.0, 0.0])
  out = task.eval_metrics(jnp.asarray(LOGITS, jnp.float32),
                          {"label": jnp.asarray(LABELS), "mask": jnp.asarray(mask)})
  ce = -_log_softmax(LOGITS)[np.arange(4), LABELS]
  assert float(out["correct"]) == 1.0
  assert float(out["count"]) == 3.0
  np.testing.assert_allclose(out["loss"], np.sum(ce[:3]), rtol=1e-6)
  totals = tasks.sum_metrics(tasks.sum_metrics({}, out), out)
  assert task.summarize(totals) == {"accuracy": 1.0 / 3.0, "eval_loss": totals["loss"] / 6.0}


def test_batch_spec():
  task = tasks.get_task("classification")
  assert task.train_keys == ("label",)
  assert task.eval_keys == ("label", "mask")
  with pytest.raises(ValueError, match=r"eval batch is missing \['mask'\]; it has "
                     r"\['image', 'label'\]"):
    tasks.check_batch({"image": 0, "label": 0}, task.eval_keys, "eval")


def test_unknown_task():
  with pytest.raises(
      ValueError, match=r"Unknown task 'lm'; valid names: \['causal_lm', 'classification'\]"):
    tasks.get_task("lm")


# Causal LM: next-token cross-entropy against a float64 loop over the masked positions.
_RNG = np.random.default_rng(0)
LM_LOGITS = _RNG.normal(size=(2, 5, 7)).astype(np.float32)
LM_IDS = _RNG.integers(0, 7, (2, 5)).astype(np.int32)
LM_MASK = np.array([[0, 1, 1, 0, 0], [1, 1, 1, 1, 0]], np.float32)
LM_BATCH = {"input_ids": LM_IDS, "loss_mask": LM_MASK,
            "segment_ids": np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], np.int32)}


def _lm_reference(logits):
  ce, correct, n = 0.0, 0.0, 0.0
  logp = _log_softmax(logits)
  for b in range(2):
    for t in range(4):                      # position t scores token t + 1
      if LM_MASK[b, t]:
        ce -= logp[b, t, LM_IDS[b, t + 1]]
        correct += float(np.argmax(logits[b, t]) == LM_IDS[b, t + 1])
        n += 1
  return ce, correct, n


def test_causal_lm_loss_and_metrics():
  task = tasks.get_task("causal_lm")
  loss, aux = task.loss(jnp.asarray(LM_LOGITS, jnp.bfloat16), LM_BATCH)
  assert loss.dtype == jnp.float32
  bf = np.asarray(jnp.asarray(LM_LOGITS, jnp.bfloat16).astype(jnp.float32))
  ce, correct, n = _lm_reference(bf)
  np.testing.assert_allclose(loss, ce / n, rtol=1e-6)
  np.testing.assert_allclose(aux["perplexity"], np.exp(ce / n), rtol=1e-5)
  np.testing.assert_allclose(aux["train_accuracy"], correct / n, rtol=1e-6)
  assert int(aux["tokens"]) == 9   # non-padding tokens read


def test_causal_lm_eval_sums_and_summary():
  task = tasks.get_task("causal_lm")
  out = task.eval_metrics(jnp.asarray(LM_LOGITS), LM_BATCH)
  ce, correct, n = _lm_reference(LM_LOGITS)
  np.testing.assert_allclose(out["loss"], ce, rtol=1e-6)
  assert (float(out["correct"]), float(out["count"])) == (correct, n)
  totals = tasks.sum_metrics(tasks.sum_metrics({}, out), out)
  summary = task.summarize(totals)
  np.testing.assert_allclose(summary["eval_loss"], ce / n, rtol=1e-6)
  np.testing.assert_allclose(summary["perplexity"], np.exp(ce / n), rtol=1e-6)
  assert summary["eval_tokens"] == 2 * n


def test_causal_lm_the_last_position_never_scores():
  task = tasks.get_task("causal_lm")
  batch = dict(LM_BATCH, loss_mask=np.ones((2, 5), np.float32))
  out = task.eval_metrics(jnp.asarray(LM_LOGITS), batch)
  assert float(out["count"]) == 8.0
