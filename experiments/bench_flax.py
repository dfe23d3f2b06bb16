"""Step-time benchmark on a stock linen ViT: factored LoRA vs merged LoRA vs full fine-tuning.

    python -m experiments.bench_flax [--preset small] [--batch 16] [--rank 8] [--rounds 5]

The model is big_vision's ViT written with stock `flax.linen` layers (patch-embedding Conv, class
token, pre-LN blocks with `nn.MultiHeadDotProductAttention`, MLP block, head); it has no
lowrank_jax code. LoRA of rank r sits on every attention (query/key/value/out DenseGeneral) and MLP
(Dense) kernel; the head is trained fully in every mode. Modes, one AdamW train step each
(`lowrank_jax.steps.make_train_step`, fp32, random images and labels):
  lora_factored  the stock model through `lj.interop.linen_apply` (structured weights, factored)
  lora_merged    the stock model on `lj.merge(params)` (dense W + ΔW formed every step)
  full_ft        every parameter trained
Timed round-robin in one process and reported as medians and ratios to full fine-tuning (ratio of
medians, and the median and range of the per-round ratio), as `experiments.bench` does. Printed
lines are JSON.
It first calls `lowrank_jax.host_memory.reuse_host_memory`, as the runner does
(`--per_step_host_memory` skips it).
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lowrank_jax as lj
from experiments import bench
from lowrank_jax import steps
from lowrank_jax import tasks

ATTENTION_AND_MLP = (r".*/(MultiHeadDotProductAttention_0/(query|key|value|out)"
                     r"|MlpBlock_0/Dense_\d)/kernel")
KERNEL_AXES = {r".*/(query|key|value)/kernel": 1, r".*/out/kernel": 2}
CLASSIFICATION = tasks.get_task("classification")

# width, depth, heads, mlp_dim, image size, patch, classes
PRESETS = {
    "tiny": dict(width=16, depth=1, num_heads=2, mlp_dim=32, image=8, patch=4, num_classes=5),
    "small": dict(width=192, depth=6, num_heads=3, mlp_dim=768, image=64, patch=8,
                  num_classes=10),
    "ti16": dict(width=192, depth=12, num_heads=3, mlp_dim=768, image=224, patch=16,
                 num_classes=1000),
}


class MlpBlock(nn.Module):
  mlp_dim: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x = nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype, name="Dense_0")(x))
    return nn.Dense(d, dtype=self.dtype, name="Dense_1")(x)


class Encoder1DBlock(nn.Module):
  mlp_dim: int
  num_heads: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype,
                                        name="MultiHeadDotProductAttention_0")(y, y)
    x = x + y
    y = nn.LayerNorm(dtype=self.dtype)(x)
    return x + MlpBlock(self.mlp_dim, dtype=self.dtype, name="MlpBlock_0")(y)


class ViT(nn.Module):
  """big_vision's ViT with stock linen layers: patch-embedding Conv, class token, learned position
  embedding, pre-LN encoder blocks (DenseGeneral attention, MLP block), final LayerNorm, head."""
  num_classes: int = 7
  patch: int = 4
  width: int = 12
  depth: int = 1
  mlp_dim: int = 20
  num_heads: int = 2
  dtype: Any = None

  @nn.compact
  def __call__(self, image):
    x = nn.Conv(self.width, (self.patch, self.patch), strides=(self.patch, self.patch),
                padding="VALID", dtype=self.dtype, name="embedding")(image)
    n, h, w, c = x.shape
    x = jnp.reshape(x, (n, h * w, c))
    cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
    x = jnp.concatenate([jnp.tile(cls, (n, 1, 1)).astype(x.dtype), x], axis=1)
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, h * w + 1, c))
    for i in range(self.depth):
      x = Encoder1DBlock(self.mlp_dim, self.num_heads, dtype=self.dtype,
                         name=f"encoderblock_{i}")(x)
    x = nn.LayerNorm(name="encoder_norm")(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x[:, 0])


def build(preset: str, batch: int, seed: int = 0):
  """(model, params, batch of random images and labels) of a preset."""
  p = dict(PRESETS[preset])
  image = p.pop("image")
  model = ViT(**p)
  rng = np.random.default_rng(seed)
  data = {"image": jnp.asarray(rng.normal(size=(batch, image, image, 3)), jnp.float32),
          "label": jnp.asarray(rng.integers(0, p["num_classes"], (batch,)), jnp.int32)}
  params = model.init(jax.random.key(seed), data["image"][:1])["params"]
  return model, params, data


def task_loss(model, mode: str) -> steps.TaskLoss:
  def loss(params, batch, rng):
    del rng   # deterministic steps
    if mode == "lora_factored":
      logits = lj.interop.linen_apply(model, {"params": params}, batch["image"])
    else:
      logits = model.apply({"params": lj.merge(params)}, batch["image"])
    return CLASSIFICATION.loss(logits, batch)
  return loss


def make_run(model, params, opt, mode: str, rank: int):
  """(run, trainable params): `run(batch)` takes one train step of `mode` and returns the loss."""
  if mode == "full_ft":
    adapter, base, state, head = lj.identity(), params, lj.AdapterState({}, {}), params
  else:
    adapter = lj.lora(rank, targets=ATTENTION_AND_MLP, kernel_axes=KERNEL_AXES)
    base, state = adapter.init(jax.random.key(0), params)
    head = {"head": params["head"]}
  step = steps.make_train_step(adapter, task_loss(model, mode), opt)
  holder = [steps.init_train_state(state, opt, head=head)]

  def run(batch):
    holder[0], metrics = step(holder[0], base, batch)
    return metrics["loss"]
  return run, lj.count_params(state) + lj.tree.tree_size(head)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--preset", default="small", choices=tuple(PRESETS))
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--rank", type=int, default=8)
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--steps", type=int, default=3, help="timed steps per mode per round")
  bench.add_host_memory_flag(ap)
  args = ap.parse_args(argv)
  bench.setup_host_memory(args)

  model, params, batch = build(args.preset, args.batch)
  opt = optax.adamw(1e-4, weight_decay=0.01)
  modes = {m: make_run(model, params, opt, m, args.rank)
           for m in ("full_ft", "lora_factored", "lora_merged")}
  print(json.dumps({"device": str(jax.devices()[0]), "backend": jax.default_backend(),
                    "model": f"stock linen ViT ({args.preset}: {PRESETS[args.preset]})",
                    "batch": args.batch, "rank": args.rank,
                    "params": int(lj.tree.tree_size(params))}))
  warmup_s = {}
  for name, (run, _) in modes.items():
    t0 = time.perf_counter()
    for _ in range(2):
      jax.block_until_ready(run(batch))
    warmup_s[name] = time.perf_counter() - t0
  times, _ = bench.time_round_robin({k: run for k, (run, _) in modes.items()}, batch,
                                    args.rounds, args.steps)
  full = float(np.median(times["full_ft"]))
  paired = bench.paired_ratios(times, "full_ft", args.steps)
  merged_paired = bench.paired_ratios(times, "lora_merged", args.steps)
  for name, (_, n_train) in modes.items():
    ms = 1e3 * float(np.median(times[name]))
    print(json.dumps({"mode": name, "ms_per_step": round(ms, 2),
                      "ratio_to_full_ft": round(ms / (1e3 * full), 3),
                      **bench.paired_fields(paired[name]),
                      "paired_ratio_to_merged": round(merged_paired[name][0], 3),
                      "trainable_params": int(n_train),
                      "warmup_s": round(warmup_s[name], 1)}))


if __name__ == "__main__":
  main()
