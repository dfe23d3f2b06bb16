"""Pytree helpers: `/`-joined path names, order-independent per-path keys, nested<->flat maps.

Paths are the strings users write regexes against (big_vision style): dict keys, attribute names and
sequence indices joined by `/`, e.g. ``encoder/layer_0/attention/query/kernel``.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable

import jax

PyTree = Any


def key_to_str(k) -> str:
  """One pytree path key (dict key, attribute, index) as a string."""
  if isinstance(k, jax.tree_util.DictKey):
    return str(k.key)
  if isinstance(k, jax.tree_util.GetAttrKey):
    return k.name
  if isinstance(k, jax.tree_util.SequenceKey):
    return str(k.idx)
  if isinstance(k, jax.tree_util.FlattenedIndexKey):
    return str(k.key)
  return str(k)


def path_to_str(path) -> str:
  """A pytree key path as a `/`-joined string, e.g. `encoder/layer_0/kernel`."""
  return "/".join(key_to_str(k) for k in path)


def flatten_with_names(tree: PyTree, is_leaf: Callable | None = None):
  """Returns ([(name, leaf)], treedef) with `/`-joined names."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return [(path_to_str(p), x) for p, x in leaves], treedef


def stable_hash(name: str) -> int:
  """A process-independent 31-bit hash of a path (Python's `hash` is salted per process)."""
  return int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:4], "big") & 0x7FFFFFFF


def derive_key(key: jax.Array, name: str) -> jax.Array:
  """`fold_in(key, sha1(name))`: a leaf's key does not depend on traversal order."""
  return jax.random.fold_in(key, stable_hash(name))


def nest(flat: dict[str, Any]) -> dict:
  """{'a/b/c': v} -> {'a': {'b': {'c': v}}}."""
  out: dict = {}
  for name, value in flat.items():
    node = out
    *parents, last = name.split("/")
    for p in parents:
      node = node.setdefault(p, {})
      if not isinstance(node, dict):
        raise ValueError(f"path {name!r} collides with a leaf at {p!r}")
    node[last] = value
  return out


def unnest(nested: Any, prefix: str = "") -> dict[str, Any]:
  """Inverse of `nest`: walks dicts (only) and returns {path: value} for non-dict values."""
  if not isinstance(nested, dict):
    return {prefix: nested}
  out = {}
  for k, v in nested.items():
    name = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, dict):
      out.update(unnest(v, name))
    else:
      out[name] = v
  return out


def replace_by_name(tree: PyTree, replacements: dict[str, Any], *, is_leaf=None,
                    what: str = "adapter state") -> PyTree:
  """Returns `tree` with leaves named in `replacements` swapped; unknown names raise ValueError."""
  named, treedef = flatten_with_names(tree, is_leaf=is_leaf)
  names = {n for n, _ in named}
  missing = [n for n in replacements if n not in names]
  if missing:
    raise ValueError(
        f"{what} refers to paths that are not in the params tree: {sorted(missing)[:5]}; "
        f"mismatched state/params trees (was the state made by init on these params?)")
  leaves = [replacements.get(n, x) for n, x in named]
  return jax.tree_util.tree_unflatten(treedef, leaves)


def tree_size(tree: PyTree) -> int:
  """Number of scalars in `tree` (a leaf without `size` counts 1)."""
  return int(sum(getattr(x, "size", 1) for x in jax.tree_util.tree_leaves(tree)))
