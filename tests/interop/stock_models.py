"""Stock Flax models, written as in the flax examples and big_vision: no lowrank_jax code inside."""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax import nnx

from experiments import bench_flax


class LinenMLP(nn.Module):
  """flax examples' MLP: Dense layers with a ReLU between them."""
  features: tuple = (24, 16, 5)
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    for i, f in enumerate(self.features[:-1]):
      x = nn.relu(nn.Dense(f, dtype=self.dtype, name=f"Dense_{i}")(x))
    return nn.Dense(self.features[-1], dtype=self.dtype, name="head")(x)


# big_vision's ViT in miniature (patch-embedding Conv, class token, DenseGeneral attention, MLP
# block, LayerNorms, head): the benchmark's model, defined there once.
LinenViT = bench_flax.ViT


class NnxBlock(nnx.Module):
  """A pre-LN transformer block in nnx: MultiHeadAttention (LinearGeneral) and a Linear MLP."""

  def __init__(self, d: int, num_heads: int, mlp_dim: int, *, rngs: nnx.Rngs, dtype=None):
    self.ln1 = nnx.LayerNorm(d, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=num_heads, in_features=d, decode=False,
                                       dtype=dtype, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d, rngs=rngs)
    self.fc1 = nnx.Linear(d, mlp_dim, dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(mlp_dim, d, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    y = self.ln1(x)
    x = x + self.attn(y, y)
    return x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))


class LinenTagger(nn.Module):
  """Embedding, Dense, DenseGeneral over two axes, Einsum and a tied output (`Embed.attend`)."""
  vocab: int = 11
  d: int = 6

  @nn.compact
  def __call__(self, x, ids):
    embed = nn.Embed(self.vocab, self.d, name="embed")
    h = nn.Dense(self.d, name="proj")(x) + embed(ids)
    h = nn.DenseGeneral((2, 3), name="split")(h)
    h = nn.DenseGeneral(self.d, axis=(-2, -1), name="join")(h)
    h = nn.Einsum((self.d, 2, 3), "td,dhk->thk", name="heads")(h)
    return embed.attend(jnp.reshape(h, (h.shape[0], -1)))


class NnxTagger(nnx.Module):
  """nnx counterpart of `LinenTagger`, plus a Conv over the hidden state seen as a 2x3 image."""

  def __init__(self, vocab: int = 11, d: int = 6, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, d, rngs=rngs)
    self.proj = nnx.Linear(5, d, rngs=rngs)
    self.split = nnx.LinearGeneral(d, (2, 3), rngs=rngs)
    self.join = nnx.LinearGeneral((2, 3), d, axis=(-2, -1), rngs=rngs)
    self.heads = nnx.Einsum("td,dhk->thk", (d, 2, 3), rngs=rngs)
    self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)

  def __call__(self, x, ids):
    h = self.proj(x) + self.embed(ids)
    h = self.join(self.split(h))
    h = jnp.reshape(self.heads(h), h.shape)
    return self.embed.attend(h), self.conv(jnp.reshape(h, (-1, 2, 3, 1)))
