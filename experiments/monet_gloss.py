r"""Monet vs a dense-FFN decoder of equal parameters on WordNet glosses; routing inspection and
expert knock-out.

Command (2-core CPU)::

  python -m experiments.monet_gloss [--steps 300 --decompose vertical --eval_texts 2000]
  python -m experiments.monet_gloss --smoke      # runlocal models, seconds

Both decoders come from `configs/monet_gloss.py` (`ffn=monet` and `ffn=swiglu`: the same
attention, embeddings, tokenizer, data order and optimizer; FFN parameters equal) and are trained
with the runner's own pieces (`lowrank_jax.train`: model and data, full training, the same train
step). Evaluation packs the first `eval_texts` validation glosses into rows of `seq_len` tokens
that keep each token's supersense label (one of WordNet's 41 lexicographer files), and reports
the token-weighted validation loss of both models.

Inspection (the Monet model, router of layer 0, whose gates layers 0..groups−1 use): the weight
of expert (i, j) on a token is `Σ_h g1[h, i] g2[h, j]` (batch statistics, as in training). For
every expert: its routing mass per supersense, the lift of a supersense (its share of the
expert's mass over its share of the tokens), and its top tokens by weight with their gloss
context (the synset's first lemma). The table prints the `top_experts` experts (with at least the
mean routing mass) of highest lift. Knock-out: for each expert of the table's first `knockouts`
rows, and as a control for as many experts drawn at random among the others with at least the
mean mass, its two pieces are zeroed in every layer that uses that router (`monet.knock_out`) and
the change of the mean token loss is reported on the expert's top-3 supersenses (by lift, among
supersenses with at least `min_tokens` tokens) and on all other tokens. The top supersenses are
chosen on the same validation tokens the loss is measured on.

Measured (defaults, seed 0, 2026-12-02, 2 CPU cores shared with other jobs, load average ~16;
training 659 s Monet, 533 s dense; ~28 min wall in all)::

  monet:  1,068,160 params, validation loss 4.2803 (perplexity 72.3)
  swiglu: 1,068,160 params, validation loss 4.2637 (perplexity 71.1)
  (71,186 target tokens of 2,000 validation glosses, after 300 steps of 16 x 128 tokens)

  expert  mass    top supersenses (lift)                 top tokens [gloss of]
  (0,12)  0.0095  noun.person 5.3, noun.quantity 4.0     '8' [cruel and unusual punishment],
                                                         '7' [Bessel], '4' [Bessel], '19' [Piston]
  (11,18) 0.0045  noun.process 4.3, verb.stative 3.7     ' be' [exist], ' be' [hang], ' be' [plan]
  (26,24) 0.0073  verb.stative 4.2, verb.change 4.2      ' "' [password], ' "' [rule], ...
  (8,0)   0.0063  verb.stative 4.0, verb.change 3.9      ' "' [subsistence], ' "' [continue], ...
  (19,18) 0.0044  verb.stative 3.6, verb.possession 3.6  a special token [stir fry], [eke out], ...
  (0,14)  0.0136  noun.quantity 3.5, noun.person 3.5     '9' [sigeh], '00' [Philippines], '5', '2'
  (0,19)  0.0165  noun.person 3.5, noun.quantity 2.8     a special token [anil], [pine fern], ...
  (7,20)  0.0070  verb.possession 3.4, verb.competition  'un', 'it' [double crochet], 'it' [waive]

  knock-out (Δ mean token loss on the expert's top-3 supersenses vs on the other tokens)
  table  (0,12)   +0.1320 vs +0.0424 (ratio 3.12)     random (7,0)    +0.0015 vs +0.0056 (0.27)
  table  (11,18)  +0.0348 vs +0.0332 (1.05)           random (16,13)  +0.0278 vs +0.0308 (0.90)
  table  (26,24)  +0.0068 vs +0.0095 (0.72)           random (26,8)   +0.1621 vs +0.1034 (1.57)
  table  (8,0)    +0.0065 vs +0.0047 (1.39)           random (20,5)   +0.0102 vs +0.0089 (1.14)

The Monet decoder's loss is within 0.4% of the dense decoder's. The clearest expert, (0,12), fires
on digits (years in the glosses of people, amounts), and knocking it out costs its supersenses
three times what it costs the others; the other table experts track punctuation or function
words, and their knock-outs are not more selective than random ones (ratios 0.27–1.57). First
piece 0 is a "number" piece: (0,12), (0,14) and (0,19) share it. In that run the special tokens
printed as '' (the table now prints them, `<|bos|>` or `<|eos|>`).
"""
from __future__ import annotations

import itertools
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from configs import monet_gloss
from lowrank_jax import data as data_lib
from lowrank_jax import optim
from lowrank_jax import steps
from lowrank_jax import tasks
from lowrank_jax import train
from lowrank_jax.models import monet

_STEPS = flags.DEFINE_integer("steps", 300, "Training steps per model.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed (init, data order).")
_DECOMPOSE = flags.DEFINE_enum("decompose", "vertical", list(monet.DECOMPOSITIONS),
                               "Monet expert decomposition.")
_EVAL_TEXTS = flags.DEFINE_integer("eval_texts", 2000, "Validation glosses evaluated.")
_TOP_EXPERTS = flags.DEFINE_integer("top_experts", 8, "Experts in the inspection table.")
_TOP_TOKENS = flags.DEFINE_integer("top_tokens", 8, "Top tokens shown per expert.")
_KNOCKOUTS = flags.DEFINE_integer("knockouts", 3, "Experts knocked out (the table's first).")
_MIN_TOKENS = flags.DEFINE_integer("min_tokens", 200, "Tokens a supersense needs to be an "
                                   "expert's top supersense.")
_SMOKE = flags.DEFINE_bool("smoke", False, "runlocal models and 6 steps (seconds).")

ROUTER = ("layers", "layer_0", "router")


def train_decoder(config):
  """(params, model, data) of `config` trained for `config.total_steps` steps."""
  k_model, k_adapter, rng = train.run_keys(config.seed)
  task = tasks.get_task("causal_lm")
  model, data = train.make_decoder_and_data(config, k_model)
  adapter, base, ad_state, head = train.init_adapter(config, model, data, k_adapter)
  tx = optim.make_optimizer(config.optimizer, config.total_steps)
  train_step, _ = train.make_steps(adapter, model, task, tx)
  state = steps.init_train_state(ad_state, tx, head=head, rng=rng)
  start = time.perf_counter()
  for step in range(config.total_steps):
    state, metrics = train_step(state, base, next(data.train_iter))
    if (step + 1) % max(config.total_steps // 5, 1) == 0:
      print(f"  step {step + 1}: loss {float(metrics['loss']):.4f}", flush=True)
  print(f"  {config.total_steps} steps in {time.perf_counter() - start:.0f} s")
  return train.merged_params(adapter, base, state), model, data


def labelled_batches(source, transform, seq_len: int, batch_size: int, limit: int):
  """(packed batches with a `label` per token (−1: padding), the lemma of each example): examples
  are packed in order, a row is closed when the next example does not fit."""
  rows, lemmas, row = [], [], None
  for k, ex in enumerate(itertools.islice(train.read_all(source), limit)):
    t = transform(ex)
    n = len(t["input_ids"])
    if row is None or row["used"] + n > seq_len:
      row = {"input_ids": np.zeros(seq_len, np.int32), "loss_mask": np.zeros(seq_len, np.float32),
             "segment_ids": np.zeros(seq_len, np.int32), "positions": np.zeros(seq_len, np.int32),
             "label": np.full(seq_len, -1, np.int32), "example": np.full(seq_len, -1, np.int32),
             "used": 0, "segments": 0}
      rows.append(row)
    s = slice(row["used"], row["used"] + n)
    row["segments"] += 1
    row["input_ids"][s], row["loss_mask"][s] = t["input_ids"], t["loss_mask"]
    row["segment_ids"][s], row["positions"][s] = row["segments"], np.arange(n)
    row["label"][s], row["example"][s] = int(ex["label"]), k
    lemma = ex["lemmas"][0]
    lemmas.append(lemma.decode() if isinstance(lemma, bytes) else str(lemma))
    row["used"] += n
  keys = ("input_ids", "loss_mask", "segment_ids", "positions", "label", "example")
  batches = []
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    batch = {k: np.stack([r[k] for r in chunk]) for k in keys}
    fill = batch_size - len(chunk)
    batches.append({k: np.concatenate([v, np.full((fill, seq_len), -1 if k in ("label", "example")
                                                  else 0, v.dtype)]) for k, v in batch.items()})
  return batches, lemmas


def token_losses(params, model, batches) -> tuple[np.ndarray, np.ndarray]:
  """(cross-entropy, supersense label) of every trained target token of `batches`."""
  task = tasks.get_task("causal_lm")
  fn = jax.jit(lambda p, b: task.token_stats(model.apply(p, b, train=False, rng=None), b))
  ces, labels = [], []
  for b in batches:
    ce, _, mask = jax.device_get(fn(params, {k: b[k] for k in ("input_ids", "loss_mask",
                                                                "segment_ids", "positions")}))
    keep = mask > 0
    ces.append(ce[keep])
    labels.append(b["label"][keep])
  return np.concatenate(ces), np.concatenate(labels)


def routing(params, model, batches, cfg: monet.MonetConfig, num_labels: int, top: int):
  """(mass (labels, E²), token counts per label, top (weight, token id, example) per expert)."""
  tap = jax.jit(lambda p, b: monet.router_inputs(
      lambda q: model.apply(q, b, train=False, rng=None), p, ROUTER))
  router = params["layers"]["layer_0"]["router"]
  weights_of = jax.jit(lambda x: monet.expert_weights(*monet.route(router, x, cfg)[:2]))
  e2 = cfg.experts ** 2
  mass, counts = np.zeros((num_labels, e2)), np.zeros(num_labels)
  best_w, best_tok, best_ex = (np.full((top, e2), -1.0), np.zeros((top, e2), np.int64),
                               np.zeros((top, e2), np.int64))
  for b in batches:
    x = tap(params, {k: b[k] for k in ("input_ids", "loss_mask", "segment_ids", "positions")})
    w = np.asarray(weights_of(x)).reshape(*b["label"].shape, e2)
    real = b["label"] >= 0
    w, lab, tok, ex = w[real], b["label"][real], b["input_ids"][real], b["example"][real]
    np.add.at(mass, lab, w)
    counts += np.bincount(lab, minlength=num_labels)
    cand_w = np.concatenate([best_w, w])
    cand_tok = np.concatenate([best_tok, np.broadcast_to(tok[:, None], w.shape)])
    cand_ex = np.concatenate([best_ex, np.broadcast_to(ex[:, None], w.shape)])
    order = np.argsort(-cand_w, axis=0)[:top]
    best_w, best_tok, best_ex = (np.take_along_axis(a, order, 0) for a in
                                 (cand_w, cand_tok, cand_ex))
  return mass, counts, (best_w, best_tok, best_ex)


def lifts(mass, counts, min_tokens: int) -> np.ndarray:
  """(labels, E²) share of an expert's mass on a label over the label's share of the tokens;
  labels with fewer than `min_tokens` tokens get 0."""
  share = mass / np.maximum(mass.sum(0, keepdims=True), 1e-12)
  lift = share / (counts / counts.sum())[:, None].clip(1e-12)
  return np.where(counts[:, None] >= min_tokens, lift, 0.0)


def print_table(experts, mass, lift, top, tok, lemmas, names, cfg, num_tokens: int):
  best_w, best_tok, best_ex = top
  print(f"\n{'expert (i,j)':>13} {'mass':>6} {'top supersenses (lift)':<52} top tokens "
        "[gloss of]")
  for e in experts:
    i, j = divmod(int(e), cfg.experts)
    sup = ", ".join(f"{names[s]} ({lift[s, e]:.1f})" for s in np.argsort(-lift[:, e])[:2])
    words = ", ".join(f"{tok.decode([int(t)], skip_special_tokens=False)!r} [{lemmas[x]}]"
                      for t, x in zip(best_tok[:, e], best_ex[:, e]))
    print(f"{f'({i},{j})':>13} {mass[:, e].sum() / num_tokens:6.4f} {sup:<52} {words}")


def main(_):
  arg = f"steps={_STEPS.value},seed={_SEED.value},decompose={_DECOMPOSE.value}"
  if _SMOKE.value:
    arg += ",runlocal"
  results, trained = {}, {}
  for ffn in ("monet", "swiglu"):
    config = monet_gloss.get_config(f"{arg},ffn={ffn}")
    print(f"training the {ffn} decoder ({config.total_steps} steps)", flush=True)
    params, model, data = train_decoder(config)
    trained[ffn] = (params, model, data, config)
  params, model, data, config = trained["monet"]
  names = data_lib.label_names(config.dataset.name)
  batches, lemmas = labelled_batches(data.eval_source, data.transform, config.dataset.seq_len,
                                     config.eval_batch_size, _EVAL_TEXTS.value)
  for ffn, (p, m, _, _) in trained.items():
    ce, labels = token_losses(p, m, batches)
    results[ffn] = (ce, labels)
    n = sum(x.size for x in jax.tree.leaves(p))
    print(f"{ffn:>7}: {n:,} params, validation loss {ce.mean():.4f} (perplexity "
          f"{np.exp(ce.mean()):.1f}) over {ce.size:,} target tokens of {len(lemmas):,} glosses")

  cfg = model.spec.config.monet
  mass, counts, top = routing(params, model, batches, cfg, len(names), _TOP_TOKENS.value)
  lift = lifts(mass, counts, _MIN_TOKENS.value)
  total = mass.sum(0)
  eligible = np.flatnonzero(total >= total.mean())
  experts = eligible[np.argsort(-lift[:, eligible].max(0))][:_TOP_EXPERTS.value]
  print(f"\nrouting of layer 0 ({cfg.experts ** 2:,} experts, mass = mean weight per token, "
        f"{cfg.heads} per token in all)")
  print_table(experts, mass, lift, top, model.tokenizer, lemmas, names, cfg, int(counts.sum()))

  base_ce, labels = results["monet"]
  print(f"\nknock-out (pieces zeroed in layers 0..{cfg.groups - 1}); Δ = mean token loss after "
        "- before")
  layers = [f"layer_{k}" for k in range(min(cfg.groups, model.spec.config.num_layers))]
  rng = np.random.default_rng(_SEED.value)
  controls = rng.choice(np.setdiff1d(eligible, experts), _KNOCKOUTS.value, replace=False)
  for kind, e in [("table", e) for e in experts[:_KNOCKOUTS.value]] + [("random", e)
                                                                       for e in controls]:
    i, j = divmod(int(e), cfg.experts)
    ko = jax.tree.map(lambda a: a, params)
    for name in layers:
      ko["layers"][name]["moe"] = monet.knock_out(params["layers"][name]["moe"], i, j, cfg)
    ce, _ = token_losses(ko, model, batches)
    delta = ce - base_ce
    tops = np.argsort(-lift[:, e])[:3]
    on_top = np.isin(labels, tops)
    per = ", ".join(f"{names[s]} {delta[labels == s].mean():+.4f}" for s in tops)
    print(f"  {kind:>6} ({i},{j}): top supersenses {per}; Δ on them {delta[on_top].mean():+.4f} "
          f"({on_top.sum():,} tokens) vs others {delta[~on_top].mean():+.4f}; ratio "
          f"{delta[on_top].mean() / delta[~on_top].mean():.2f}")


if __name__ == "__main__":
  app.run(main)
