"""Byte-level BPE training, tokenizer.json round trip, and the tokenizer's clear errors."""
import tempfile

from absl.testing import absltest

from lowrank_jax import tokenizer as tok_lib

TEXTS = ["dog: a member of the genus Canis", "cat: feline mammal usually having thick fur",
         "run: move fast by using one's feet"] * 20


class TokenizerTest(absltest.TestCase):

  def test_train_save_load_round_trip(self):
    tok = tok_lib.train_bpe(TEXTS, 320)
    self.assertEqual(tok.get_vocab_size(), 320)
    self.assertEqual([tok.token_to_id(t) for t in tok_lib.SPECIAL_TOKENS], [0, 1, 2])
    text = "dog: a fur-bearing mammal (ünïcode too)"
    self.assertEqual(tok.decode(tok.encode(text).ids), text)     # byte-level: no unknowns
    with tempfile.TemporaryDirectory() as d:
      path = tok_lib.save(tok, d)
      self.assertTrue(path.endswith("tokenizer.json"))
      for where in (d, path):
        self.assertEqual(tok_lib.load(where).encode(text).ids, tok.encode(text).ids)

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, r"vocab_size=100 is below the 259 tokens"):
      tok_lib.train_bpe(TEXTS, 100)
    tok = tok_lib.train_bpe(TEXTS, 300)
    with self.assertRaisesRegex(ValueError, r"tokenizer has 300 tokens but model 'm' has "
                                r"vocab_size=256"):
      tok_lib.check_vocab(tok, 256, "m")
    tok_lib.check_vocab(tok, 512, "m")      # a padded model vocabulary is valid
    with tempfile.TemporaryDirectory() as d:
      with self.assertRaisesRegex(FileNotFoundError, "no tokenizer file .*tokenizer.json"):
        tok_lib.load(d)
    with self.assertRaisesRegex(ValueError, r"template 'Q: \{question\}' has no '\{prompt\}'"):
      tok_lib.format_prompt("Q: {question}", "x")


if __name__ == "__main__":
  absltest.main()
