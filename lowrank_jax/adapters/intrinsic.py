"""Intrinsic dimension (Li et al., ICLR 2018, https://arxiv.org/abs/1804.08838), repo
uber-research/intrinsic-dimension.

Train only inside a random d-dimensional affine subspace of the full D-dimensional parameter
space: θ^(D) = θ₀^(D) + P θ^(d), with θ₀ the pretrained/initial parameters (frozen; `base` *is*
`params`, no copy), θ^(d) ∈ R^d trainable and starting at 0 (so the model is unchanged at init), and
P ∈ R^{D×d} frozen with (approximately) unit-norm columns. It is a whole-model method, not a
per-leaf one: P's columns run across all covered leaves (default: every float leaf, biases
included), and the trainable state is the single vector `{'theta': (d,)}` for the whole model.
`apply` returns the params tree with every covered leaf = θ₀ + (P θ)[slice] as a plain dense array
(that is the method); uncovered leaves (and leaves hidden by `partition`) are untouched.

Projections (`projection`):
  "dense": P_ij ~ N(0, 1), then every column scaled to unit L2 norm over the *whole* model
    (global, as the official code). P is stored in the frozen state, one (D_leaf, d) block per leaf
    (D·d floats: for small models).
  "sparse": per leaf, a sparse random ±1 matrix with density 1/√D_leaf (sklearn's 'auto', as the
    official code; `density` overrides), then the same global column normalization. Stored as COO
    (rows, cols, vals) per leaf, O(nnz); applied with a segment sum.
  "fastfood": V = H G Π H B with the unnormalized Walsh–Hadamard H of size L = 2^⌈log₂ D⌉,
    B ∈ {±1}^L, Π a random permutation, G ~ N(0, 1)^L; θ is zero-padded to L, the first D entries
    of Vθ are kept and divided by √(L·ΣG²)·√(D/L) (one unstacked block, as the official code). Only
    the three L-vectors are stored; P is never formed. Vθ costs O(L log L) = O(D log D) through an
    in-JAX fast Walsh–Hadamard transform, memory O(L) independent of d (requires d <= L).

Frozen state: `IntrinsicFrozen(leaves={nested per-leaf projection data or markers}, fastfood=...)`.
Sparse matrices are drawn on the host (numpy, seeded from the init key) at init, outside jit.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax import base as base_lib
from lowrank_jax import structured
from lowrank_jax import targeting
from lowrank_jax import tree as tree_lib
from lowrank_jax.adapters import _leafwise

PROJECTIONS = ("dense", "sparse", "fastfood")


class DenseLeaf(NamedTuple):
  """Rows of the dense P for one leaf: (leaf.size, d)."""
  p: jax.Array


class SparseLeaf(NamedTuple):
  """COO block of the sparse P for one leaf: rows (into the leaf), cols (into θ), vals."""
  rows: jax.Array
  cols: jax.Array
  vals: jax.Array


class Covered(NamedTuple):
  """Marker for a leaf covered by the Fastfood projection (it has no per-leaf data)."""


class FastfoodProjection(NamedTuple):
  """The Fastfood vectors, all of length L = 2^⌈log₂ D⌉: b (±1), perm (int32), g (N(0,1))."""
  b: jax.Array
  perm: jax.Array
  g: jax.Array


class IntrinsicFrozen(NamedTuple):
  """Frozen state: per-leaf projection data (nested like params) and the Fastfood vectors."""
  leaves: dict
  fastfood: Optional[FastfoodProjection] = None


def fwht(x: jax.Array) -> jax.Array:
  """Unnormalized fast Walsh–Hadamard transform along the last axis (length a power of two).

  Returns H x with H_ij = (-1)^popcount(i & j) (Sylvester order, symmetric, H H = L·I), in
  ⌈log₂ L / 2⌉ radix-4 passes of O(L) each (two butterfly levels fused per pass, which measured
  ~1.5x faster forward and ~2.5x faster backward on CPU than radix-2 passes).
  """
  n = x.shape[-1]
  if n & (n - 1):
    raise ValueError(f"fwht: length {n} is not a power of two")
  lead = x.shape[:-1]
  h = 1
  while h < n:
    m = 4 if 4 * h <= n else 2
    y = x.reshape(lead + (n // (m * h), m, h))
    if m == 2:
      a, b = y[..., 0, :], y[..., 1, :]
      parts = [a + b, a - b]
    else:
      p0, p1, p2, p3 = (y[..., i, :] for i in range(4))
      s01, d01, s23, d23 = p0 + p1, p0 - p1, p2 + p3, p2 - p3
      parts = [s01 + s23, d01 + d23, s01 - s23, d01 - d23]
    x = jnp.stack(parts, axis=-2).reshape(lead + (n,))
    h *= m
  return x


def fastfood_project(theta: jax.Array, ff: FastfoodProjection, big_d: int) -> jax.Array:
  """First `big_d` entries of H G Π H B [θ; 0], normalized by √(L·ΣG²)·√(D/L)."""
  L = ff.b.shape[0]
  dt = jnp.promote_types(theta.dtype, jnp.float32)
  x = jnp.zeros((L,), dt).at[:theta.shape[0]].set(theta.astype(dt))
  x = fwht(ff.b.astype(dt) * x)
  x = fwht(ff.g.astype(dt) * jnp.take(x, ff.perm, axis=0))
  g = ff.g.astype(dt)
  norm = jnp.sqrt(L * jnp.sum(g * g)) * math.sqrt(big_d / L)
  return x[:big_d] / norm


def fastfood_matrix(ff: FastfoodProjection, big_d: int, d: int) -> np.ndarray:
  """The explicit (D, d) Fastfood matrix (for tests on small D): columns of the normalized V."""
  L = ff.b.shape[0]
  i = np.arange(L)
  h = np.where(np.bitwise_count(i[:, None] & i[None, :]) % 2, -1.0, 1.0) \
      if hasattr(np, "bitwise_count") else \
      np.array([[(-1.0) ** bin(a & c).count("1") for c in range(L)] for a in range(L)])
  pi = np.zeros((L, L))
  pi[np.arange(L), np.asarray(ff.perm)] = 1.0                 # (Π x)_i = x[perm[i]]
  g = np.asarray(ff.g, np.float64)
  v = h @ np.diag(g) @ pi @ h @ np.diag(np.asarray(ff.b, np.float64))
  norm = math.sqrt(L * float(np.sum(g * g))) * math.sqrt(big_d / L)
  return v[:big_d, :d] / norm


def _float_leaf(path, leaf) -> bool:
  del path
  return hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)


@base_lib.records_hparams
def intrinsic_dimension(d: int, projection: str = "fastfood",
                        targets: Optional[targeting.Targets] = None, *,
                        density: Optional[float] = None, dtype=jnp.float32) -> base_lib.Adapter:
  """Whole-model random-subspace training θ = θ₀ + P θ_d (see the module docstring).

  Args:
    d: subspace dimension (>= 1; <= L = 2^⌈log₂ D⌉ for "fastfood").
    projection: "dense", "sparse" or "fastfood".
    targets: leaves covered by the subspace: None (every float leaf), regex(es) or a callable
      `(path, leaf) -> bool`.
    density: "sparse" only: nonzero fraction per leaf in (0, 1]; None gives 1/√D_leaf.
    dtype: dtype of θ_d and of the stored projection.

  Returns:
    An `Adapter` with ``state.trainable = {'theta': zeros(d)}``; d trainable parameters.

  Raises:
    ValueError: bad d / projection / density (here) or d out of range / no float target
      (at init).

  >>> import jax, jax.numpy as jnp, lowrank_jax as lj
  >>> from lowrank_jax.adapters.intrinsic import intrinsic_dimension
  >>> p = {'w': jnp.ones((3, 5)), 'b': jnp.zeros(5)}
  >>> ad = intrinsic_dimension(4, 'fastfood')
  >>> base, state = ad.init(jax.random.key(0), p)
  >>> lj.count_params(state), ad.apply(base, state)['w'].shape
  (4, (3, 5))
  """
  _leafwise.check_int("intrinsic_dimension", "d", d)
  if projection not in PROJECTIONS:
    raise ValueError(f"intrinsic_dimension: unknown projection {projection!r}; valid: "
                     f"{PROJECTIONS}")
  if density is not None and (projection != "sparse" or not 0 < density <= 1):
    raise ValueError(f"intrinsic_dimension: density={density!r} must be in (0, 1] and is only "
                     f"valid with projection='sparse'")
  sel: Callable = _float_leaf if targets is None else targets

  def init(key, params, stats=None):
    del stats
    paths = targeting.resolve(params, sel, what="intrinsic_dimension targets")
    leaves = dict(targeting.named_leaves(params))
    for p in paths:
      if not _float_leaf(p, leaves[p]):
        raise ValueError(f"intrinsic_dimension: target {p} has dtype {leaves[p].dtype}; only "
                         f"float leaves can be covered")
    sizes = {p: int(math.prod(leaves[p].shape)) for p in paths}
    big_d = sum(sizes.values())
    per_leaf = {}
    ff = None
    if projection == "dense":
      blocks = {p: jax.random.normal(tree_lib.derive_key(key, p), (sizes[p], d), jnp.float32)
                for p in paths}
      norm = jnp.sqrt(sum(jnp.sum(b * b, axis=0) for b in blocks.values()))
      norm = jnp.where(norm > 0, norm, 1.0)
      per_leaf = {p: DenseLeaf((b / norm).astype(dtype)) for p, b in blocks.items()}
    elif projection == "sparse":
      coo = {}
      col_sq = np.zeros(d)
      for p in paths:
        n = sizes[p]
        dens = density if density is not None else 1.0 / math.sqrt(n)
        seed = int(jax.random.randint(tree_lib.derive_key(key, p), (), 0, 2 ** 31 - 1))
        rng = np.random.default_rng(seed)
        nnz = max(1, int(round(dens * n * d)))
        nnz = min(nnz, n * d)
        flat = rng.choice(n * d, size=nnz, replace=False)
        vals = rng.choice(np.array([-1.0, 1.0]), size=nnz)
        rows, cols = flat // d, flat % d
        np.add.at(col_sq, cols, vals * vals)
        coo[p] = (rows, cols, vals)
      norm = np.sqrt(np.where(col_sq > 0, col_sq, 1.0))
      per_leaf = {p: SparseLeaf(jnp.asarray(r, jnp.int32), jnp.asarray(c, jnp.int32),
                                jnp.asarray(v / norm[c], dtype))
                  for p, (r, c, v) in coo.items()}
    else:
      L = 1 << max(0, (big_d - 1).bit_length())
      if d > L:
        raise ValueError(f"intrinsic_dimension: d={d} exceeds the Fastfood block size "
                         f"L={L} (= 2^ceil(log2 D), D={big_d}); valid d: 1..{L}")
      kb, kp, kg = jax.random.split(key, 3)
      ff = FastfoodProjection(
          b=jnp.where(jax.random.bernoulli(kb, 0.5, (L,)), 1.0, -1.0).astype(dtype),
          perm=jax.random.permutation(kp, L).astype(jnp.int32),
          g=jax.random.normal(kg, (L,), dtype))
      per_leaf = {p: Covered() for p in paths}
    frozen = IntrinsicFrozen(tree_lib.nest(per_leaf), ff)
    return params, base_lib.AdapterState({"theta": jnp.zeros((d,), dtype)}, frozen)

  leaf_kind = {"dense": DenseLeaf, "sparse": SparseLeaf, "fastfood": Covered}[projection]

  def check_state(base, state):
    """Raises a ValueError naming what differs from the state `init` makes on `base`."""
    hint = "state made by another adapter or on other params?"
    theta = state.trainable.get("theta") if isinstance(state.trainable, dict) else None
    if theta is None or set(state.trainable) != {"theta"}:
      raise ValueError(f"intrinsic_dimension: trainable state must be {{'theta': ({d},) "
                       f"{jnp.dtype(dtype)}}}, got {jax.tree.map(jnp.shape, state.trainable)}; "
                       f"{hint}")
    if theta.shape != (d,) or not _leafwise.holds_dtype(jnp.result_type(theta), jnp.dtype(dtype)):
      raise ValueError(f"intrinsic_dimension: theta has shape {theta.shape} dtype "
                       f"{jnp.result_type(theta)}, expected ({d},) {jnp.dtype(dtype)} (or a wider "
                       f"float); {hint}")
    frozen = state.frozen
    if not isinstance(frozen, IntrinsicFrozen):
      raise ValueError(f"intrinsic_dimension: frozen state must be an IntrinsicFrozen, got "
                       f"{type(frozen).__name__}; {hint}")
    per_leaf = tree_lib.unnest(frozen.leaves)
    targeted = targeting.resolve(base, sel, what="intrinsic_dimension targets")
    if sorted(per_leaf) != targeted:
      raise ValueError(f"intrinsic_dimension: state covers paths {sorted(per_leaf)[:5]}, the "
                       f"targets select {targeted[:5]} (not covered: "
                       f"{sorted(set(targeted) - set(per_leaf))[:5]}, not targeted: "
                       f"{sorted(set(per_leaf) - set(targeted))[:5]}); {hint}")
    leaves = dict(targeting.named_leaves(base))
    for p, blk in per_leaf.items():
      n = int(math.prod(leaves[p].shape))
      if not isinstance(blk, leaf_kind):
        raise ValueError(f"intrinsic_dimension: frozen block for {p} is a {type(blk).__name__}, "
                         f"projection={projection!r} makes a {leaf_kind.__name__}; {hint}")
      if isinstance(blk, DenseLeaf) and blk.p.shape != (n, d):
        raise ValueError(f"intrinsic_dimension: frozen block for {p} has shape {blk.p.shape}, "
                         f"expected ({n}, {d}) (leaf size × d); {hint}")
    if (frozen.fastfood is None) != (projection != "fastfood"):
      raise ValueError(f"intrinsic_dimension: projection={projection!r} but the state "
                       f"{'has no' if frozen.fastfood is None else 'has'} Fastfood vectors; "
                       f"{hint}")
    if frozen.fastfood is not None:
      big_d = sum(int(math.prod(leaves[p].shape)) for p in targeted)
      length = 1 << max(0, (big_d - 1).bit_length())
      shapes = {k: tuple(v.shape) for k, v in frozen.fastfood._asdict().items()}
      if any(sh != (length,) for sh in shapes.values()):
        raise ValueError(f"intrinsic_dimension: Fastfood vectors have shapes {shapes}, expected "
                         f"({length},) each (L = 2^ceil(log2 D), D={big_d}); {hint}")

  def apply(base, state, *, rng=None):
    del rng
    check_state(base, state)
    theta = state.trainable["theta"]
    frozen = state.frozen
    per_leaf = tree_lib.unnest(frozen.leaves)
    paths = sorted(per_leaf)
    leaves = dict(targeting.named_leaves(base))
    dt = jnp.promote_types(theta.dtype, jnp.float32)
    deltas = {}
    if frozen.fastfood is not None:
      sizes = [int(math.prod(leaves[p].shape)) for p in paths]
      v = fastfood_project(theta, frozen.fastfood, sum(sizes))
      # One split (its transpose is one concatenate), not per-leaf slices (each of whose
      # transposes would pad back to length D: O(#leaves · D) in the backward).
      parts = jnp.split(v, np.cumsum(sizes)[:-1].tolist()) if len(paths) > 1 else [v]
      deltas = dict(zip(paths, parts))
    else:
      for p in paths:
        blk = per_leaf[p]
        n = int(math.prod(leaves[p].shape))
        if isinstance(blk, DenseLeaf):
          deltas[p] = blk.p.astype(dt) @ theta.astype(dt)
        else:
          contrib = blk.vals.astype(dt) * jnp.take(theta.astype(dt), blk.cols)
          deltas[p] = jax.ops.segment_sum(contrib, blk.rows, num_segments=n)
    out = {}
    for p in paths:
      w = leaves[p]
      w0 = structured.materialize(w)
      out[p] = (w0.astype(dt) + deltas[p].reshape(w0.shape)).astype(w0.dtype)
    return tree_lib.replace_by_name(base, out, is_leaf=structured.is_structured)

  return base_lib.Adapter(init=init, apply=apply, name=f"intrinsic_dimension({projection})")


# ---------------------------------------------------------------------------------------------
# Method facts, read by `lowrank_jax.registry`.
# ---------------------------------------------------------------------------------------------

def _config_kwargs(rank, alpha, targets, total_steps):
  """`rank` sets the subspace dimension d = 64·r (Fastfood projection); no alpha."""
  del alpha, total_steps
  return dict(d=64 * rank, projection="fastfood", targets=targets)


METHOD_FACTS = {
    "intrinsic": base_lib.MethodFacts(
        intrinsic_dimension, _config_kwargs,
        adapter_names=tuple(f"intrinsic_dimension({p})" for p in PROJECTIONS)),
}
