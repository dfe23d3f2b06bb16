"""Byte-level BPE tokenizers for decoder LMs (the `tokenizers` package) and instruction templates.

A tokenizer trained here reserves three special tokens, `<|pad|>` (id 0), `<|bos|>` (id 1) and
`<|eos|>` (id 2), and is saved as `tokenizer.json` (the Hugging Face fast-tokenizer file) next to
a checkpoint. An instruction template is a plain string with one `{prompt}` field, e.g.
``"### Instruction:\\n{prompt}\\n### Response:\\n"``.

>>> from lowrank_jax import tokenizer as tok_lib
>>> tok = tok_lib.train_bpe(["dog: a domestic animal", "cat: a small animal"] * 20, 300)
>>> tok.decode(tok.encode("a small dog").ids)
'a small dog'
>>> tok_lib.format_prompt("Q: {prompt}\\nA: ", "Define: dog")
'Q: Define: dog\\nA: '
"""
from __future__ import annotations

import os
import pathlib
from typing import Iterable

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
SPECIAL_TOKENS = (PAD, BOS, EOS)
TOKENIZER_FILE = "tokenizer.json"


def train_bpe(texts: Iterable[str], vocab_size: int):
  """A byte-level BPE with `vocab_size` tokens (the special tokens included) trained on `texts`.

  Raises:
    ValueError: `vocab_size` leaves no room beyond the 256 bytes and the special tokens.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  smallest = 256 + len(SPECIAL_TOKENS)
  if vocab_size < smallest:
    raise ValueError(f"vocab_size={vocab_size} is below the {smallest} tokens of a byte-level "
                     f"BPE (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  return tok


def save(tok, directory: str | os.PathLike) -> str:
  """Writes `directory/tokenizer.json`; returns its path."""
  path = pathlib.Path(directory)
  path.mkdir(parents=True, exist_ok=True)
  tok.save(str(path / TOKENIZER_FILE))
  return str(path / TOKENIZER_FILE)


def load(path: str | os.PathLike):
  """A `tokenizers.Tokenizer` from a `tokenizer.json` file or a directory holding one.

  Raises:
    FileNotFoundError: no such file.
  """
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path).expanduser()
  if path.is_dir():
    path = path / TOKENIZER_FILE
  if not path.is_file():
    raise FileNotFoundError(f"no tokenizer file {path} (a tokenizer.json, e.g. saved by "
                            f"lowrank_jax.tokenizer.save)")
  return Tokenizer.from_file(str(path))


def special_id(tok, token: str) -> int:
  """The id of special `token`; ValueError when the tokenizer lacks it."""
  i = tok.token_to_id(token)
  if i is None:
    raise ValueError(f"tokenizer has no {token!r} token; a tokenizer made by "
                     f"lowrank_jax.tokenizer.train_bpe has {list(SPECIAL_TOKENS)}")
  return i


def check_vocab(tok, vocab_size: int, model_name: str) -> None:
  """Raises ValueError when the tokenizer emits ids the model's embedding table lacks.

  A model vocabulary larger than the tokenizer's (padded for speed, as many checkpoints are) is
  valid; a smaller one would index past the embedding table.
  """
  n = tok.get_vocab_size(with_added_tokens=True)
  if n > vocab_size:
    raise ValueError(f"tokenizer has {n} tokens but model {model_name!r} has vocab_size="
                     f"{vocab_size}; use the checkpoint's own tokenizer.json or a model with "
                     f"vocab_size >= {n}")


def format_prompt(template: str, prompt: str) -> str:
  """`template` with its `{prompt}` field filled (no other field is read).

  Raises:
    ValueError: the template lacks a `{prompt}` field.
  """
  if "{prompt}" not in template:
    raise ValueError(f"instruction template {template!r} has no '{{prompt}}' field")
  return template.replace("{prompt}", prompt)
