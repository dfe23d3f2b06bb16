"""Checkpoints of a run: an orbax `CheckpointManager` over the train state and the data iterator.

Layout of a workdir::

  workdir/config.json        the run's config (written once; a different config is refused)
  workdir/ckpt/<step>/state  train state: adapter (trainable + frozen), head, optimizer, step, rng
  workdir/ckpt/<step>/data   the grain iterator state (JSON, `get_state()`/`set_state()`)

Saving the iterator state with the arrays is what makes a resumed run bitwise equal to an
uninterrupted one on CPU: the next batch, the next rng (`fold_in(rng, step)`) and the parameters are
all restored exactly.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
# Config fields that may differ between a run and its resumption (they do not change results).
NON_RESULT_FIELDS = ("overwrite", "progress", "ckpt_every", "keep_ckpts", "log_every")


class ConfigMismatchError(ValueError):
  """The workdir holds a run of a different config."""


def _canonical(config_dict: dict) -> dict:
  return {k: v for k, v in config_dict.items() if k not in NON_RESULT_FIELDS}


def check_workdir_config(workdir: str, config_dict: dict, *, overwrite: bool = False) -> bool:
  """Stores `config_dict` as `workdir/config.json`, or checks it equals the stored one.

  Args:
    workdir: run directory (created if needed).
    config_dict: JSON-serializable config (`config.to_dict()`).
    overwrite: if True and the stored config differs, the old checkpoints, metrics and config are
      deleted and the run starts afresh.

  Returns:
    True if a run of the same config was there already (so it may be resumed).

  Raises:
    ConfigMismatchError: the stored config differs and `overwrite` is False; the message lists the
      differing fields.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  new = json.loads(json.dumps(config_dict, sort_keys=True, default=str))
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if _canonical(old) == _canonical(new):
      return True
    diff = _diff(_canonical(old), _canonical(new))
    if not overwrite:
      raise ConfigMismatchError(
          f"workdir {workdir} holds a run of a different config (differences: {diff[:8]}). Use "
          f"another --workdir, or pass --config.overwrite=True to delete that run and start anew.")
    logging.warning("Overwriting the run in %s (config differs: %s)", workdir, diff[:8])
    clear_run(workdir)
  with open(path, "w") as f:
    json.dump(new, f, indent=2, sort_keys=True)
  return False


def clear_run(workdir: str):
  """Deletes a run's checkpoints, metrics, results and config from `workdir`."""
  import shutil  # pylint: disable=g-import-not-at-top
  for name in ("ckpt", "tb", "adapter", "baseline"):
    shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
  for name in (CONFIG_FILE, "metrics.jsonl", "ranks.jsonl", "results.json"):
    p = os.path.join(workdir, name)
    if os.path.exists(p):
      os.remove(p)


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in sorted(set(a) | set(b)):
      name = f"{prefix}.{k}" if prefix else k
      if k not in a or k not in b:
        out.append(f"{name}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}")
      else:
        out += _diff(a[k], b[k], name)
    return out
  return [] if a == b else [f"{prefix}: {a!r} -> {b!r}"]


class Checkpointer:
  """Saves every `every` steps (and at the end), restores the latest.

  Args:
    workdir: run directory; checkpoints go to `workdir/ckpt`.
    every: save period in steps (0: only at the end).
    keep: how many checkpoints to keep.
  """

  def __init__(self, workdir: str, every: int, keep: int = 2):
    self.every = every
    self.manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "ckpt")),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_names=("state", "data"))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def maybe_save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
    """Saves `state` (a pytree of arrays) and `data_state` (JSON) if the period says so."""
    if not force and not (self.every and step % self.every == 0):
      return False
    if self.manager.latest_step() == step:
      return False
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)))
    return True

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, dict, int]:
    """Returns (state, data_state, step) of checkpoint `step` (default: the latest).

    Args:
      abstract_state: a pytree of `jax.ShapeDtypeStruct` (from `jax.eval_shape`) giving the
        structure, shapes, dtypes and shardings to restore into.
      step: which checkpoint.
    """
    step = self.manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError("no checkpoint to restore")
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return out["state"], out["data"], step

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree: Any, sharding=None) -> Any:
  """ShapeDtypeStructs of `tree` (with `sharding` if given), for `Checkpointer.restore`."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
