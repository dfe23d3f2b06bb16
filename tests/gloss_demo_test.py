"""The decoder-LM demo configs at CI size (runlocal): gloss_lm pretrains and writes a Hugging
Face checkpoint + tokenizer.json; gloss_sft instruction-tunes that checkpoint with LoRA and
reports before/after perplexity and generation exact match. Plus the causal-LM runner's errors."""
import json
import os
import tempfile

from absl.testing import absltest
import numpy as np

from configs import gloss_lm
from configs import gloss_sft
from lowrank_jax import tokenizer as tok_lib
from lowrank_jax import train
from lowrank_jax.models import llama


class GlossDemoTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.TemporaryDirectory()
    c = gloss_lm.get_config("runlocal")
    c.progress = False
    cls.lm = train.train_and_evaluate(c, os.path.join(cls.tmp.name, "lm"))

  @classmethod
  def tearDownClass(cls):
    cls.tmp.cleanup()
    super().tearDownClass()

  def test_gloss_lm_writes_a_loadable_checkpoint(self):
    r = self.lm
    self.assertTrue(np.isfinite(r["perplexity"]) and r["perplexity"] > 1.0)
    self.assertGreater(r["eval_tokens"], 0)
    self.assertGreater(r["tokens_per_s"], 0)
    params, cfg = llama.load_hf_checkpoint(r["hf_path"])
    self.assertEqual(cfg.vocab_size, gloss_lm.MODEL_RUNLOCAL["vocab_size"])
    tok = tok_lib.load(r["hf_path"])
    self.assertEqual(tok.get_vocab_size(), cfg.vocab_size)
    self.assertEqual(llama.num_params(cfg), r["trainable_params"])
    with open(os.path.join(r["workdir"], "metrics.jsonl")) as f:
      logged = [json.loads(line) for line in f]
    self.assertTrue(any("tokens_per_s" in m for m in logged))

  def test_gloss_sft_reports_before_and_after(self):
    c = gloss_sft.get_config(f"runlocal,checkpoint={self.lm['hf_path']}")
    c.progress = False
    r = train.train_and_evaluate(c, os.path.join(self.tmp.name, "sft"))
    for k in ("perplexity", "exact_match", "accuracy"):
      self.assertIn(k, r["before"])
      self.assertIn(k, r)
    self.assertBetween(r["exact_match"], 0.0, 1.0)
    self.assertLen(r["samples"], 3)
    prompt, reference, _ = r["samples"][0]
    self.assertTrue(prompt.startswith("### Instruction:\nWhich sense class is "))
    self.assertTrue(prompt.endswith("?\n### Response:\n"))
    self.assertIn(reference.split(".")[0], ("noun", "verb"))
    self.assertGreater(r["adapter_params"], 0)

  def test_a_tokenizer_larger_than_the_vocabulary_is_refused(self):
    big = tok_lib.train_bpe(["a b c"] * 10, 300)
    big.add_tokens([f"<extra_{i}>" for i in range(200)])    # more tokens than the model's 384
    path = tok_lib.save(big, os.path.join(self.tmp.name, "big_tok"))
    c = gloss_sft.get_config(f"runlocal,checkpoint={self.lm['hf_path']}")
    c.model.tokenizer = path
    with self.assertRaisesRegex(ValueError, r"tokenizer has \d+ tokens but model 'llama_tiny' "
                                r"has vocab_size=384"):
      train.train_and_evaluate(c, os.path.join(self.tmp.name, "bad_tok"))


class CausalLMConfigErrorsTest(absltest.TestCase):

  def test_clear_errors(self):
    c = gloss_lm.get_config("runlocal")
    c.model.name = "minilm_tiny"
    with self.assertRaisesRegex(ValueError, r"trains a decoder LM; model 'minilm_tiny' is not "
                                r"one; decoder models: \[.*'llama_tiny'"):
      train.check_config(c)
    c = gloss_lm.get_config("runlocal")
    c.dataset.name = "digits"
    with self.assertRaisesRegex(ValueError, r"reads text; dataset 'digits' is image"):
      train.check_config(c)
    c = gloss_lm.get_config("runlocal")
    del c.dataset["response"]
    with self.assertRaisesRegex(ValueError, r"needs config.dataset.response"):
      train.check_config(c)
    c = gloss_lm.get_config("runlocal")
    c.model.config.hidden_sise = 8
    with self.assertRaisesRegex(ValueError, r"model.config.hidden_sise is not a field of model "
                                r"'llama_tiny'"):
      train.decoder_spec(c.model, None)
    c = gloss_sft.get_config("runlocal,checkpoint=/nonexistent/ckpt")
    with self.assertRaisesRegex(FileNotFoundError, "no config.json"):
      train.decoder_spec(c.model, None)


if __name__ == "__main__":
  absltest.main()
