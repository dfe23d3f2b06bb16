"""Two real processes on 127.0.0.1 (`jax.distributed`, CPU, one device each) train one run.

Each process reads its own shard of the train data; the batch is split over the 2-device `data`
mesh. Both processes see the same loss at every step (it is the loss of the global batch), write
one orbax checkpoint together, and both resume from it: the resumed steps repeat the first run's
losses exactly. Only process 0 writes the metrics, adapter and results.
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap

import numpy as np

SCRIPT = textwrap.dedent("""
    import json, os, shutil, sys
    process_id, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    from configs import digits_lora
    from lowrank_jax import sharding, train
    c = digits_lora.get_config("runlocal")
    c.total_steps, c.ckpt_every, c.eval_every, c.log_every, c.progress = 4, 2, 0, 1, False
    c.distributed.coordinator_address = f"127.0.0.1:{port}"
    c.distributed.num_processes, c.distributed.process_id = 2, process_id
    losses = []
    real_make_steps = train.make_steps

    def recording_make_steps(*args, **kwargs):   # the loss of every step, as this process sees it
      train_step, eval_step = real_make_steps(*args, **kwargs)
      def step(state, base, batch):
        state, metrics = train_step(state, base, batch)
        losses.append(float(metrics["loss"]))
        return state, metrics
      return step, eval_step

    train.make_steps = recording_make_steps
    first = train.train_and_evaluate(c, workdir)
    import jax
    assert jax.process_count() == 2 and jax.device_count() == 2, jax.devices()
    first_losses = list(losses)
    sharding.barrier("first run done")
    if process_id == 0:   # the run is cut after its step-2 checkpoint
      os.remove(os.path.join(workdir, "results.json"))
      shutil.rmtree(os.path.join(workdir, "ckpt", "4"))
    sharding.barrier("cut")
    losses.clear()
    resumed = train.train_and_evaluate(c, workdir)
    print("RESULT " + json.dumps({
        "first": first_losses, "resumed": losses, "resumed_from": resumed["resumed_from"],
        "eval": [first["eval_loss"], resumed["eval_loss"]]}), flush=True)
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_checkpoint_and_resume_alike():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)   # one CPU device per process
  workdir = os.path.join(tempfile.mkdtemp(), "run")
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(i), port, workdir], env=env,
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=600)
      assert p.returncode == 0, err[-3000:]
      outs.append(json.loads(out.split("RESULT ", 1)[1]))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  r0, r1 = outs
  assert len(r0["first"]) == 4 and r0["first"] == r1["first"], (r0, r1)
  assert r0["resumed_from"] == r1["resumed_from"] == 2
  assert r0["resumed"] == r1["resumed"] == r0["first"][2:], (r0, r1)
  assert r0["eval"] == r1["eval"] and np.isfinite(r0["eval"]).all()
  assert r0["eval"][0] == r0["eval"][1]   # the resumed run ends where the uninterrupted one did
  assert sorted(os.listdir(os.path.join(workdir, "ckpt"))) == ["2", "4"]
  for name in ("results.json", "metrics.jsonl", "adapter"):   # written once, by process 0
    assert os.path.exists(os.path.join(workdir, name)), name
  steps = [json.loads(l)["step"] for l in open(os.path.join(workdir, "metrics.jsonl"))
           if "loss" in json.loads(l)]
  assert steps == [1, 2, 3, 4], steps
