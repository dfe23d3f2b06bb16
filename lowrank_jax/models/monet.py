r"""Monet: a sparse mixture of E² monosemantic experts built from E + E pieces (Park et al., 2025).

The layer replaces a transformer's FFN. Two product-key routers pick, per head h, a sparse
distribution `g1[h, :]` over E "first" pieces and `g2[h, :]` over E "second" pieces; expert (i, j)
is assembled from first piece i and second piece j and weighs `Σ_h g1[h, i] g2[h, j]`. Expert
(i, j) is number `i·E + j` of the E² experts (the row-major flatten of the outer product
`g1[h, :] ⊗ g2[h, :]`, see `expert_weights`). The weighted sum over all E² experts collapses,
using `Σ_i g1[h, i] = Σ_j g2[h, j] = 1`, into a few einsums over E pieces, so parameters and
compute grow as O(E) while experts number E².

Router (`route`), per token x ∈ R^d, computed in float32:

  z1 = x W1, z2 = x W2 ∈ R^{H×E} (no bias); n1, n2 = batch normalisation of z1, z2 without affine
  parameters, one mean and variance per head over tokens × experts; the threshold of head h is
  τ_h = min(max_e n[h, e], Φ⁻¹(1 − K/E)) (Φ the standard normal CDF, so about K experts per head
  pass in expectation, and at least the arg-max always does); g = softmax over e of z[h, e]
  masked to the experts with n[h, e] ≥ τ_h (the softmax reads the raw logits z, the mask the
  normalised ones n).

Experts (`experts`), with act one of `ACTIVATIONS` (all with act(0) = 0, so zeroed pieces output
nothing):

  horizontal (HD): u_i = act(x U_i + c_i) ∈ R^m; expert(i, j) = V_j u_i + b_j. Pieces: first i =
    (U_i, c_i), second j = (V_j, b_j).
  vertical (VD): u1_i = act(x U1_i + c1_i), u2_j = act(x U2_j + c2_j) ∈ R^{m/2};
    expert(i, j) = [V11_i u1_i + V12_i u2_j + b1_i ; V21_j u1_i + V22_j u2_j + b2_j] (two halves
    of size d/2). Pieces: first i = (U1_i, c1_i, V11_i, V12_i, b1_i), second j = (U2_j, c2_j,
    V21_j, V22_j, b2_j).

Both hold `2·d·E·m + E·m + E·d` parameters per layer (`num_params`); a router holds `2·d·H·E` and
exists only in the layers whose index is a multiple of `groups`; the next `groups − 1` layers reuse
its gates (`has_router`, `apply_layer`). Parameter paths (kernels `(d_in, d_out)`, the piece index
major in the flattened E·m axis)::

  router/{w1,w2}/kernel                     (d, H·E)
  moe/u/{kernel,bias}, moe/v/kernel, moe/b  HD: (d, E·m), (E·m,), (E·m, d), (E, d)
  moe/{u1,u2}/{kernel,bias}                 VD: (d, E·m/2), (E·m/2,)
  moe/{v11,v12,v21,v22}/kernel, moe/{b1,b2} VD: (E·m/2, d/2), (E, d/2)

Choices where the reference leaves room: weights ~ N(0, 0.02²) and biases 0 (Llama-style init);
normalisation eps 1e-5 and momentum 0.1 (running mean/variance update, unbiased batch variance,
as `torch.nn.BatchNorm1d`); the statistics count every token given, padding included. The
batch-normalisation statistics are explicit state: `route(..., state=None)` normalises with the
batch's statistics and returns no state; with a state (`init_norm_state`), `train=True` uses the
batch's statistics and returns the updated running statistics, `train=False` uses the running
ones. Batch statistics in a causal LM let a token's routing depend, through one mean and variance
per head, on the other tokens of the batch (later ones included), as in the paper's training.

In the Llama decoder (`llama.LlamaConfig(ffn="monet", monet=...)`) the layer reads the
post-attention-normalised hidden state; the router of layer r reads that of layer r, and layers
r + 1 .. r + groups − 1 reuse its gates. The decoder normalises with batch statistics in training
and in eval alike: the project's train step carries no model state besides the trained params, so
this keeps the decoder a pure function of (params, batch). Its eval outputs therefore depend
(slightly) on the batch they are computed in, and a cached decode step of one token a row
normalises over those few tokens only. The router trains with everything else; the paper's
auxiliary routing losses are not implemented.

>>> import jax, jax.numpy as jnp
>>> cfg = MonetConfig(experts=16, heads=2, topk=4, dim=4, groups=1)
>>> p = init_layer(jax.random.key(0), 0, 8, cfg)
>>> y, gates = apply_layer(p, jnp.ones((2, 3, 8)), None, cfg)
>>> y.shape, gates[0].shape
((2, 3, 8), (2, 3, 2, 16))
>>> num_params(4096, MonetConfig())   # E = 512: 262,144 experts per layer
{'experts': 35655680, 'router': 33554432}
"""
from __future__ import annotations

import dataclasses
import statistics
from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax import structured
from lowrank_jax.models import _layers as L

DECOMPOSITIONS = ("horizontal", "vertical")
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),     # squared ReLU, the reference's default
    "silu": jax.nn.silu,
    "gelu": jax.nn.gelu,
}
Gates = tuple[jax.Array, jax.Array]


@dataclasses.dataclass(frozen=True)
class MonetConfig:
  """Monet layer hyperparameters (defaults: the paper's, E = 512, i.e. 262,144 experts a layer).

  Attributes:
    experts: E, pieces per router side (E² experts).
    heads: H, router heads (each picks its own sparse g1, g2).
    topk: K, experts per head that pass the threshold in expectation (1 <= K <= E; K = E routes
      densely).
    dim: m, hidden size of one piece (HD), of the two halves together (VD: m/2 each; even).
    groups: a router every `groups` layers (index % groups == 0), reused by the layers after it.
    decompose: "horizontal" (HD) or "vertical" (VD).
    activation: one of `ACTIVATIONS`.
    norm_momentum: running-statistics update rate, in (0, 1].
    norm_eps: added to the variance (> 0).
  """
  experts: int = 512
  heads: int = 8
  topk: int = 32
  dim: int = 8
  groups: int = 4
  decompose: str = "vertical"
  activation: str = "relu2"
  norm_momentum: float = 0.1
  norm_eps: float = 1e-5

  def __post_init__(self):
    for f in ("experts", "heads", "topk", "dim", "groups"):
      value = getattr(self, f)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"MonetConfig.{f} must be a positive integer, got {value!r}")
    if self.topk > self.experts:
      raise ValueError(f"MonetConfig.topk={self.topk} must be <= experts={self.experts}")
    L.check_choice("MonetConfig.decompose", self.decompose, DECOMPOSITIONS)
    L.check_choice("MonetConfig.activation", self.activation, ACTIVATIONS)
    if self.decompose == "vertical" and self.dim % 2:
      raise ValueError(f"MonetConfig.dim={self.dim} must be even with decompose='vertical' (two "
                       "halves of dim/2)")
    if not 0 < self.norm_momentum <= 1:
      raise ValueError(f"MonetConfig.norm_momentum must be in (0, 1], got {self.norm_momentum}")
    if not self.norm_eps > 0:
      raise ValueError(f"MonetConfig.norm_eps must be > 0, got {self.norm_eps}")

  @property
  def threshold(self) -> float:
    """Φ⁻¹(1 − K/E), the normalised-logit threshold (−inf when K = E)."""
    if self.topk == self.experts:
      return -float("inf")
    return statistics.NormalDist().inv_cdf(1.0 - self.topk / self.experts)


def check_hidden_size(cfg: MonetConfig, hidden_size: int) -> None:
  """Raises ValueError when `hidden_size` does not suit `cfg` (VD splits it in two halves)."""
  if cfg.decompose == "vertical" and hidden_size % 2:
    raise ValueError(f"hidden_size={hidden_size} must be even for a Monet layer with "
                     "decompose='vertical' (two output halves of hidden_size/2)")


def num_params(hidden_size: int, cfg: MonetConfig) -> dict[str, int]:
  """{"experts": 2·d·E·m + E·m + E·d (per layer), "router": 2·d·H·E (per router)}."""
  d, e, m = hidden_size, cfg.experts, cfg.dim
  return {"experts": 2 * d * e * m + e * m + e * d, "router": 2 * d * cfg.heads * e}


def scaling_table(hidden_size: int, cfg: MonetConfig,
                  experts: tuple[int, ...] = (16, 32, 64, 128, 256, 512)) -> list[dict]:
  """Rows {E, experts (E²), params (counted from the initialised shapes), formula, router} per E
  in `experts` (the other fields from `cfg`), printed as a table: parameters grow as O(E) while
  experts number E²."""
  rows = []
  for e in experts:
    c = dataclasses.replace(cfg, experts=e, topk=min(cfg.topk, e))
    shapes = jax.eval_shape(lambda c=c: init_layer(jax.random.key(0), 0, hidden_size, c))
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    rows.append({"E": e, "experts": e * e, "params": count(shapes["moe"]),
                 "formula": num_params(hidden_size, c)["experts"],
                 "router": count(shapes["router"])})
  print(f"{'E':>5} {'experts/layer':>14} {'params/layer':>13} {'2dEm+Em+Ed':>11} "
        f"{'router (2dHE)':>14}")
  for r in rows:
    print(f"{r['E']:>5} {r['experts']:>14,} {r['params']:>13,} {r['formula']:>11,} "
          f"{r['router']:>14,}")
  return rows


def has_router(layer: int, cfg: MonetConfig) -> bool:
  """Whether decoder layer `layer` holds a router (else it reuses the last router's gates)."""
  return layer % cfg.groups == 0


# ---------------------------------------------------------------------------------------------
# Init.
# ---------------------------------------------------------------------------------------------

def init_router(key: jax.Array, hidden_size: int, cfg: MonetConfig, dtype=jnp.float32,
                std: float = 0.02) -> dict:
  """Router params: the two product-key projections `w1`, `w2`, dense layers without bias from
  hidden to heads * experts, normal with std `std`."""
  k1, k2 = jax.random.split(key)
  width = cfg.heads * cfg.experts
  return {"w1": L.dense_init(k1, hidden_size, width, bias=False, std=std, dtype=dtype),
          "w2": L.dense_init(k2, hidden_size, width, bias=False, std=std, dtype=dtype)}


def init_norm_state(cfg: MonetConfig) -> dict:
  """Running statistics (mean 0, variance 1, per head) of both routers' normalisations."""
  stats = {"mean": jnp.zeros((cfg.heads,), jnp.float32),
           "var": jnp.ones((cfg.heads,), jnp.float32)}
  return {"norm1": stats, "norm2": dict(stats)}


def init_experts(key: jax.Array, hidden_size: int, cfg: MonetConfig, dtype=jnp.float32,
                 std: float = 0.02) -> dict:
  """Expert pieces of one layer (normal with std `std`, biases at zero), in the layout of
  `cfg.decompose`."""
  check_hidden_size(cfg, hidden_size)
  d, e, m = hidden_size, cfg.experts, cfg.dim
  lin = lambda k, i, o, bias: L.dense_init(k, i, o, bias=bias, std=std, dtype=dtype)
  if cfg.decompose == "horizontal":
    ku, kv = jax.random.split(key)
    return {"u": lin(ku, d, e * m, True), "v": lin(kv, e * m, d, False),
            "b": jnp.zeros((e, d), dtype)}
  ks = jax.random.split(key, 6)
  half = e * m // 2
  return {"u1": lin(ks[0], d, half, True), "u2": lin(ks[1], d, half, True),
          **{name: lin(k, half, d // 2, False)
             for name, k in zip(("v11", "v12", "v21", "v22"), ks[2:])},
          "b1": jnp.zeros((e, d // 2), dtype), "b2": jnp.zeros((e, d // 2), dtype)}


def init_layer(key: jax.Array, layer: int, hidden_size: int, cfg: MonetConfig,
               dtype=jnp.float32) -> dict:
  """{"moe": experts} plus {"router": ...} when `has_router(layer, cfg)`."""
  k_moe, k_router = jax.random.split(key)
  p = {"moe": init_experts(k_moe, hidden_size, cfg, dtype)}
  if has_router(layer, cfg):
    p["router"] = init_router(k_router, hidden_size, cfg, dtype)
  return p


# ---------------------------------------------------------------------------------------------
# Router.
# ---------------------------------------------------------------------------------------------

def _normalize(z: jax.Array, stats: Optional[dict], train: bool, cfg: MonetConfig):
  """(normalised z (..., H, E), updated running stats or None): statistics per head."""
  axes = tuple(a for a in range(z.ndim) if a != z.ndim - 2)
  if stats is None or train:
    mean, var = jnp.mean(z, axis=axes), jnp.var(z, axis=axes)
  else:
    mean, var = stats["mean"], stats["var"]
  n = (z - mean[:, None]) * jax.lax.rsqrt(var[:, None] + cfg.norm_eps)
  if stats is None or not train:
    return n, stats
  count = z.size // z.shape[-2]
  unbiased = var * count / max(count - 1, 1)
  mom = cfg.norm_momentum
  return n, {"mean": (1 - mom) * stats["mean"] + mom * jax.lax.stop_gradient(mean),
             "var": (1 - mom) * stats["var"] + mom * jax.lax.stop_gradient(unbiased)}


def _gates(z: jax.Array, n: jax.Array, cfg: MonetConfig) -> jax.Array:
  tau = jnp.minimum(jnp.max(n, axis=-1, keepdims=True), cfg.threshold)
  return jax.nn.softmax(jnp.where(n >= tau, z, -jnp.inf), axis=-1)


def route(p: dict, x: jax.Array, cfg: MonetConfig, *, state: Optional[dict] = None,
          train: bool = False) -> tuple[jax.Array, jax.Array, Optional[dict]]:
  """(g1, g2, new state): float32 gates (..., H, E) of tokens x (..., d).

  Args:
    p: router params {"w1", "w2"}.
    x: tokens, any leading shape (the statistics run over all of it).
    cfg: the layer config.
    state: running statistics (`init_norm_state`); None: batch statistics, no state.
    train: with a state, normalise with the batch's statistics and update the state (else read
      the running statistics and return the state unchanged).
  """
  xf = x.astype(jnp.float32)
  shape = (*x.shape[:-1], cfg.heads, cfg.experts)
  out = []
  for k in ("1", "2"):
    z = L.dense(p[f"w{k}"], xf).astype(jnp.float32).reshape(shape)
    n, stats = _normalize(z, None if state is None else state[f"norm{k}"], train, cfg)
    out.append((_gates(z, n, cfg), stats))
  (g1, s1), (g2, s2) = out
  return g1, g2, None if state is None else {"norm1": s1, "norm2": s2}


def expert_weights(g1: jax.Array, g2: jax.Array) -> jax.Array:
  """Weights (..., E, E) of the E² experts, `[..., i, j] = Σ_h g1[h, i] g2[h, j]` (expert i·E + j
  after a row-major reshape to (..., E²))."""
  return jnp.einsum("...hi,...hj->...ij", g1, g2)


# ---------------------------------------------------------------------------------------------
# Experts: the collapsed forward.
# ---------------------------------------------------------------------------------------------

def _pieces(p: dict, name: str, x: jax.Array, cfg: MonetConfig) -> jax.Array:
  """act(x U + c) split per piece: (..., E, width)."""
  h = ACTIVATIONS[cfg.activation](L.dense(p[name], x))
  return h.reshape(*h.shape[:-1], cfg.experts, -1)


def _flat(x: jax.Array) -> jax.Array:
  return x.reshape(*x.shape[:-2], -1)


def experts(p: dict, x: jax.Array, g1: jax.Array, g2: jax.Array, cfg: MonetConfig) -> jax.Array:
  """Σ_h Σ_{i,j} g1[h,i] g2[h,j] expert_ij(x), collapsed. x (..., d), g1/g2 (..., H, E)."""
  g1, g2 = g1.astype(x.dtype), g2.astype(x.dtype)
  if cfg.decompose == "horizontal":
    u = _pieces(p, "u", x, cfg)                                   # (..., E, m)
    mixed = jnp.einsum("...hj,...hm->...jm", g2, jnp.einsum("...im,...hi->...hm", u, g1))
    return L.dense(p["v"], _flat(mixed)) + jnp.einsum("...hj,jd->...d", g2, p["b"])
  u1, u2 = _pieces(p, "u1", x, cfg), _pieces(p, "u2", x, cfg)     # (..., E, m/2)
  a1 = jnp.einsum("...im,...hi->...hm", u1, g1)                   # Σ_i g1[h, i] u1_i
  a2 = jnp.einsum("...jm,...hj->...hm", u2, g2)                   # Σ_j g2[h, j] u2_j
  top = (L.dense(p["v11"], _flat(jnp.einsum("...im,...hi->...im", u1, g1)))
         + L.dense(p["v12"], _flat(jnp.einsum("...hm,...hi->...im", a2, g1)))
         + jnp.einsum("...hi,id->...d", g1, p["b1"]))
  bottom = (L.dense(p["v21"], _flat(jnp.einsum("...hm,...hj->...jm", a1, g2)))
            + L.dense(p["v22"], _flat(jnp.einsum("...jm,...hj->...jm", u2, g2)))
            + jnp.einsum("...hj,jd->...d", g2, p["b2"]))
  return jnp.concatenate([top, bottom], axis=-1)


def apply_layer(p: dict, x: jax.Array, gates: Optional[Gates],
                cfg: MonetConfig) -> tuple[jax.Array, Gates]:
  """(output, gates) of one decoder layer's Monet FFN: its own router's gates (batch statistics)
  when `p` holds a router, else `gates`, those of the last layer that had one.

  Raises:
    ValueError: the layer has no router and no gates are given.
  """
  if "router" in p:
    gates = route(p["router"], x, cfg)[:2]
  elif gates is None:
    raise ValueError("a Monet layer without a router needs the gates of an earlier layer (the "
                     "first layer must hold a router)")
  return experts(p["moe"], x, *gates, cfg), gates


# ---------------------------------------------------------------------------------------------
# Inspection: router inputs of a model, knock-out.
# ---------------------------------------------------------------------------------------------

_FIRST = {"horizontal": {"u": "cols"},
          "vertical": {"u1": "cols", "v11": "rows", "v12": "rows", "b1": "rows"}}
_SECOND = {"horizontal": {"v": "rows", "b": "rows"},
           "vertical": {"u2": "cols", "v21": "rows", "v22": "rows", "b2": "rows"}}


def _zero_piece(moe: dict, piece: int, where: dict, cfg: MonetConfig) -> dict:
  moe = jax.tree.map(lambda a: a, moe)          # a new tree; arrays are immutable
  for name, axis in where.items():
    leaf = moe[name]
    if isinstance(leaf, dict):                  # a dense layer: kernel (+ bias)
      leaf = dict(leaf)
      width = leaf["kernel"].shape[1 if axis == "cols" else 0] // cfg.experts
      sl = slice(piece * width, (piece + 1) * width)
      kernel = leaf["kernel"]
      leaf["kernel"] = (kernel.at[:, sl] if axis == "cols" else kernel.at[sl]).set(0)
      if "bias" in leaf and axis == "cols":
        leaf["bias"] = leaf["bias"].at[sl].set(0)
      moe[name] = leaf
    else:                                       # a per-piece bias (E, d)
      moe[name] = leaf.at[piece].set(0)
  return moe


def knock_out(moe: dict, first: int, second: int, cfg: MonetConfig) -> dict:
  """Expert (first, second) removed by zeroing its two pieces (every expert that shares a piece
  with it loses that piece too: experts share pieces, so no parameter is one expert's alone).

  Raises:
    ValueError: a piece index outside [0, E).
  """
  for name, value in (("first", first), ("second", second)):
    if not 0 <= value < cfg.experts:
      raise ValueError(f"knock_out: {name}={value} is not a piece index in [0, {cfg.experts})")
  moe = _zero_piece(moe, first, _FIRST[cfg.decompose], cfg)
  return _zero_piece(moe, second, _SECOND[cfg.decompose], cfg)


@flax.struct.dataclass
class _InputTap(structured.Wrapped):
  """A kernel that computes its ordinary product and appends its input to a Python list (only
  inside the function that wraps it, see `router_inputs`)."""
  w: Any
  sink: Any = flax.struct.field(pytree_node=False)

  def matmul(self, x, in_ndim: int = 1):
    self.sink.append(x)
    return super().matmul(x, in_ndim)


def router_inputs(apply_fn: Callable[[dict], Any], params: dict, router_path: tuple[str, ...]):
  """The input (..., d) of the router at `router_path` (e.g. ("layers", "layer_0", "router"))
  while `apply_fn(params)` runs; `route(params at router_path, it, cfg)` gives that router's
  gates. `apply_fn` must not be jitted itself: jit the call of `router_inputs` instead, so the
  captured input is an output of the traced function."""
  sink: list = []
  tapped = jax.tree.map(lambda a: a, params)
  node = tapped
  for part in router_path:
    node[part] = dict(node[part])
    node = node[part]
  node["w1"] = {"kernel": _InputTap(node["w1"]["kernel"], sink)}
  apply_fn(tapped)
  if len(sink) != 1:
    raise ValueError(f"router_inputs: the router at {'/'.join(router_path)} ran {len(sink)} "
                     "times (want once)")
  return sink[0]
