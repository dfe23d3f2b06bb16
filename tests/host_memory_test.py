"""`host_memory.reuse_host_memory` against the kernel's own count of page faults.

Two fresh processes run the same jitted gradient, whose XLA:CPU scratch buffer (read from the
compiled executable's memory analysis) is larger than a glibc thread arena can hold: without the
setting every call faults the buffer in again, with it the median call faults almost nothing.
"""
import json
import logging
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp

from lowrank_jax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.sysconf("SC_PAGE_SIZE")

_PROBE = textwrap.dedent("""
    import json, resource, sys
    from lowrank_jax import host_memory
    applied = host_memory.reuse_host_memory() if sys.argv[1] == "reuse" else False
    import jax, jax.numpy as jnp

    def loss(ws, x):
      for w in ws:
        x = jnp.tanh(x @ w)
      return jnp.sum(x * x)

    grad = jax.jit(jax.grad(loss))
    ws = [jnp.full((256, 256), 0.01, jnp.float32) for _ in range(4)]
    x = jnp.ones((32768, 256), jnp.float32)
    temp = grad.lower(ws, x).compile().memory_analysis().temp_size_in_bytes
    for _ in range(3):
      jax.block_until_ready(grad(ws, x))
    faults = []
    for _ in range(9):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      jax.block_until_ready(grad(ws, x))
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"applied": applied, "temp_bytes": temp,
                      "median_faults_per_call": sorted(faults)[len(faults) // 2]}))
""")


def probe(mode: str) -> dict:
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  out = subprocess.run([sys.executable, "-c", _PROBE, mode], env=env, capture_output=True,
                       text=True, timeout=300, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_scratch_buffer_is_faulted_in_per_call_unless_reused():
  control, reused = probe("per_call"), probe("reuse")
  assert control["temp_bytes"] > 96 * 2**20   # beyond a thread arena's 64 MB
  pages = control["temp_bytes"] / PAGE
  assert not control["applied"] and reused["applied"]
  assert control["median_faults_per_call"] > 0.5 * pages, control
  # A call now and then still faults the buffer in (XLA frees it asynchronously, so the next call
  # may allocate first and grow the heap); the median call faults nothing.
  assert reused["median_faults_per_call"] < 0.05 * pages, reused


def test_after_jax_started_it_changes_nothing_and_says_so(caplog):
  jnp.zeros(1).block_until_ready()   # the backends are up in this process
  assert host_memory.jax_backends_started()
  with caplog.at_level(logging.WARNING):
    assert host_memory.reuse_host_memory() is False
  assert "before any JAX computation" in caplog.text
