"""The arithmetic word-problem generator: answers recomputed from the text by an independent
parser, decompositions that chain to the answer, seeding, and the word-level tokenizer."""
import re

import numpy as np
import pytest

from lowrank_jax.data import arith

# Independent reading of a question's text: the start count, then each sentence's effect.
_SENTENCES = ((re.compile(r"^\w+ (?:gets|finds) (\d+) more$"), lambda v, b: v + b),
              (re.compile(r"^\w+ (?:loses|gives away) (\d+)$"), lambda v, b: v - b),
              (re.compile(r"^\w+ doubles them$"), lambda v, b: 2 * v),
              (re.compile(r"^\w+ triples them$"), lambda v, b: 3 * v))


def _solve_text(text):
  """(final count, counts after each sentence) of a question, read from its words."""
  sentences = [s.strip() for s in text.split(" . ")]
  start = re.fullmatch(r"\w+ has (\d+) \w+", sentences[0])
  assert start, sentences[0]
  assert re.fullmatch(r"how many \w+ now \?", sentences[-1]), sentences[-1]
  value, trace = int(start.group(1)), []
  for s in sentences[1:-1]:
    matches = [(m, f) for pattern, f in _SENTENCES if (m := pattern.fullmatch(s))]
    assert len(matches) == 1, s
    m, f = matches[0]
    value = f(value, int(m.group(1)) if m.groups() else 0)
    trace.append(value)
  return value, trace


@pytest.mark.parametrize("max_value", [12, 30])
def test_answers_recomputed_from_the_text(max_value):
  problems = arith.generate_problems(300, seed=1, max_value=max_value)
  for p in problems:
    answer, trace = _solve_text(p.text())
    assert answer == p.answer and tuple(trace) == p.values
    assert all(0 <= v <= max_value for v in (p.start, *trace))
  steps = np.bincount([p.num_steps for p in problems], minlength=5)
  assert steps[0] == steps[1] == 0 and steps[2:].min() > 60       # 2-4 steps, all present
  assert {op for p in problems for op in p.ops} == set(arith.OPS)


def test_decomposition_chains_single_step_questions_to_the_answer():
  for p in arith.generate_problems(200, seed=2, max_value=30):
    subqs = p.decomposition().split(f" {arith.SEPARATOR} ")
    assert subqs == p.subquestions() and len(subqs) == p.num_steps
    answers = []
    for k, q in enumerate(subqs):
      assert re.findall(r"#\d+", q) == ([] if k == 0 else [f"#{k}"])
      value, trace = _solve_text(arith.resolve_references(q, answers))
      assert len(trace) == 1                                    # a single-step question
      answers.append(value)
    assert tuple(answers) == p.values and answers[-1] == p.answer


def test_one_step_problem_is_its_own_decomposition():
  for p in arith.generate_problems(20, seed=3, min_steps=1, max_steps=1):
    assert p.subquestions() == [p.text()]


def test_seeded():
  a = arith.generate_problems(50, seed=7)
  assert a == arith.generate_problems(50, seed=7)
  assert [p.text() for p in a] != [p.text() for p in arith.generate_problems(50, seed=8)]


def test_resolve_references():
  assert arith.resolve_references("tom has #2 pens", [4, 9]) == "tom has 9 pens"
  assert arith.resolve_references("tom has #3 pens", [4, 9]) is None
  assert arith.resolve_references("tom has #1 pens", [None]) is None
  assert arith.resolve_references("tom has 5 pens", []) == "tom has 5 pens"


def test_tokenizer_round_trip_and_numbers():
  tok = arith.WordTokenizer.for_problems(max_value=30)
  assert tok.vocab[:3] == ("<|pad|>", "<|bos|>", "<|eos|>")
  for p in arith.generate_problems(50, seed=4, max_value=30):
    for text in (p.text(), p.decomposition()):
      ids = tok.encode(text)
      assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text
  assert tok.number(tok.encode("17")[0]) == 17 and tok.number(tok.encode("has")[0]) is None
  with pytest.raises(ValueError, match=r"not in the vocabulary: \['31'\]"):
    tok.encode("tom has 31 pens")


@pytest.mark.parametrize("kw", [dict(min_steps=0), dict(max_steps=5),
                                dict(min_steps=3, max_steps=2), dict(max_value=2)])
def test_bad_arguments(kw):
  with pytest.raises(ValueError, match="generate_problems"):
    arith.generate_problems(1, seed=0, **kw)
