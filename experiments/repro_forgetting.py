r"""Reproduces CorDA's forgetting claim (Yang et al., NeurIPS 2024) on MiniLM; see the config.

Run: ``python -m experiments.repro_forgetting --config configs/repro/forgetting.py
--workdir /tmp/forgetting`` (``:runlocal`` for a seconds-long check on a tiny random encoder).

Each run fine-tunes the encoder with one method at one learning rate for one seed (WordNet
supersense classification of glosses) and measures the task accuracy and the synonym probe
(`lowrank_jax.data.semantic_probe_score`: mean cosine gap and ROC AUC of synonym vs random word
pairs from the test split's synsets) of the fine-tuned encoder. The pretrained encoder's probe is
the reference: retention is the probe after fine-tuning against the probe before.

`run(config)` returns the rows and the summary; `write_outputs` writes ``forgetting.csv`` (one
row per method, learning rate and seed), ``summary.json`` (mean ± std over seeds per method and
learning rate) and ``forgetting.png`` (probe AUC and gap against task accuracy, every seed a
point) to the workdir.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import config_flags

import lowrank_jax as lj
from lowrank_jax import calibrate
from lowrank_jax import data
from lowrank_jax import steps
from lowrank_jax import tasks
from lowrank_jax.adapters.corda import corda
from lowrank_jax.models import minilm

# Every linear kernel of the encoder: attention query/key/value/output and the MLP.
TARGETS = (r"encoder/layer_\d+/attention/(query|key|value|output)/kernel",
           r"encoder/layer_\d+/mlp/(intermediate|output)/kernel")
METHODS = ("lora", "corda_kpa", "full")
FIELDS = ("method", "lr", "seed", "accuracy", "gap", "auc", "synonym_cos", "random_cos",
          "pretrained_gap", "pretrained_auc", "delta_gap", "delta_auc", "trainable_params",
          "final_loss", "seconds")


def parse_runs(runs) -> list[tuple[str, float]]:
  """`("lora@1e-4", ...)` -> `[("lora", 1e-4), ...]`; raises ValueError naming the bad entry."""
  out = []
  for run in runs:
    method, sep, lr = run.partition("@")
    if method not in METHODS or not sep:
      raise ValueError(f"config.runs: {run!r} is not METHOD@LR with METHOD in {METHODS}")
    try:
      out.append((method, float(lr)))
    except ValueError:
      raise ValueError(f"config.runs: {run!r}: learning rate {lr!r} is not a number") from None
  return out


def texts_of(src, key: str) -> list[str]:
  """The `key` field of every example of a data source, as str."""
  out = []
  for i in range(len(src)):
    v = src[i][key]
    out.append(v.decode("utf-8") if isinstance(v, bytes) else str(v))
  return out


def lemma_texts(src, n: int) -> list[str]:
  """Up to `n` distinct single-word lemmas of a split, in stored order (CorDA-KPA's knowledge
  data: words of synsets disjoint from the probe's)."""
  seen, out = set(), []
  for i in range(len(src)):
    for w in src[i]["lemmas"]:
      w = (w.decode("utf-8") if isinstance(w, bytes) else str(w)).lower()
      if " " not in w and w not in seen:
        seen.add(w)
        out.append(w)
        if len(out) >= n:
          return out
  return out


def fixed_batches(enc: dict, batch_size: int) -> list[dict]:
  """Batches of one shape (one compile); the last is padded and `valid` marks the real rows."""
  n = len(enc["input_ids"])
  out = []
  for s in range(0, n, batch_size):
    b = {k: v[s:s + batch_size] for k, v in enc.items()}
    m = len(b["input_ids"])
    b["valid"] = np.ones((m,), np.float32)
    if m < batch_size:
      b = {k: np.concatenate([v, np.zeros((batch_size - m,) + v.shape[1:], v.dtype)])
           for k, v in b.items()}
    out.append(b)
  return out


def load_encoder(config):
  """(params, cfg) of the encoder without dropout: the pretrained MiniLM, or (`model="tiny"`) a
  random one of `config.tiny_model`'s shape with MiniLM's vocabulary, for quick checks."""
  if config.model == "pretrained":
    params, cfg = minilm.load_pretrained()
  elif config.model == "tiny":
    cfg = minilm.MiniLMConfig(**config.tiny_model)
    params = minilm.init(jax.random.key(0), cfg)
  else:
    raise ValueError(f"config.model: {config.model!r}; valid: 'pretrained', 'tiny'")
  return params, dataclasses.replace(cfg, dropout_rate=0.0, attention_dropout_rate=0.0)


def make_adapter(method: str, rank: int):
  """The adapter of a method at rank r. LoRA uses alpha = 2r; CorDA-KPA uses alpha = r (s = 1,
  as the official code) and its official factor split; full fine-tuning trains every parameter
  through the head (the adapter is the identity)."""
  if method == "lora":
    return lj.lora(rank, 2.0 * rank, list(TARGETS))
  if method == "corda_kpa":
    return corda(rank, float(rank), list(TARGETS), mode="kpa", gauge="official")
  return lj.identity()


def group_labels(trainable: dict) -> dict:
  """Optimizer group of every trainable leaf: the classifier (the head tree's "head" entry)
  gets its own learning rate, everything else (adapter factors, or the whole encoder under full
  fine-tuning) the method's."""
  labels = {"adapter": jax.tree.map(lambda _: "adapter", trainable["adapter"])}
  labels["head"] = {k: jax.tree.map(lambda _, k=k: "head" if k == "head" else "adapter", v)
                    for k, v in trainable["head"].items()}
  return labels


def make_optimizer(lr: float, head_lr: float, num_steps: int, warmup: int):
  """Clipped Adam with warmup-cosine schedules, `lr` for the method's group, `head_lr` for the
  classifier."""
  sched = lambda peak: optax.warmup_cosine_decay_schedule(0.0, peak, warmup,
                                                          max(num_steps, warmup + 1), 0.0)
  return optax.chain(optax.clip_by_global_norm(1.0), optax.multi_transform(
      {"adapter": optax.adam(sched(lr)), "head": optax.adam(sched(head_lr))}, group_labels))


class Setup:
  """The encoder, tokenized task data, probe pairs, knowledge statistics and jitted metrics
  shared by every run (built once per process)."""

  def __init__(self, config):
    self.config = config
    self.params, self.cfg = load_encoder(config)
    self.num_classes = data.num_classes("wordnet_supersense")
    tok = minilm.load_tokenizer(config.seq_len)
    self.word_tok = minilm.load_tokenizer(config.word_len)
    train_src = data.load("wordnet_supersense", f"train[:{config.train_examples}]")
    eval_src = data.load("wordnet_supersense", f"validation[:{config.eval_examples}]")
    self.train = minilm.tokenize(tok, texts_of(train_src, "gloss"))
    self.train["label"] = np.asarray([int(train_src[i]["label"]) for i in range(len(train_src))],
                                     np.int32)
    ev = minilm.tokenize(tok, texts_of(eval_src, "gloss"))
    ev["label"] = np.asarray([int(eval_src[i]["label"]) for i in range(len(eval_src))], np.int32)
    self.num_eval = len(ev["label"])
    self.eval_batches = fixed_batches(ev, config.eval_batch_size)
    self.synonyms, self.randoms = data.probe_pairs("test", num_pairs=config.probe_pairs,
                                                   seed=config.probe_seed)
    cfg = self.cfg
    self._correct = jax.jit(lambda p, b: jnp.sum(
        (jnp.argmax(minilm.classify(p, cfg, b), -1) == b["label"]) * b["valid"]))
    self._embed = jax.jit(lambda p, b: minilm.sentence_embedding(p, cfg, b["input_ids"],
                                                                 b["attention_mask"]))
    self.kpa_stats = None
    if any(m == "corda_kpa" for m, _ in parse_runs(config.runs)):
      words = lemma_texts(data.load("wordnet_supersense", "train"), config.calib_texts)
      apply_enc = lambda p, b: minilm.encode(p, cfg, b["input_ids"], b["attention_mask"])
      self.kpa_stats = calibrate.collect(
          apply_enc, self.params, fixed_batches(minilm.tokenize(self.word_tok, words), 128),
          list(TARGETS), mask_key="attention_mask", sample_scale="corda")

  def accuracy(self, params) -> float:
    """Validation accuracy of the classifier."""
    return float(sum(self._correct(params, b) for b in self.eval_batches)) / self.num_eval

  def probe(self, params) -> dict:
    """The synonym probe of the encoder's mean-pooled embeddings of single words."""
    def embed_fn(words):
      bs = fixed_batches(minilm.tokenize(self.word_tok, words), 200)
      return np.concatenate([np.asarray(self._embed(params, b)) for b in bs])[:len(words)]
    return data.semantic_probe_score(embed_fn, self.synonyms, self.randoms)


def fine_tune(setup: Setup, method: str, lr: float, seed: int) -> dict:
  """Fine-tunes with one method and learning rate for one seed (head init, adapter init and
  batch order); returns the task accuracy and probe of the fine-tuned model."""
  c, t0 = setup.config, time.perf_counter()
  params = minilm.add_classifier_head(jax.random.key(seed), setup.params, setup.num_classes)
  adapter = make_adapter(method, c.rank)
  stats = setup.kpa_stats if method == "corda_kpa" else None
  base, state = adapter.init(jax.random.key(seed + 1), params, stats)
  head = params if method == "full" else {"head": params["head"]}
  tx = make_optimizer(lr, c.head_lr, c.steps, c.warmup_steps)
  classification = tasks.get_task("classification")
  task_loss = lambda p, b, rng: classification.loss(minilm.classify(p, setup.cfg, b), b)
  train_state = steps.init_train_state(state, tx, head=head)
  step = steps.make_train_step(adapter, task_loss, tx)
  n = len(setup.train["label"])
  rng = np.random.default_rng(seed)
  order = np.concatenate([rng.permutation(n) for _ in range(c.steps * c.batch_size // n + 1)])
  losses = []
  for i in range(c.steps):
    idx = order[i * c.batch_size:(i + 1) * c.batch_size]
    train_state, metrics = step(train_state, base, {k: v[idx] for k, v in setup.train.items()})
    losses.append(float(metrics["loss"]))
  tuned = lj.merge(steps.adapted_params(adapter, base, steps.adapter_state(train_state),
                                        train_state["head"]))
  trainable = lj.count_params({"a": train_state["adapter"], "h": train_state["head"]})
  return {"method": method, "lr": lr, "seed": seed, "accuracy": setup.accuracy(tuned),
          **setup.probe(tuned), "trainable_params": trainable,
          "final_loss": float(np.mean(losses[-10:])), "seconds": time.perf_counter() - t0}


def mean_std(values) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for a single value)."""
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def summarize(rows: list[dict], pretrained: dict) -> dict:
  """Mean ± std over seeds of every metric per method@lr, and the pretrained probe."""
  groups = {}
  for r in rows:
    groups.setdefault(f"{r['method']}@{r['lr']:g}", []).append(r)
  out = {"pretrained": pretrained, "runs": {}}
  for name, rs in groups.items():
    out["runs"][name] = {"seeds": [r["seed"] for r in rs]}
    for k in ("accuracy", "gap", "auc", "delta_gap", "delta_auc"):
      m, s = mean_std([r[k] for r in rs])
      out["runs"][name][k] = {"mean": m, "std": s}
  return out


def read_rows(path: str) -> list[dict]:
  """Rows of a `forgetting.csv` written earlier, numbers parsed."""
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  ints = ("seed", "trainable_params")
  return [{k: (v if k == "method" else int(v) if k in ints else float(v)) for k, v in r.items()}
          for r in rows]


def merge(rows: list[dict]) -> dict:
  """The result of rows measured by separate runs of one setup (e.g. one process per seed);
  the pretrained probe is read from the rows and must agree between them."""
  if not rows:
    raise ValueError("merge: no rows (pass --earlier_csv)")
  pre = {(r["pretrained_gap"], r["pretrained_auc"]) for r in rows}
  if len(pre) != 1:
    raise ValueError(f"merge: the rows come from different setups (pretrained probes {pre})")
  (gap, auc), = pre
  return {"rows": rows, "summary": summarize(rows, {"gap": gap, "auc": auc})}


def run(config, partial_csv: str | None = None, earlier: list[dict] | None = None) -> dict:
  """Every run of `config.runs` for every seed (seed by seed, so that an interrupted run has
  every method of its first seeds). Returns {"rows", "summary"}.

  Args:
    config: the config (`configs/repro/forgetting.py`).
    partial_csv: if given, the rows are rewritten there after every run.
    earlier: rows of an earlier run of the same setup (other learning rates), summarized with
      this run's.
  """
  runs = parse_runs(config.runs)
  t0 = time.perf_counter()
  setup = Setup(config)
  pretrained = setup.probe(setup.params)
  print(f"pretrained encoder: gap {pretrained['gap']:.4f} auc {pretrained['auc']:.4f} "
        f"({len(setup.synonyms)} + {len(setup.randoms)} pairs); setup "
        f"{time.perf_counter() - t0:.0f} s", flush=True)
  rows = list(earlier or [])
  for seed in config.seeds:
    for method, lr in runs:
      r = fine_tune(setup, method, lr, seed)
      r.update(pretrained_gap=pretrained["gap"], pretrained_auc=pretrained["auc"],
               delta_gap=r["gap"] - pretrained["gap"], delta_auc=r["auc"] - pretrained["auc"])
      rows.append({k: r[k] for k in FIELDS})
      print(f"seed {seed} {method}@{lr:g}: acc {r['accuracy']:.4f} gap {r['gap']:.4f} "
            f"({r['delta_gap']:+.4f}) auc {r['auc']:.4f} ({r['delta_auc']:+.4f}) loss "
            f"{r['final_loss']:.3f}, {r['seconds']:.0f} s", flush=True)
      if partial_csv:
        write_csv(partial_csv, rows)
  summary = summarize(rows, pretrained)
  summary["seconds"] = time.perf_counter() - t0
  return {"rows": rows, "summary": summary}


def write_csv(path: str, rows: list[dict]) -> None:
  """The rows as CSV (FIELDS columns)."""
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=FIELDS)
    w.writeheader()
    w.writerows(rows)


def write_outputs(workdir: str, config, result: dict) -> list[str]:
  """Writes the CSV, the summary JSON and the PNG; returns their paths."""
  os.makedirs(workdir, exist_ok=True)
  csv_path = os.path.join(workdir, "forgetting.csv")
  write_csv(csv_path, result["rows"])
  json_path = os.path.join(workdir, "summary.json")
  with open(json_path, "w") as f:
    json.dump({"config": config.to_dict(), "summary": result["summary"]}, f, indent=1)
  png_path = os.path.join(workdir, "forgetting.png")
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  colors = dict(zip(METHODS, ("tab:blue", "tab:red", "tab:green")))
  markers = "osD^vP*X"
  pre = result["summary"]["pretrained"]
  for ax, metric in zip(axes, ("auc", "gap")):
    lrs = {}
    for r in result["rows"]:
      lrs.setdefault(r["method"], [])
      if r["lr"] not in lrs[r["method"]]:
        lrs[r["method"]].append(r["lr"])
    for method, method_lrs in lrs.items():
      for j, lr in enumerate(sorted(method_lrs)):
        pts = [(r["accuracy"], r[metric]) for r in result["rows"]
               if r["method"] == method and r["lr"] == lr]
        ax.scatter(*zip(*pts), color=colors[method], marker=markers[j % len(markers)],
                   label=f"{method} lr {lr:g}", alpha=0.8)
    ax.axhline(pre[metric], color="k", ls=":", lw=1, label="pretrained encoder")
    ax.set(xlabel="task accuracy (WordNet supersense, validation)",
           ylabel=f"synonym probe {metric}", title=f"retention ({metric}) vs task accuracy")
  axes[0].legend(fontsize=7)
  fig.suptitle(f"MiniLM, rank {config.rank}, {config.steps} steps; every point a seed",
               fontsize=9)
  fig.tight_layout()
  fig.savefig(png_path, dpi=110)
  plt.close(fig)
  return [csv_path, json_path, png_path]


def main(argv):
  del argv
  config = flags.FLAGS.config
  os.makedirs(flags.FLAGS.workdir, exist_ok=True)
  earlier = [r for p in flags.FLAGS.earlier_csv for r in read_rows(p)]
  if flags.FLAGS.merge_only:
    result = merge(earlier)
  else:
    result = run(config, os.path.join(flags.FLAGS.workdir, "partial.csv"), earlier)
  for path in write_outputs(flags.FLAGS.workdir, config, result):
    print("wrote", path)
  print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
  # Flags are defined here, not at import, so that `run` can be imported next to other modules
  # that define `--config`.
  config_flags.DEFINE_config_file("config", None, "configs/repro/forgetting.py[:arg]",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Output directory (CSV, JSON, PNG).")
  flags.DEFINE_bool("merge_only", False, "Train nothing: write the outputs of --earlier_csv "
                    "(runs of the same setup in separate processes, e.g. one per seed).")
  flags.DEFINE_list("earlier_csv", [], "forgetting.csv files of earlier runs of the same setup "
                    "(other learning rates) to include in the summary and plot.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
