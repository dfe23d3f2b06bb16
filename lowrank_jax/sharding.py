"""Sharded training: a device mesh from config, per-model partition rules, `NamedSharding` values.

The mesh has three axes, any of which may have size 1:

  data    batches split across it, params replicated (data parallelism),
  fsdp    batches split across it too, and params sharded along it (fully sharded data parallel),
  tensor  params sharded along it (Megatron-style tensor parallelism), batches replicated.

A model's partition rules (`PARTITION_RULES` in its module, `models.ModelSpec.partition_rules`)
are `(regex, spec)` pairs: the first regex that `re.fullmatch`es a `/`-joined param path gives
the param's spec, one entry per dim (None: not sharded; a mesh axis name, or a tuple of names).
A param no rule matches is replicated (and listed by `describe`). Everything else follows the
params:

  * a structured weight's arrays (and an adapter's factors, which live under the path of the
    kernel they adapt) follow their kernel's spec on the axes they share with it and are
    replicated on the rank axis: a factor `(*in_shape, r)` takes the kernel's input-axes spec
    (LoRA A), a factor `(r, *out_shape)` its output-axes spec (LoRA B); an array of the kernel's
    own shape takes its spec; any other array is replicated. Shapes alone decide, so a factor
    whose rank equals the kernel's other dim is taken for a kernel-shaped array (still correct,
    only laid out differently);
  * optimizer state: a leaf that mirrors a trainable leaf (same path suffix and shape, e.g. Adam's
    moments) takes its spec; counts and other leaves are replicated;
  * batches: the leading (batch) axis is split over `data` x `fsdp`.

All axes are `AxisType.Auto`: the compiler propagates shardings through the step, so the same
program runs on one device or many and the loss does not depend on the mesh (up to the order of
float reductions).

>>> from jax.sharding import PartitionSpec as P
>>> from lowrank_jax import sharding
>>> kernel_spec = P("fsdp", "tensor")                          # a (64, 32) kernel's spec
>>> sharding.factor_spec((64, 32), kernel_spec, (64, 4))      # LoRA A (d_in, r)
P('fsdp', None)
>>> sharding.factor_spec((64, 32), kernel_spec, (4, 32))      # LoRA B (r, d_out)
P(None, 'tensor')
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lowrank_jax import structured
from lowrank_jax import tree as tree_lib

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")    # the batch axis is split over these
# A partition rule: (regex fullmatched against a param path, one spec entry per dim).
Rule = tuple[str, tuple]
PyTree = Any


# ---------------------------------------------------------------------------------------------
# Mesh
# ---------------------------------------------------------------------------------------------

def mesh_shape(sizes: Mapping[str, int], device_count: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) sizes of `sizes` (missing axes: 1; one axis may be -1: the devices the
  others leave), checked against `device_count`.

  >>> mesh_shape({"data": -1, "tensor": 2}, 8)
  (4, 1, 2)

  Raises:
    ValueError: an unknown axis, a size < 1 other than one -1, or sizes whose product is not the
      device count.
  """
  unknown = sorted(set(sizes) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"config.mesh has unknown axes {unknown}; valid axes: {list(MESH_AXES)}")
  shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
  bad = [f"{a}={s}" for a, s in zip(MESH_AXES, shape) if s < 1 and s != -1]
  if bad or shape.count(-1) > 1:
    raise ValueError(f"config.mesh {dict(zip(MESH_AXES, shape))}: sizes must be >= 1, and at most "
                     f"one may be -1 (the devices the others leave); got {bad or shape}")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if device_count % known:
      raise ValueError(f"config.mesh {dict(zip(MESH_AXES, shape))}: the other axes ({known} "
                       f"devices) do not divide the {device_count} devices")
    shape[shape.index(-1)] = device_count // known
  if math.prod(shape) != device_count:
    raise ValueError(f"config.mesh {dict(zip(MESH_AXES, shape))} has {math.prod(shape)} devices, "
                     f"but there are {device_count}; the sizes must multiply to {device_count} "
                     f"(set one axis to -1 to take the rest)")
  return tuple(shape)


def make_mesh(sizes: Optional[Mapping[str, int]] = None, devices=None) -> Mesh:
  """The (data, fsdp, tensor) mesh of `sizes` over `devices` (default: all devices, of every
  process); `sizes` None puts every device on `data`.

  Raises:
    ValueError: see `mesh_shape`.
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape({"data": -1} if sizes is None else sizes, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data` x `fsdp`, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


# ---------------------------------------------------------------------------------------------
# Specs of params, adapter state, optimizer state
# ---------------------------------------------------------------------------------------------

def _axis_size(mesh_sizes: Mapping[str, int], entry) -> int:
  names = entry if isinstance(entry, tuple) else (entry,)
  return math.prod(mesh_sizes[n] for n in names if n is not None)


def _check_spec(path: str, shape: tuple[int, ...], spec: tuple, rule: str,
                mesh_sizes: Mapping[str, int]) -> None:
  """Raises ValueError unless `spec` names mesh axes once each, fits `shape` and divides it."""
  if len(spec) > len(shape):
    raise ValueError(f"partition rule {rule!r} gives {path} (shape {shape}) the spec {spec} of "
                     f"{len(spec)} dims; the param has {len(shape)}")
  names = [n for e in spec for n in (e if isinstance(e, tuple) else (e,)) if n is not None]
  unknown = sorted(set(names) - set(MESH_AXES))
  if unknown or len(set(names)) != len(names):
    raise ValueError(f"partition rule {rule!r}: spec {spec} must name each of the mesh axes "
                     f"{list(MESH_AXES)} at most once; got {names}")
  for dim, (size, entry) in enumerate(zip(shape, spec)):
    n = _axis_size(mesh_sizes, entry)
    if size % n:
      raise ValueError(f"partition rule {rule!r}: dim {dim} of {path} (shape {shape}) has size "
                       f"{size}, not divisible by the {n} devices of mesh axes {entry!r} (mesh "
                       f"{dict(mesh_sizes)}); change the rule or the mesh")


def rule_spec(path: str, shape: tuple[int, ...], rules: Sequence[Rule],
              mesh_sizes: Optional[Mapping[str, int]] = None) -> tuple[Optional[P], str]:
  """(spec, matching regex) of the param `path`: the first rule that fullmatches; (None, "")
  when none does. With `mesh_sizes`, the spec is checked against the shape (see `_check_spec`)."""
  for pattern, spec in rules:
    if re.fullmatch(pattern, path):
      spec = tuple(spec)
      if mesh_sizes is not None:
        _check_spec(path, tuple(shape), spec, pattern, mesh_sizes)
      return P(*spec), pattern
  return None, ""


def factor_spec(kernel_shape: tuple[int, ...], kernel_spec: P, shape: tuple[int, ...]) -> P:
  """Spec of an array that belongs to a kernel (a structured weight's array, an adapter factor):
  the kernel's spec for the kernel's shape; `(*spec[:n-1], None)` for `(*kernel_shape[:n-1], r)`
  (input axes, then rank); `(None, *spec[-(n-1):])` for `(r, *kernel_shape[-(n-1):])`; else
  replicated."""
  kernel_shape, shape = tuple(kernel_shape), tuple(shape)
  spec = tuple(kernel_spec) + (None,) * (len(kernel_shape) - len(kernel_spec))
  n = len(shape)
  if shape == kernel_shape:
    return P(*spec)
  if 2 <= n <= len(kernel_shape):
    if shape[:n - 1] == kernel_shape[:n - 1]:
      return P(*spec[:n - 1], None)
    if shape[1:] == kernel_shape[len(kernel_shape) - (n - 1):]:
      return P(None, *spec[len(spec) - (n - 1):])
  return P()


def _shape(x) -> tuple[int, ...]:
  """The shape of an array, a `jax.ShapeDtypeStruct` or a Python scalar."""
  return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def param_specs(params: PyTree, rules: Sequence[Rule],
                mesh_sizes: Optional[Mapping[str, int]] = None) -> tuple[PyTree, list[str]]:
  """(a tree of `PartitionSpec` values like `params`, the paths no rule matched).

  A structured leaf gets the spec its path's rule gives its dense shape, and its arrays
  `factor_spec` of it.

  Raises:
    ValueError: a rule's spec does not fit or divide its param (with `mesh_sizes`).
  """
  unmatched = []

  def one(path, leaf):
    name = tree_lib.path_to_str(path)
    spec, _ = rule_spec(name, tuple(leaf.shape), rules, mesh_sizes)
    if spec is None:
      unmatched.append(name)
      spec = P()
    if structured.is_structured(leaf):
      return jax.tree.map(lambda x: factor_spec(leaf.shape, spec, _shape(x)), leaf)
    return spec

  specs = jax.tree_util.tree_map_with_path(one, params, is_leaf=structured.is_structured)
  return specs, unmatched


def _kernels_by_name(params: PyTree, specs: PyTree) -> dict[str, tuple[tuple[int, ...], P]]:
  """{param path: (dense shape, spec)} of `params` (structured leaves whole)."""
  names, _ = tree_lib.flatten_with_names(params, is_leaf=structured.is_structured)
  leaves = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, P) or
                                     structured.is_structured(x))
  out = {}
  for (name, leaf), spec in zip(names, leaves):
    out[name] = (tuple(leaf.shape), spec if isinstance(spec, P) else P())
  return out


def adapter_specs(adapter_tree: PyTree, params: PyTree, specs: PyTree) -> PyTree:
  """Specs of an adapter state tree (trainable or frozen): a leaf under a param's path (the
  adapted kernel) takes `factor_spec` of that param's; others are replicated."""
  kernels = _kernels_by_name(params, specs)

  def one(path, leaf):
    parts = [tree_lib.key_to_str(k) for k in path]
    for cut in range(len(parts), 0, -1):
      hit = kernels.get("/".join(parts[:cut]))
      if hit is not None:
        kernel_shape, kernel_spec = hit
        return factor_spec(kernel_shape, kernel_spec, _shape(leaf))
    return P()

  return jax.tree_util.tree_map_with_path(one, adapter_tree)


def mirror_specs(tree: PyTree, reference: PyTree, reference_specs: PyTree) -> PyTree:
  """Specs of `tree` (an optimizer state): a leaf whose path ends with a `reference` leaf's path
  and has its shape takes that leaf's spec (Adam's moments mirror the params); others (step
  counts, ...) are replicated."""
  ref = {}
  for (name, leaf), spec in zip(tree_lib.flatten_with_names(reference)[0],
                                jax.tree_util.tree_leaves(
                                    reference_specs, is_leaf=lambda x: isinstance(x, P))):
    ref[name] = (_shape(leaf), spec)

  def one(path, leaf):
    parts = [tree_lib.key_to_str(k) for k in path]
    for start in range(len(parts)):
      hit = ref.get("/".join(parts[start:]))
      if hit is not None and hit[0] == _shape(leaf):
        return hit[1]
    return P()

  return jax.tree_util.tree_map_with_path(one, tree)


def train_state_specs(state: PyTree, base: PyTree, base_specs: PyTree) -> dict:
  """Specs of a train state (`steps.init_train_state`; arrays or `ShapeDtypeStruct` values): adapter
  factors follow their kernels, the head its params' specs, the optimizer state the trainable
  tree it mirrors; step and rng replicated."""
  head_specs = adapter_specs(state["head"], base, base_specs)
  trainable = {"adapter": state["adapter"], "head": state["head"]}
  trainable_specs = {"adapter": adapter_specs(state["adapter"], base, base_specs),
                     "head": head_specs}
  return {"adapter": trainable_specs["adapter"],
          "frozen": adapter_specs(state["frozen"], base, base_specs),
          "head": head_specs,
          "opt": mirror_specs(state["opt"], trainable, trainable_specs),
          "step": P(), "rng": None if state["rng"] is None else P()}


def named(mesh: Mesh, specs: PyTree) -> PyTree:
  """The `NamedSharding` of each `PartitionSpec` of a tree."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


# ---------------------------------------------------------------------------------------------
# Placing host data on the mesh (one process or many)
# ---------------------------------------------------------------------------------------------

def put_global(tree: PyTree, shardings: PyTree) -> PyTree:
  """Places `tree`, whole and equal on every process, with `shardings` (each process fills its
  own devices)."""
  def one(x, s):
    if jax.process_count() == 1:
      return jax.device_put(x, s)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
  return jax.tree.map(one, tree, shardings)


def put_local_batch(batch: Mapping[str, Any], sharding: NamedSharding) -> dict:
  """The global batch made of every process's local rows (`batch`: this process's rows, in
  process order), split along the batch axis with `sharding`."""
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def process_batch_shard(sharding: NamedSharding, batch_size: int) -> tuple[int, int]:
  """(shard index, shard count) of this process's rows of a global batch of `batch_size` rows
  placed with `sharding`: processes own disjoint, equal, contiguous blocks of rows, numbered in
  row order ((0, 1) in a single process).

  Raises:
    ValueError: two processes hold the same rows, or a process's rows are not one contiguous block
      (e.g. the `tensor` axis spans processes); the data readers of the processes would disagree.
  """
  rows: dict[int, set] = {}
  for device, index in sharding.devices_indices_map((batch_size,)).items():
    rows.setdefault(device.process_index, set()).update(range(*index[0].indices(batch_size)))
  blocks = {p: (min(r), max(r) + 1) for p, r in rows.items()}
  ordered = sorted(blocks.values())
  per = batch_size // len(blocks)
  if any(len(r) != per or blocks[p][1] - blocks[p][0] != per for p, r in rows.items()) or \
      len(set(ordered)) != len(ordered):
    raise ValueError(f"the batch sharding {sharding.spec} on mesh {dict(sharding.mesh.shape)} "
                     f"gives processes overlapping or split rows ({blocks}); each process must "
                     f"hold its own block of rows: keep the `tensor` axis within a process")
  return ordered.index(blocks[jax.process_index()]), len(ordered)


# ---------------------------------------------------------------------------------------------
# Multi-host: `jax.distributed`, host copies, process 0 first
# ---------------------------------------------------------------------------------------------

DISTRIBUTED_ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS",
                   "num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}


def initialize_distributed(dcfg: Optional[Mapping[str, Any]] = None) -> bool:
  """Starts `jax.distributed` for a multi-process run; returns whether it runs (now or before).

  The fields `coordinator_address` ("host:port" of process 0), `num_processes` and `process_id`
  come from `dcfg` (`config.distributed`), else from the environment variables
  `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`; `auto=True` lets JAX detect
  them (SLURM, Cloud TPU, ...). Nothing starts when neither sets more than one process. Must run
  before anything else uses JAX.

  Raises:
    ValueError: a multi-process setting without a coordinator address or process id.
  """
  if jax.distributed.is_initialized():
    return True
  dcfg = dict(dcfg or {})
  if dcfg.get("auto", False):
    jax.distributed.initialize()
    return True

  def setting(key, unset):
    value = dcfg.get(key, unset)
    return os.environ.get(DISTRIBUTED_ENV[key], unset) if value == unset else value

  address = setting("coordinator_address", "")
  num, pid = int(setting("num_processes", 0)), int(setting("process_id", -1))
  if num <= 1:
    return False
  if not address or not 0 <= pid < num:
    raise ValueError(f"config.distributed: num_processes={num} needs coordinator_address "
                     f"('host:port' of process 0) and process_id in [0, {num}); got "
                     f"{address!r} and {pid} (or set the environment variables "
                     f"{list(DISTRIBUTED_ENV.values())})")
  jax.distributed.initialize(address, num, pid)
  return True


def to_host(tree: PyTree) -> PyTree:
  """Numpy copies of a tree of (possibly sharded across processes) arrays, on every process
  (a collective: every process must call it)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(tree, tiled=True)


def barrier(name: str) -> None:
  """Waits for every process to reach `barrier(name)` (nothing in a single process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def allgather_json(value: Any) -> list:
  """The JSON-serializable `value` of every process, in process order (a collective)."""
  if jax.process_count() == 1:
    return [value]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  data = np.frombuffer(json.dumps(value).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.array([data.size], np.int32))
  padded = np.zeros((int(np.max(sizes)),), np.uint8)
  padded[:data.size] = data
  rows = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:int(n)]).decode()) for row, n in zip(rows, np.ravel(sizes))]


# ---------------------------------------------------------------------------------------------
# describe
# ---------------------------------------------------------------------------------------------

def describe(params: PyTree, rules: Sequence[Rule],
             mesh_sizes: Optional[Mapping[str, int]] = None,
             adapter_tree: Optional[PyTree] = None) -> str:
  """A table of each param's spec and the rule that gave it, and the unmatched (replicated)
  params; with `mesh_sizes`, the per-device shard shapes too (and the rules are checked); with
  `adapter_tree` (an adapter state's trainable tree), the specs of its leaves.

  >>> import jax.numpy as jnp
  >>> params = {"q": {"kernel": jnp.zeros((8, 4))}, "norm": {"scale": jnp.zeros((8,))}}
  >>> rules = ((r"q/kernel", ("fsdp", "tensor")),)
  >>> print(describe(params, rules, {"data": 1, "fsdp": 2, "tensor": 2}))
  path        shape  spec                 shard  rule
  norm/scale  8      P()                  8      (unmatched: replicated)
  q/kernel    8x4    P('fsdp', 'tensor')  4x2    q/kernel
  1 of 2 params unmatched (replicated): ['norm/scale']
  """
  rows = []
  unmatched = []
  for name, leaf in tree_lib.flatten_with_names(params, is_leaf=structured.is_structured)[0]:
    shape = tuple(leaf.shape)
    spec, rule = rule_spec(name, shape, rules, mesh_sizes)
    if spec is None:
      unmatched.append(name)
    spec = P() if spec is None else spec
    shard = shape
    if mesh_sizes is not None:
      padded = tuple(spec) + (None,) * (len(shape) - len(spec))
      shard = tuple(s // _axis_size(mesh_sizes, e) for s, e in zip(shape, padded))
    rows.append((name, "x".join(map(str, shape)) or "()",
                 repr(spec),
                 "x".join(map(str, shard)) or "()", rule or "(unmatched: replicated)"))
  widths = [max(len(r[i]) for r in rows + [("path", "shape", "spec", "shard", "rule")])
            for i in range(4)]
  fmt = lambda r: "  ".join(f"{c:<{w}}" for c, w in zip(r[:4], widths)) + "  " + r[4]
  lines = [fmt(("path", "shape", "spec", "shard", "rule"))] + [fmt(r) for r in rows]
  lines.append(f"{len(unmatched)} of {len(rows)} params unmatched (replicated): {unmatched}")
  if adapter_tree is not None:
    specs = adapter_specs(adapter_tree, params, param_specs(params, rules, mesh_sizes)[0])
    leaves = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, P))
    lines.append("adapter leaves (factors follow their kernels; the rank axis is replicated):")
    for (name, leaf), spec in zip(tree_lib.flatten_with_names(adapter_tree)[0], leaves):
      lines.append(f"  {name}  {'x'.join(map(str, _shape(leaf))) or '()'}  {spec!r}")
  return "\n".join(lines)
