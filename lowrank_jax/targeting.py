"""Choosing which leaves an adapter touches: regexes or a callable, resolved once outside jit.

>>> import jax.numpy as jnp
>>> from lowrank_jax import targeting
>>> p = {'attn': {'query': {'kernel': jnp.ones((4, 4))}, 'value': {'kernel': jnp.ones((4, 4))}}}
>>> targeting.resolve(p, r'attn/(query|value)/kernel')
['attn/query/kernel', 'attn/value/kernel']
"""
from __future__ import annotations

import difflib
import re
from typing import Any, Callable, NamedTuple, Sequence, Union

import jax

from lowrank_jax import structured
from lowrank_jax import tree as tree_lib

Targets = Union[str, Sequence[str], Callable[[str, Any], bool]]


class Excluded:
  """Placeholder for leaves hidden from an adapter (used by `partition`). Has no pytree leaves."""

  def __init__(self, leaf):
    self.leaf = leaf

  def __repr__(self):
    return "Excluded()"


jax.tree_util.register_pytree_node(
    Excluded, lambda e: ((), e.leaf), lambda leaf, _: Excluded(leaf))


def named_leaves(params: Any) -> list[tuple[str, Any]]:
  """(path, leaf) for every leaf; structured weights count as leaves."""
  return tree_lib.flatten_with_names(params, is_leaf=structured.is_structured)[0]


def resolve(params: Any, targets: Targets, *, what: str = "targets") -> list[str]:
  """Returns the sorted paths selected by `targets`; raises ValueError if a pattern matches nothing.

  Args:
    params: the parameter pytree.
    targets: a regex, a list of regexes (each `re.fullmatch`ed against `/`-joined paths; every
      pattern must match at least one leaf), or a callable `(path, leaf) -> bool`.
    what: the argument name used in error messages.
  """
  leaves = named_leaves(params)
  names = [n for n, _ in leaves]
  if callable(targets) and not isinstance(targets, str):
    chosen = [n for n, x in leaves if targets(n, x)]
    if not chosen:
      raise ValueError(f"{what}: the callable selected no leaf among {len(names)} paths, "
                       f"e.g. {names[:5]}")
    return sorted(chosen)
  if not isinstance(targets, (str, list, tuple)):
    raise TypeError(f"{what} must be a regex string, a list/tuple of regex strings, or a callable "
                    f"(path, leaf) -> bool; got {type(targets).__name__} {targets!r}")
  patterns = [targets] if isinstance(targets, str) else list(targets)
  if not patterns:
    raise ValueError(f"{what}: empty list of patterns")
  chosen = set()
  for pat in patterns:
    if not isinstance(pat, str):
      raise TypeError(f"{what}: patterns must be strings, got {type(pat).__name__}")
    if pat.startswith("/"):
      raise ValueError(f"{what}: pattern {pat!r} starts with '/'; paths are written without it, "
                       f"e.g. {names[0] if names else 'layer/kernel'!r}")
    try:
      rx = re.compile(pat)
    except re.error as e:
      raise ValueError(f"{what}: pattern {pat!r} is not a valid regex: {e}") from None
    hits = [n for n in names if rx.fullmatch(n)]
    if not hits:
      near = difflib.get_close_matches(pat, names, n=5, cutoff=0.0)
      raise ValueError(f"{what}: pattern {pat!r} matches no parameter path. Nearest paths: "
                       f"{near}")
    chosen.update(hits)
  return sorted(chosen)


class KernelAxes(NamedTuple):
  """Which axes of a kernel are its inputs and which its outputs (like optax's GaLore dims).

  The input axes must be the leading ones (flax Dense/DenseGeneral/Conv/Embed layouts), e.g. a 2-D
  conv kernel `(kh, kw, c_in, c_out)` is `KernelAxes(in_axes=(0, 1, 2), out_axes=(3,))`.
  """
  in_axes: tuple[int, ...]
  out_axes: tuple[int, ...]

  @property
  def in_ndim(self) -> int:
    return len(self.in_axes)


CONV = "conv"  # preset: all axes but the last are inputs (flax Conv, any spatial rank)

AxesSpec = Union[None, str, KernelAxes, dict, Callable[[str, Any], Any]]


def kernel_axes(path: str, shape: tuple[int, ...], spec: AxesSpec) -> KernelAxes:
  """Resolves the in/out axes of one kernel; never guesses for kernels of more than 2 dims.

  Args:
    path: the leaf path (for error messages and dict lookups).
    shape: the leaf shape.
    spec: None (only 2-D kernels are allowed: in=(0,), out=(1,)); "conv" (all axes but the last
      are inputs); a KernelAxes; a dict `{regex: KernelAxes | "conv" | int in_ndim}` (first
      fullmatch wins); or a callable `(path, shape) -> KernelAxes | "conv" | int`.
  """
  n = len(shape)
  if n < 2:
    raise ValueError(f"{path}: adapter target must have at least 2 dims, got shape {shape}")
  choice = spec
  if isinstance(spec, dict):
    choice = None
    for pat, val in spec.items():
      if re.fullmatch(pat, path):
        choice = val
        break
  elif callable(spec) and not isinstance(spec, (str, KernelAxes)):
    choice = spec(path, shape)
  if choice is None:
    if n == 2:
      return KernelAxes((0,), (1,))
    raise ValueError(
        f"{path}: kernel axes ambiguous for a {n}-D kernel of shape {shape}; pass "
        f"kernel_axes='conv' (all axes but the last are inputs), an int number of leading input "
        f"axes, a KernelAxes(in_axes, out_axes), or a dict {{regex: ...}}")
  if choice == CONV:
    return KernelAxes(tuple(range(n - 1)), (n - 1,))
  if isinstance(choice, int) and not isinstance(choice, bool):
    if not 1 <= choice < n:
      raise ValueError(f"{path}: kernel_axes in_ndim={choice} must be in [1, {n - 1}]")
    return KernelAxes(tuple(range(choice)), tuple(range(choice, n)))
  if isinstance(choice, (tuple, list)) and not isinstance(choice, KernelAxes):
    choice = KernelAxes(*choice)
  if not isinstance(choice, KernelAxes):
    raise TypeError(f"{path}: kernel_axes entry {choice!r} is not 'conv', an int or KernelAxes")
  ins, outs = tuple(choice.in_axes), tuple(choice.out_axes)
  if ins != tuple(range(len(ins))) or outs != tuple(range(len(ins), n)):
    raise ValueError(f"{path}: kernel_axes {choice} must list leading input axes then the "
                     f"remaining output axes of shape {shape} "
                     f"(e.g. in_axes=(0,1,2), out_axes=(3,))")
  return KernelAxes(ins, outs)
