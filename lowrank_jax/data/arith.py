"""Multi-step arithmetic word problems with gold decompositions, generated offline, and a word-level
tokenizer for them.

A problem starts from a count and applies 1-4 operations (add b, take away b, double, triple); every
intermediate count stays in [0, max_value]::

  tom has 7 apples . tom gets 5 more . tom loses 3 . tom doubles them . how many apples now ?

Its gold decomposition is one single-step question per operation, in the same wording, each
starting from the previous question's answer, written `#k` (the answer to question k)::

  tom has 7 apples . tom gets 5 more . how many apples now ? | tom has #1 apples . tom loses 3 .
  how many apples now ? | tom has #2 apples . tom doubles them . how many apples now ?

A one-operation problem is itself a single-step question. Numbers 0..max_value are single tokens.

>>> p = generate_problems(2, seed=0, min_steps=2, max_steps=2, max_value=20)[0]
>>> p.text()
'tom has 18 coins . tom loses 10 . tom gets 1 more . how many coins now ?'
>>> for q in p.subquestions(): print(q)
tom has 18 coins . tom loses 10 . how many coins now ?
tom has #1 coins . tom gets 1 more . how many coins now ?
>>> p.values
(8, 9)
>>> tok = WordTokenizer.for_problems(max_value=20)
>>> tok.decode(tok.encode(p.subquestions()[1]))
'tom has #1 coins . tom gets 1 more . how many coins now ?'
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional, Sequence

import numpy as np

from lowrank_jax import tokenizer as tok_lib

NAMES = ("tom", "ann", "bob", "eve", "sam", "lia")
OBJECTS = ("apples", "coins", "books", "cards", "stones", "pens")
# op -> the sentence variants ({name}, {b}: the operand); "double"/"triple" take no operand.
PHRASES = {
    "add": ("{name} gets {b} more", "{name} finds {b} more"),
    "sub": ("{name} loses {b}", "{name} gives away {b}"),
    "double": ("{name} doubles them",),
    "triple": ("{name} triples them",),
}
OPS = tuple(PHRASES)
MAX_STEPS = 4
SEPARATOR = "|"          # between the sub-questions of a decomposition
ANSWER = "="             # the solver prompt ends with it; the answer follows
DECOMPOSE = "->"         # the decomposer prompt ends with it; the sub-questions follow
_REF = re.compile(r"#(\d+)")


def apply_op(op: str, value: int, operand: int) -> int:
  """The count after `op` (one of `OPS`) with `operand` (ignored by double/triple)."""
  return {"add": value + operand, "sub": value - operand, "double": 2 * value,
          "triple": 3 * value}[op]


@dataclasses.dataclass(frozen=True)
class Problem:
  """A word problem: `start`, then `ops[i]` with `operands[i]` in wording `variants[i]`.

  Attributes:
    name, obj: the person and the counted objects.
    start: the initial count.
    ops, operands, variants: per step, the operation, its operand (0 for double/triple), and the
      index of its sentence in `PHRASES[op]`.
    values: the count after each step (`values[-1]` is the answer).
  """
  name: str
  obj: str
  start: int
  ops: tuple[str, ...]
  operands: tuple[int, ...]
  variants: tuple[int, ...]
  values: tuple[int, ...]

  @property
  def answer(self) -> int:
    return self.values[-1]

  @property
  def num_steps(self) -> int:
    return len(self.ops)

  def _sentence(self, i: int) -> str:
    return PHRASES[self.ops[i]][self.variants[i]].format(name=self.name, b=self.operands[i])

  def _question(self, start: str, sentences: Sequence[str]) -> str:
    body = " . ".join([f"{self.name} has {start} {self.obj}", *sentences])
    return f"{body} . how many {self.obj} now ?"

  def text(self) -> str:
    """The problem as one question."""
    return self._question(str(self.start), [self._sentence(i) for i in range(self.num_steps)])

  def subquestions(self) -> list[str]:
    """The gold decomposition: one single-step question per step; question k > 1 starts from
    `#(k-1)`, the answer to the question before it."""
    return [self._question(str(self.start) if i == 0 else f"#{i}", [self._sentence(i)])
            for i in range(self.num_steps)]

  def decomposition(self) -> str:
    """The sub-questions joined by `SEPARATOR`."""
    return f" {SEPARATOR} ".join(self.subquestions())


def _check_steps(min_steps: int, max_steps: int, max_value: int) -> None:
  if not 1 <= min_steps <= max_steps <= MAX_STEPS:
    raise ValueError(f"generate_problems: need 1 <= min_steps <= max_steps <= {MAX_STEPS}, got "
                     f"min_steps={min_steps}, max_steps={max_steps}")
  if max_value < 3:
    raise ValueError(f"generate_problems: max_value must be >= 3, got {max_value}")


def random_problem(rng: np.random.Generator, num_steps: int, max_value: int) -> Problem:
  """One problem of `num_steps` operations; every count stays in [0, max_value].

  The start is uniform in [1, max_value]; each step picks uniformly among the operations that keep
  the count in range (add: b uniform in [1, max_value - count]; take away: b uniform in
  [1, count]; double/triple when the result fits), then a wording uniformly.
  """
  value = int(rng.integers(1, max_value + 1))
  start, ops, operands, variants, values = value, [], [], [], []
  for _ in range(num_steps):
    feasible = [op for op, ok in (("add", value < max_value), ("sub", value > 0),
                                  ("double", 0 < 2 * value <= max_value),
                                  ("triple", 0 < 3 * value <= max_value)) if ok]
    op = feasible[int(rng.integers(len(feasible)))]
    operand = {"add": lambda: int(rng.integers(1, max_value - value + 1)),
               "sub": lambda: int(rng.integers(1, value + 1))}.get(op, lambda: 0)()
    value = apply_op(op, value, operand)
    ops.append(op)
    operands.append(operand)
    variants.append(int(rng.integers(len(PHRASES[op]))))
    values.append(value)
  return Problem(name=NAMES[int(rng.integers(len(NAMES)))],
                 obj=OBJECTS[int(rng.integers(len(OBJECTS)))], start=start, ops=tuple(ops),
                 operands=tuple(operands), variants=tuple(variants), values=tuple(values))


def generate_problems(n: int, seed: int, *, min_steps: int = 2, max_steps: int = MAX_STEPS,
                      max_value: int = 30) -> list[Problem]:
  """`n` problems from `np.random.default_rng(seed)`, the number of steps uniform in
  [min_steps, max_steps].

  Raises:
    ValueError: steps outside 1..4 or min_steps > max_steps, or max_value < 3.
  """
  _check_steps(min_steps, max_steps, max_value)
  rng = np.random.default_rng(seed)
  return [random_problem(rng, int(rng.integers(min_steps, max_steps + 1)), max_value)
          for _ in range(n)]


def resolve_references(question: str, answers: Sequence[Optional[int]]) -> Optional[str]:
  """`question` with each `#k` replaced by `answers[k-1]`; None when a `#k` names no earlier
  answer (k < 1, k > len(answers), or that answer is None)."""
  missing = False

  def sub(m):
    nonlocal missing
    k = int(m.group(1))
    if not 1 <= k <= len(answers) or answers[k - 1] is None:
      missing = True
      return m.group(0)
    return str(answers[k - 1])

  out = _REF.sub(sub, question)
  return None if missing else out


class WordTokenizer:
  """Whitespace word-level tokenizer over a fixed vocabulary; ids 0, 1, 2 are the pad, bos and eos
  tokens of `lowrank_jax.tokenizer` (`<|pad|>`, `<|bos|>`, `<|eos|>`).

  Args:
    words: the vocabulary after the three special tokens, without duplicates.
  """

  def __init__(self, words: Sequence[str]):
    vocab = [*tok_lib.SPECIAL_TOKENS, *words]
    if len(set(vocab)) != len(vocab):
      raise ValueError("WordTokenizer: words must be distinct and not special tokens")
    self.vocab = tuple(vocab)
    self._ids = {w: i for i, w in enumerate(vocab)}
    self.pad_id, self.bos_id, self.eos_id = (self._ids[t] for t in tok_lib.SPECIAL_TOKENS)

  @classmethod
  def for_problems(cls, max_value: int) -> "WordTokenizer":
    """Every word of the problems of `generate_problems(..., max_value=max_value)`, their
    decompositions and the prompt markers."""
    words = {w for phrases in PHRASES.values() for p in phrases for w in p.split()}
    words -= {"{name}", "{b}"}
    fixed = ["has", "how", "many", "now", ".", "?", SEPARATOR, ANSWER, DECOMPOSE]
    return cls([*[str(i) for i in range(max_value + 1)],
                *[f"#{k}" for k in range(1, MAX_STEPS + 1)], *NAMES, *OBJECTS, *fixed,
                *sorted(words - set(fixed))])

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def encode(self, text: str) -> list[int]:
    """The ids of the whitespace-separated words of `text`.

    Raises:
      ValueError: a word outside the vocabulary (named).
    """
    unknown = [w for w in text.split() if w not in self._ids]
    if unknown:
      raise ValueError(f"WordTokenizer: words not in the vocabulary: {unknown[:5]}")
    return [self._ids[w] for w in text.split()]

  def decode(self, ids: Sequence[int]) -> str:
    """The words of `ids` joined by spaces; pad, bos and eos are dropped."""
    special = {self.pad_id, self.bos_id, self.eos_id}
    return " ".join(self.vocab[i] for i in ids if i not in special)

  def number(self, token_id: int) -> Optional[int]:
    """The integer a number token stands for; None for any other token."""
    word = self.vocab[token_id] if 0 <= token_id < len(self.vocab) else ""
    return int(word) if word.isdigit() else None
