"""The decoder-LM demo configs at CI size (runlocal): gloss_lm pretrains and writes a Hugging
Face checkpoint + tokenizer.json; gloss_sft instruction-tunes that checkpoint with LoRA and
reports before/after perplexity and generation exact match. Plus the causal-LM runner's errors."""
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from configs import gloss_lm
from configs import gloss_sft
from lowrank_jax import data
from lowrank_jax import models
from lowrank_jax import tokenizer as tok_lib
from lowrank_jax import train
from lowrank_jax.models import llama


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
  return str(tmp_path_factory.mktemp("gloss_demo"))


@pytest.fixture(scope="module")
def lm(tmp):
  """One gloss_lm pretraining run (runlocal), shared by the tests that read or fine-tune it."""
  c = gloss_lm.get_config("runlocal")
  c.progress = False
  return train.train_and_evaluate(c, os.path.join(tmp, "lm"))


def test_gloss_lm_writes_a_loadable_checkpoint(lm):
  r = lm
  assert np.isfinite(r["perplexity"]) and r["perplexity"] > 1.0
  assert r["eval_tokens"] > 0
  assert r["tokens_per_s"] > 0
  params, cfg = llama.load_hf_checkpoint(r["hf_path"])
  assert cfg.vocab_size == gloss_lm.MODEL_RUNLOCAL["vocab_size"]
  tok = tok_lib.load(r["hf_path"])
  assert tok.get_vocab_size() == cfg.vocab_size
  assert llama.num_params(cfg) == r["trainable_params"]
  with open(os.path.join(r["workdir"], "metrics.jsonl")) as f:
    logged = [json.loads(line) for line in f]
  assert any("tokens_per_s" in m for m in logged)


def test_gloss_sft_reports_before_and_after(lm, tmp):
  c = gloss_sft.get_config(f"runlocal,checkpoint={lm['hf_path']}")
  c.progress = False
  r = train.train_and_evaluate(c, os.path.join(tmp, "sft"))
  for k in ("perplexity", "exact_match", "accuracy"):
    assert k in r["before"]
    assert k in r
  assert 0.0 <= r["exact_match"] <= 1.0
  assert len(r["samples"]) == 3
  prompt, reference, _ = r["samples"][0]
  assert prompt.startswith("### Instruction:\nWhich sense class is ")
  assert prompt.endswith("?\n### Response:\n")
  assert reference.split(".")[0] in ("noun", "verb")
  assert r["adapter_params"] > 0


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(lm, tmp):
  big = tok_lib.train_bpe(["a b c"] * 10, 300)
  big.add_tokens([f"<extra_{i}>" for i in range(200)])    # more tokens than the model's 384
  path = tok_lib.save(big, os.path.join(tmp, "big_tok"))
  c = gloss_sft.get_config(f"runlocal,checkpoint={lm['hf_path']}")
  c.model.tokenizer = path
  with pytest.raises(ValueError, match=r"tokenizer has \d+ tokens but model 'llama_tiny' "
                     r"has vocab_size=384"):
    train.train_and_evaluate(c, os.path.join(tmp, "bad_tok"))


def test_generation_eval_matches_an_uncached_greedy_loop_per_prompt():
  words = ["dog", "a cat", "the big red fox", "x", "an old tree stump", "sea", "rain"]
  tok = tok_lib.train_bpe([f"say {w}: {w} ok" for w in words] * 5, 300)
  spec = models.get_model("llama_tiny").with_config(vocab_size=300)
  params = spec.init(jax.random.key(3))
  eos = tok.token_to_id(tok_lib.EOS)
  fmt = data.text_formatter("say {w}", "{ref}", "Q: {prompt}\nA: ")

  def greedy(prompt_ids, steps=5):   # independent: full forward each step, one prompt alone
    ids, out = list(prompt_ids), []
    for _ in range(steps):
      nxt = int(np.argmax(np.asarray(llama.apply(params, np.asarray([ids]), spec.config))[0, -1]))
      out.append(nxt)
      if nxt == eos:
        break
      ids.append(nxt)
    return tok.decode([t for t in out if t != eos])

  want = [greedy(data.encode_pair(tok, fmt({"w": w, "ref": ""})[0], "")[0]) for w in words]
  refs = [w if i % 2 else "no match" for i, w in enumerate(want)]     # every other one hits
  source = [{"w": w, "ref": r} for w, r in zip(words, refs)]
  d = train.Data(None, source, None, None, formatter=fmt)
  model = train.Model(None, None, tok, spec)
  gcfg = ml_collections.ConfigDict({"num_examples": 7, "max_new_tokens": 5, "batch_size": 3,
                                    "print_samples": 7})
  out = train.generation_eval(params, model, d, gcfg)
  assert [pred for _, _, pred in out["samples"]] == want
  assert out["exact_match"] == pytest.approx(sum(r == w for r, w in zip(refs, want)) / 7, abs=5e-8)


def test_causal_lm_config_clear_errors():
  c = gloss_lm.get_config("runlocal")
  c.model.name = "minilm_tiny"
  with pytest.raises(ValueError, match=r"trains a decoder LM; model 'minilm_tiny' is not "
                     r"one; decoder models: \[.*'llama_tiny'"):
    train.check_config(c)
  c = gloss_lm.get_config("runlocal")
  c.dataset.name = "digits"
  with pytest.raises(ValueError, match=r"reads text; dataset 'digits' is image"):
    train.check_config(c)
  c = gloss_lm.get_config("runlocal")
  del c.dataset["response"]
  with pytest.raises(ValueError, match=r"needs config.dataset.response"):
    train.check_config(c)
  c = gloss_lm.get_config("runlocal")
  c.model.config.hidden_sise = 8
  with pytest.raises(ValueError, match=r"model.config.hidden_sise is not a field of model "
                     r"'llama_tiny'"):
    train.decoder_spec(c.model, None)
  c = gloss_sft.get_config("runlocal,checkpoint=/nonexistent/ckpt")
  with pytest.raises(FileNotFoundError, match="no config.json"):
    train.decoder_spec(c.model, None)

