"""Checkpoints of a run: an orbax `CheckpointManager` over the train state and the data iterator.

Layout of a workdir::

  workdir/config.json        the run's config (written once; a different config is refused)
  workdir/ckpt/<step>/state  train state: adapter (trainable + frozen), head, optimizer, step, rng
  workdir/ckpt/<step>/data   the grain iterator state (JSON, `get_state()`/`set_state()`)
  workdir/ckpt_damaged/<step> a checkpoint found damaged on restore, moved aside (kept to inspect)
  workdir/run.lock           the pid of the run using the workdir (removed when it ends)

Saving the iterator state with the arrays is what makes a resumed run bitwise equal to an
uninterrupted one on CPU: the next batch, the next rng (`fold_in(rng, step)`) and the parameters are
all restored exactly.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from typing import Any, Iterator, Optional

import jax
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
LOCK_FILE = "run.lock"
DAMAGED_DIR = "ckpt_damaged"
# What a run writes into its workdir (directories, then files); overwriting removes these only.
RUN_DIRS = ("ckpt", DAMAGED_DIR, "tb", "adapter", "peft", "hf", "baseline")
RUN_FILES = (CONFIG_FILE, "metrics.jsonl", "ranks.jsonl", "results.json")
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
    overwrite: if True, what an earlier run wrote (of this or another config) is deleted
      (`clear_run`) and the run starts afresh: overwrite means a clean workdir, never a resume.

  Returns:
    True if a run of the same config was there already (so it may be resumed); always False
    with `overwrite`.

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
    diff = _diff(_canonical(old), _canonical(new))
    if not diff and not overwrite:
      return True
    if not overwrite:
      raise ConfigMismatchError(
          f"workdir {workdir} holds a run of a different config (differences: {diff[:8]}). Use "
          f"another --workdir, or pass --config.overwrite=True to delete that run and start anew.")
    logging.warning("Overwriting the run in %s (%s)", workdir,
                    f"config differs: {diff[:8]}" if diff else "same config")
    clear_run(workdir)
  with open(path, "w") as f:
    json.dump(new, f, indent=2, sort_keys=True)
  return False


def clear_run(workdir: str) -> list[str]:
  """Deletes what a run wrote to `workdir` (`RUN_DIRS`, `RUN_FILES`: checkpoints, metrics, tb,
  adapter and exports, results, config); anything else there is kept. Logs and returns the
  removed names."""
  removed = []
  for name in RUN_DIRS + RUN_FILES:
    p = os.path.join(workdir, name)
    if os.path.isdir(p) and not os.path.islink(p):
      shutil.rmtree(p)
    elif os.path.lexists(p):
      os.remove(p)
    else:
      continue
    removed.append(name)
  logging.warning("Removed the previous run's %s from %s", removed, workdir)
  return removed


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:   # alive, another user's
    return True
  return True


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[str]:
  """Holds `workdir/run.lock` (this process's pid) while the block runs; removes it after.

  A lock whose pid is dead (a killed run), or is this process's own (a restarted container reuses
  pids), is stale: it is replaced, with a warning.

  Raises:
    RuntimeError: another live process holds the lock (the message gives its pid).
    ValueError: `workdir` is a file, or cannot be created or written.
  """
  path = os.path.join(workdir, LOCK_FILE)
  mine = f"{path}.{os.getpid()}"
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"workdir {workdir} is a file, not a directory; pass a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(mine, "w") as f:   # the lock appears with its pid in it (link is atomic)
      f.write(str(os.getpid()))
  except OSError as e:
    raise ValueError(f"workdir {workdir} cannot be written ({e.strerror}); pass a writable "
                     f"directory") from None
  try:
    while True:
      try:
        os.link(mine, path)
        break
      except FileExistsError:
        try:
          with open(path) as f:
            text = f.read().strip()
        except FileNotFoundError:   # released meanwhile: try again
          continue
        pid = int(text) if text.isdigit() else None
        if pid is not None and pid != os.getpid() and _pid_alive(pid):
          raise RuntimeError(f"workdir {workdir}: a run is already running, pid {pid} ({path}); "
                             f"wait for it to end, or use another --workdir") from None
        logging.warning("Removing the stale lock %s of pid %s (not running)", path, text or "?")
        with contextlib.suppress(FileNotFoundError):
          os.remove(path)
  finally:
    os.remove(mine)
  remove_stale_temporaries(workdir)
  try:
    yield path
  finally:
    if os.path.exists(path):
      os.remove(path)


_TEMPORARY = re.compile(r"\.tmp(\d+)$")


def remove_stale_temporaries(workdir: str) -> list[str]:
  """Deletes the temporary files and directories (`<name>.tmp<pid>`, written whole, then renamed
  into place) that a killed run left among what runs write (`RUN_DIRS`, `RUN_FILES`).

  Called with the workdir lock held, so no live run of this workdir is writing them; the lock
  holder's own pid counts as dead here (it has not written anything yet). Logs and returns the
  removed paths, relative to `workdir`.
  """
  run_names = RUN_DIRS + RUN_FILES
  candidates = [n for n in os.listdir(workdir) if _TEMPORARY.sub("", n) in run_names]
  for d in RUN_DIRS:
    if os.path.isdir(os.path.join(workdir, d)) and not os.path.islink(os.path.join(workdir, d)):
      for root, dirs, files in os.walk(os.path.join(workdir, d)):
        rel = os.path.relpath(root, workdir)
        candidates += [os.path.join(rel, n) for n in dirs + files if _TEMPORARY.search(n)]
  removed = []
  for rel in candidates:
    m = _TEMPORARY.search(rel)
    if not m or (int(m.group(1)) != os.getpid() and _pid_alive(int(m.group(1)))):
      continue
    p = os.path.join(workdir, rel)
    if not os.path.lexists(p):   # inside a temporary directory removed before
      continue
    if os.path.isdir(p) and not os.path.islink(p):
      shutil.rmtree(p)
    else:
      os.remove(p)
    removed.append(rel)
  if removed:
    logging.warning("Removed temporary files a killed run left in %s: %s", workdir, removed)
  return removed


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
    self.workdir = workdir
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

  def restore_intact(self, abstract_state: Any) -> Optional[tuple[Any, dict, int]]:
    """(state, data_state, step) of the newest checkpoint that restores; None if there is none.

    A damaged checkpoint (an empty or truncated file, an empty manifest, an unreadable iterator
    state) is logged with a warning naming its step and file, and moved to
    `workdir/ckpt_damaged/<step>`; the next older one is tried.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      step_dir = os.path.join(str(self.manager.directory), str(step))
      problem = damaged_file(step_dir)
      if problem is None:
        try:
          return self.restore(abstract_state, step)
        except Exception as e:  # pylint: disable=broad-except
          problem = f"{step_dir}: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
      moved = os.path.join(self.workdir, DAMAGED_DIR, str(step))
      logging.warning("checkpoint at step %d is damaged (%s); moved to %s, trying the one before",
                      step, problem, moved)
      os.makedirs(os.path.dirname(moved), exist_ok=True)
      shutil.rmtree(moved, ignore_errors=True)
      shutil.move(step_dir, moved)
      self.manager.reload()
    return None

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def damaged_file(step_dir: str) -> Optional[str]:
  """'<file>: <what is wrong>' of the first damaged file of a checkpoint directory (an empty file,
  an iterator state that is not JSON), else None. Truncated array data is found on restore."""
  for root, _, files in sorted(os.walk(step_dir)):
    for name in sorted(files):
      p = os.path.join(root, name)
      if os.path.getsize(p) == 0:
        return f"{p}: empty file"
  data = os.path.join(step_dir, "data", "metadata")
  if os.path.exists(data):
    try:
      with open(data) as f:
        json.load(f)
    except ValueError as e:
      return f"{data}: not JSON ({e})"
  return None


def abstract_like(tree: Any, sharding=None) -> Any:
  """ShapeDtypeStructs of `tree` (with `sharding` if given), for `Checkpointer.restore`."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
