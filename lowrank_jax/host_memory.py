"""Keeps XLA:CPU's per-step scratch memory mapped from one step to the next.

XLA:CPU allocates an executable's temporary buffer with `malloc` on every execution and frees it
afterwards. For a training step that buffer holds what the backward needs (324 MB for a MiniLM
step with LoRA on every linear layer at batch 32 x seq 32). glibc serves a request that large,
made from one of XLA's worker threads, with a fresh `mmap` (a thread's arena cannot grow past
64 MB) and unmaps it on `free`, so every step page-faults the whole buffer in again: about
83,000 faults per step, a third of the step's CPU time spent in the kernel zeroing pages.

`reuse_host_memory()` sets glibc's malloc to one arena, no `mmap` and no trimming: the freed
buffer stays mapped and the next execution reuses it. The median step then faults nothing (now
and then one still does: XLA frees the buffer asynchronously, so the next step may allocate
first and grow the heap), and the MiniLM LoRA step took 0.50x and 0.63x the CPU time in two pairs
of runs (`python -m experiments.bench`). The cost: the process's resident memory does not shrink back
after its peak. XLA's threads choose their arena on their first allocation, so the call only
takes effect before JAX starts its CPU client: first thing in a program or a notebook, before any
JAX computation. `python -m experiments.run` and the benchmarks call it at start. The same
settings as environment variables, for other programs: `MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=2147483647`.
"""
from __future__ import annotations

import ctypes
import logging
import platform

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_TRIM_THRESHOLD = 2**31 - 1   # the largest value mallopt takes: never return the heap's top

_applied = False


def jax_backends_started() -> bool:
  """Whether JAX has created its backends (and so its CPU client's threads)."""
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  started = getattr(xla_bridge, "backends_are_initialized", None)
  return bool(started()) if started is not None else bool(getattr(xla_bridge, "_backends", {}))


def reuse_host_memory() -> bool:
  """Makes freed host memory stay mapped for reuse (see the module docstring).

  Returns True when the settings are in force (set now or by an earlier call), False when they
  cannot help: not glibc (nothing is changed), or JAX's backends already started (a warning says
  so, and nothing is changed: the worker threads keep their own arenas).
  """
  global _applied
  if _applied:
    return True
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  if jax_backends_started():
    logging.warning("reuse_host_memory: JAX's backends have already started, so XLA's threads "
                    "keep their own malloc arenas and the setting cannot help; call it before "
                    "any JAX computation. Nothing was changed.")
    return False
  libc = ctypes.CDLL("libc.so.6")
  ok = all(libc.mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)))
  if not ok:
    logging.warning("reuse_host_memory: glibc refused a mallopt setting; host scratch memory is "
                    "still allocated per execution.")
  _applied = ok
  return ok
