"""`tasks.Classification` against float64 numpy re-derivations."""
from absl.testing import absltest
import jax.numpy as jnp
import numpy as np

from lowrank_jax import tasks


def _log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


LOGITS = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0], [1.0, 1.0, 0.0], [0.0, -2.0, 4.0]])
LABELS = np.array([0, 1, 1, 2])


class ClassificationTest(absltest.TestCase):

  def test_loss_is_float32_mean_cross_entropy(self):
    task = tasks.get_task("classification")
    loss, aux = task.loss(jnp.asarray(LOGITS, jnp.bfloat16), {"label": jnp.asarray(LABELS)})
    self.assertEqual(loss.dtype, jnp.float32)
    bf = np.asarray(jnp.asarray(LOGITS, jnp.bfloat16).astype(jnp.float32))
    want = -np.mean(_log_softmax(bf)[np.arange(4), LABELS])
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    np.testing.assert_allclose(aux["ce"], want, rtol=1e-6)
    # argmax: 0, 2, 0 (tie -> first), 2; correct: rows 0 and 3.
    self.assertAlmostEqual(float(aux["train_accuracy"]), 0.5)

  def test_eval_metrics_skip_the_padding(self):
    task = tasks.get_task("classification")
    mask = np.array([1.0, 1.0, 1.0, 0.0])
    out = task.eval_metrics(jnp.asarray(LOGITS, jnp.float32),
                            {"label": jnp.asarray(LABELS), "mask": jnp.asarray(mask)})
    ce = -_log_softmax(LOGITS)[np.arange(4), LABELS]
    self.assertEqual(float(out["correct"]), 1.0)
    self.assertEqual(float(out["count"]), 3.0)
    np.testing.assert_allclose(out["loss"], np.sum(ce[:3]), rtol=1e-6)
    totals = tasks.sum_metrics(tasks.sum_metrics({}, out), out)
    self.assertEqual(task.summarize(totals),
                     {"accuracy": 1.0 / 3.0, "eval_loss": totals["loss"] / 6.0})

  def test_batch_spec(self):
    task = tasks.get_task("classification")
    self.assertEqual(task.train_keys, ("label",))
    self.assertEqual(task.eval_keys, ("label", "mask"))
    with self.assertRaisesRegex(ValueError, r"eval batch is missing \['mask'\]; it has "
                                r"\['image', 'label'\]"):
      tasks.check_batch({"image": 0, "label": 0}, task.eval_keys, "eval")

  def test_unknown_task(self):
    with self.assertRaisesRegex(ValueError,
                                r"Unknown task 'lm'; valid names: \['causal_lm', 'classification'\]"):
      tasks.get_task("lm")


class CausalLMTest(absltest.TestCase):
  """Next-token cross-entropy against a float64 loop over the masked positions."""

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    self.ids = rng.integers(0, 7, (2, 5)).astype(np.int32)
    self.mask = np.array([[0, 1, 1, 0, 0], [1, 1, 1, 1, 0]], np.float32)
    self.batch = {"input_ids": self.ids, "loss_mask": self.mask,
                  "segment_ids": np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], np.int32)}

  def _reference(self, logits):
    ce, correct, n = 0.0, 0.0, 0.0
    logp = _log_softmax(logits)
    for b in range(2):
      for t in range(4):                      # position t scores token t + 1
        if self.mask[b, t]:
          ce -= logp[b, t, self.ids[b, t + 1]]
          correct += float(np.argmax(logits[b, t]) == self.ids[b, t + 1])
          n += 1
    return ce, correct, n

  def test_loss_and_metrics(self):
    task = tasks.get_task("causal_lm")
    loss, aux = task.loss(jnp.asarray(self.logits, jnp.bfloat16), self.batch)
    self.assertEqual(loss.dtype, jnp.float32)
    bf = np.asarray(jnp.asarray(self.logits, jnp.bfloat16).astype(jnp.float32))
    ce, correct, n = self._reference(bf)
    np.testing.assert_allclose(loss, ce / n, rtol=1e-6)
    np.testing.assert_allclose(aux["perplexity"], np.exp(ce / n), rtol=1e-5)
    np.testing.assert_allclose(aux["train_accuracy"], correct / n, rtol=1e-6)
    self.assertEqual(int(aux["tokens"]), 9)   # non-padding tokens read

  def test_eval_sums_and_summary(self):
    task = tasks.get_task("causal_lm")
    out = task.eval_metrics(jnp.asarray(self.logits), self.batch)
    ce, correct, n = self._reference(self.logits)
    np.testing.assert_allclose(out["loss"], ce, rtol=1e-6)
    self.assertEqual((float(out["correct"]), float(out["count"])), (correct, n))
    totals = tasks.sum_metrics(tasks.sum_metrics({}, out), out)
    summary = task.summarize(totals)
    np.testing.assert_allclose(summary["eval_loss"], ce / n, rtol=1e-6)
    np.testing.assert_allclose(summary["perplexity"], np.exp(ce / n), rtol=1e-6)
    self.assertEqual(summary["eval_tokens"], 2 * n)

  def test_the_last_position_never_scores(self):
    task = tasks.get_task("causal_lm")
    batch = dict(self.batch, loss_mask=np.ones((2, 5), np.float32))
    out = task.eval_metrics(jnp.asarray(self.logits), batch)
    self.assertEqual(float(out["count"]), 8.0)


if __name__ == "__main__":
  absltest.main()
