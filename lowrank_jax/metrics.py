"""Run-time outputs of the trainer: metrics JSONL + TensorBoard event files, and a progress bar.

Only the trainer (`lowrank_jax.train`) uses this module; library code never writes files.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any, Mapping

import numpy as np


def _to_py(v: Any) -> Any:
  v = np.asarray(v)
  return v.item() if v.ndim == 0 else v.tolist()


def _truncate_jsonl(path: str, resume_step: int):
  """Keeps the lines of steps <= resume_step (drops what an interrupted run wrote later)."""
  if not os.path.exists(path):
    return
  kept = []
  with open(path) as f:
    for line in f:
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:   # a line cut by a kill
        continue
      if rec.get("step", 0) <= resume_step:
        kept.append(line if line.endswith("\n") else line + "\n")
  with open(path, "w") as f:
    f.writelines(kept)


class JsonlWriter:
  """Appends `{"step": s, **record}` lines to a JSONL file (truncated past `resume_step`)."""

  def __init__(self, path: str, resume_step: int = 0):
    _truncate_jsonl(path, resume_step)
    self._f = open(path, "a")

  def write(self, step: int, record: Mapping[str, Any]):
    self._f.write(json.dumps({"step": int(step), **record}) + "\n")
    self._f.flush()

  def close(self):
    self._f.close()


class MetricWriter:
  """Appends `{"step": s, name: value, ...}` lines to `workdir/metrics.jsonl` and scalars to
  TensorBoard event files in `workdir/tb` (through `tensorboardX`, if installed).

  Args:
    workdir: run directory.
    resume_step: when resuming from a checkpoint at this step, lines of later steps (written by the
      interrupted run after its last checkpoint) are dropped, so the file has each step once.
  """

  def __init__(self, workdir: str, resume_step: int = 0):
    self.path = os.path.join(workdir, "metrics.jsonl")
    _truncate_jsonl(self.path, resume_step)
    self._f = open(self.path, "a")
    try:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tb"),
                                            purge_step=resume_step + 1 if resume_step else None)
    except ImportError:
      logging.warning("tensorboardX is not installed; no TensorBoard event files "
                      "(pip install tensorboardX).")
      self._tb = None

  def write(self, step: int, metrics: Mapping[str, Any]):
    rec = {"step": int(step), **{k: _to_py(v) for k, v in metrics.items()}}
    self._f.write(json.dumps(rec) + "\n")
    self._f.flush()
    if self._tb is not None:
      for k, v in rec.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, int(step))

  def close(self):
    self._f.close()
    if self._tb is not None:
      self._tb.close()


def read_jsonl(path: str) -> list[dict]:
  """Reads a metrics JSONL file (skips a truncated last line)."""
  out = []
  if not os.path.exists(path):
    return out
  with open(path) as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        pass
  return out


class Progress:
  """A small progress bar: step, loss, examples/s and ETA, on stderr (one line, or a log line
  every `log_every` steps when stderr is not a terminal)."""

  def __init__(self, total: int, start: int, batch_size: int, *, enabled: bool = True,
               log_every: int = 50, desc: str = "train"):
    self.total, self.start, self.batch_size = total, start, batch_size
    self.enabled, self.log_every, self.desc = enabled, log_every, desc
    self.tty = sys.stderr.isatty()
    self.t0 = None
    self.n0 = start

  def note(self, what: str, step: int | None = None):
    """Shows what the run is doing between steps (compiling, evaluating) on the bar's line, so
    the terminal never looks stuck; a log line when stderr is not a terminal."""
    if not self.enabled:
      return
    step = self.n0 if step is None else step
    frac = step / max(self.total, 1)
    bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
    line = f"{self.desc} [{bar}] {step}/{self.total} {what}..."
    sys.stderr.write(f"\r{line}\033[K" if self.tty else line + "\n")
    sys.stderr.flush()

  def update(self, step: int, loss: float | None = None):
    if not self.enabled:
      return
    now = time.perf_counter()
    if self.t0 is None or step <= self.n0:   # time from the first finished step (after compile)
      self.t0, self.n0 = now, step
      rate = float("nan")
    else:
      rate = (step - self.n0) / (now - self.t0)
    eta = (self.total - step) / rate if rate == rate and rate > 0 else float("nan")
    frac = step / max(self.total, 1)
    bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
    loss_s = f"{loss:.4f}" if loss is not None else "-"
    line = (f"{self.desc} [{bar}] {step}/{self.total} loss={loss_s} "
            f"ex/s={rate * self.batch_size:.1f} ETA={_fmt_time(eta)}")
    if self.tty:
      sys.stderr.write("\r" + line + "\033[K")
      if step >= self.total:
        sys.stderr.write("\n")
      sys.stderr.flush()
    elif step % self.log_every == 0 or step >= self.total:
      sys.stderr.write(line + "\n")
      sys.stderr.flush()


def _fmt_time(s: float) -> str:
  if not math.isfinite(s):
    return "?"
  s = int(s)
  return f"{s // 60}:{s % 60:02d}"
