"""Text examples for decoder LMs: formatting, tokenization with a loss mask, and packing (private).

An example becomes a prompt and a response by format strings over its features (text decoded,
sequences as lists, plus `label_name`, the class name of `label`), e.g. ``"{lemmas[0]}: {gloss}"``.
Its tokens are ``<|bos|> prompt response <|eos|>``; its `loss_mask` is 1 at position t when token
t + 1 is a response token (so the last position of an example predicts nothing, and a prompt is
never a target). Packing concatenates whole examples into fixed-length rows (grain's first-fit
packer) with `segment_ids` (1, 2, ... per example, 0 on padding) and `positions` restarting at 0
per example; padding has `loss_mask` 0.

>>> import numpy as np
>>> rows = list(pack_rows([{"input_ids": np.array([5, 6, 7]), "loss_mask": np.array([1, 1, 0])},
...                        {"input_ids": np.array([8, 9]), "loss_mask": np.array([1, 0])}], 6))
>>> rows[0]["segment_ids"].tolist(), rows[0]["positions"].tolist()
([1, 1, 1, 2, 2, 0], [0, 1, 2, 0, 1, 0])
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from lowrank_jax import tokenizer as tok_lib

PACKED_KEYS = ("input_ids", "loss_mask", "segment_ids", "positions")


def _decode(x) -> Any:
  if isinstance(x, bytes):
    return x.decode("utf-8")
  if isinstance(x, np.ndarray):
    return x.item() if x.ndim == 0 and x.dtype.kind not in "SO" else (
        _decode(x.item()) if x.ndim == 0 else [_decode(v) for v in x])
  if isinstance(x, (list, tuple)):
    return [_decode(v) for v in x]
  return x


def example_fields(example, label_names: Sequence[str] = ()) -> dict:
  """The example's features as Python values (text decoded), plus `label_name` when the example
  has a `label` and `label_names` are given."""
  fields = {k: _decode(v) for k, v in example.items()}
  if "label" in fields and label_names:
    fields["label_name"] = label_names[int(fields["label"])]
  return fields


def text_formatter(prompt: str, response: str, template: str,
                   label_names: Sequence[str] = ()) -> Callable[[Any], tuple[str, str]]:
  """`fn(example) -> (prompt text, response text)`.

  Args:
    prompt: format string of the instruction over the example's fields; "" for plain text (the
      whole example is the response, as in pretraining).
    response: format string of the response (the trained text).
    template: instruction template with a `{prompt}` field wrapping a non-empty prompt.
    label_names: class names of `label` (the `label_name` field).

  Raises:
    ValueError: an empty response format, or a prompt with a template lacking `{prompt}`.
  """
  if not response:
    raise ValueError("dataset.response must be a non-empty format string, e.g. "
                     "'{lemmas[0]}: {gloss}'")
  if prompt:
    tok_lib.format_prompt(template, "")   # a template without {prompt}: one clear error now

  def fn(example):
    fields = example_fields(example, label_names)
    try:
      p = tok_lib.format_prompt(template, prompt.format(**fields)) if prompt else ""
      r = response.format(**fields)
    except (KeyError, IndexError) as e:
      raise ValueError(f"dataset.prompt={prompt!r} / dataset.response={response!r} name a field "
                       f"the examples lack ({e}); fields: {sorted(fields)}") from None
    return p, r
  return fn


def encode_pair(tok, prompt_text: str, response_text: str) -> tuple[list[int], list[int]]:
  """(prompt ids with the leading `<|bos|>`, response ids with the closing `<|eos|>`)."""
  bos, eos = tok_lib.special_id(tok, tok_lib.BOS), tok_lib.special_id(tok, tok_lib.EOS)
  p = [bos] + (tok.encode(prompt_text).ids if prompt_text else [])
  return p, tok.encode(response_text).ids + [eos]


def lm_transform(tok, formatter: Callable[[Any], tuple[str, str]], seq_len: int):
  """`fn(example) -> {"input_ids" (int32, (L,)), "loss_mask" (float32, (L,))}`, L <= `seq_len`
  (longer examples are cut at `seq_len` tokens)."""
  if seq_len < 2:
    raise ValueError(f"dataset.seq_len must be >= 2 for a causal LM, got {seq_len}")

  def fn(example):
    p, r = encode_pair(tok, *formatter(example))
    ids = (p + r)[:seq_len]
    is_response = np.zeros(len(ids), np.float32)
    is_response[len(p):] = 1.0
    loss_mask = np.zeros(len(ids), np.float32)
    loss_mask[:-1] = is_response[1:]          # position t predicts token t + 1
    return {"input_ids": np.asarray(ids, np.int32), "loss_mask": loss_mask}
  return fn


def _rename_packed(row: dict) -> dict:
  return {"input_ids": row["input_ids"], "loss_mask": row["loss_mask"],
          "segment_ids": row["input_ids_segment_ids"].astype(np.int32),
          "positions": row["input_ids_positions"].astype(np.int32)}


def pack(ds, seq_len: int, num_packing_bins: int, *, seed: int = 0, shuffle_bins: bool = True):
  """grain `IterDataset` of tokenized examples -> packed rows (`PACKED_KEYS`, length `seq_len`)."""
  import grain  # pylint: disable=g-import-not-at-top
  packed = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct={"input_ids": seq_len, "loss_mask": seq_len},
      num_packing_bins=num_packing_bins, seed=seed, shuffle_bins=shuffle_bins)
  return packed.map(_rename_packed)


def pack_rows(examples: Iterable[dict], seq_len: int, num_packing_bins: int = 4) -> Iterator[dict]:
  """Packed rows of tokenized `examples`, in a deterministic order (eval, tests)."""
  import grain  # pylint: disable=g-import-not-at-top
  ds = grain.MapDataset.source(list(examples)).to_iter_dataset()
  return iter(pack(ds, seq_len, num_packing_bins, shuffle_bins=False))


def packed_batches(rows: Iterable[dict], batch_size: int, seq_len: int) -> list[dict]:
  """Fixed-shape batches of packed rows; the last one is filled with all-padding rows
  (`loss_mask` and `segment_ids` 0), so every batch has one shape."""
  rows = list(rows)
  out = []
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    batch = {k: np.stack([r[k] for r in chunk]) for k in PACKED_KEYS}
    if len(chunk) < batch_size:
      fill = batch_size - len(chunk)
      batch = {k: np.concatenate([v, np.zeros((fill, seq_len), v.dtype)])
               for k, v in batch.items()}
    out.append(batch)
  return out
