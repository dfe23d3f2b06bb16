"""Byte-level BPE training, tokenizer.json round trip, and the tokenizer's clear errors."""
import pytest

from lowrank_jax import tokenizer as tok_lib

TEXTS = ["dog: a member of the genus Canis", "cat: feline mammal usually having thick fur",
         "run: move fast by using one's feet"] * 20


def test_train_save_load_round_trip(tmp_path):
  tok = tok_lib.train_bpe(TEXTS, 320)
  assert tok.get_vocab_size() == 320
  assert [tok.token_to_id(t) for t in tok_lib.SPECIAL_TOKENS] == [0, 1, 2]
  text = "dog: a fur-bearing mammal (ünïcode too)"
  assert tok.decode(tok.encode(text).ids) == text     # byte-level: no unknowns
  d = str(tmp_path)
  path = tok_lib.save(tok, d)
  assert path.endswith("tokenizer.json")
  for where in (d, path):
    assert tok_lib.load(where).encode(text).ids == tok.encode(text).ids


def test_errors(tmp_path):
  with pytest.raises(ValueError, match=r"vocab_size=100 is below the 259 tokens"):
    tok_lib.train_bpe(TEXTS, 100)
  tok = tok_lib.train_bpe(TEXTS, 300)
  with pytest.raises(ValueError, match=r"tokenizer has 300 tokens but model 'm' has "
                     r"vocab_size=256"):
    tok_lib.check_vocab(tok, 256, "m")
  tok_lib.check_vocab(tok, 512, "m")      # a padded model vocabulary is valid
  with pytest.raises(FileNotFoundError, match="no tokenizer file .*tokenizer.json"):
    tok_lib.load(str(tmp_path))
  with pytest.raises(ValueError, match=r"template 'Q: \{question\}' has no '\{prompt\}'"):
    tok_lib.format_prompt("Q: {question}", "x")
