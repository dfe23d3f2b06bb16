"""Training on a (data, fsdp, tensor) mesh of 8 fake CPU devices equals training on one device.

The tiny Llama decoder (causal LM) and a tiny MiniLM-shaped encoder (classification, with a fully
trained head), one layer each, take 20 LoRA steps through the trainer's own pieces
(`train.place`, `train.make_steps`, `sharding.put_local_batch`) on one device and on data-, fsdp-
and tensor-sharded meshes; the loss trajectories agree to 1e-5 (fp32: only the order of float
reductions differs). The placed shardings are checked against the partition rules: LoRA A
(d_in, r) takes its kernel's d_in spec, B (r, d_out) its d_out spec, the rank axis replicated.
Through `train_and_evaluate`, a run checkpointed on the 8-way data mesh resumes on a 2x2x2 mesh
(`config.mesh`) and ends where the uninterrupted run ended.
One subprocess, because the device count must be set before JAX starts.
"""
import os
import subprocess
import sys
import textwrap

import pytest

from lowrank_jax import sharding

SCRIPT = textwrap.dedent("""
    import functools, tempfile, jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    import lowrank_jax as lj
    from configs import common
    from lowrank_jax import models, optim, sharding, steps, tasks, train
    assert jax.device_count() == 8, jax.devices()
    STEPS, B, T = 20, 8, 16
    MESHES = {"one": None, "data": {"data": 8}, "fsdp": {"fsdp": 8}, "tensor": {"tensor": 8}}

    def llama_case():
      spec = models.get_model("llama_tiny").with_config(num_layers=1)
      params = spec.init(jax.random.key(0))
      apply = lambda p, b, *, train, rng: spec.lm_logits(p, b, deterministic=not train, rng=rng)
      k = jax.random.split(jax.random.key(1), STEPS)
      counting = lambda kk: (jax.random.randint(kk, (B, 1), 0, 256) + jnp.arange(T)) % 256
      batches = [{"input_ids": np.asarray(counting(kk), np.int32),   # learnable: next = id + 1
                  "loss_mask": np.ones((B, T), np.float32),
                  "segment_ids": np.ones((B, T), np.int32)} for kk in k]
      return (train.Model(params, apply, None, spec), tasks.get_task("causal_lm"), batches,
              "lm_head/kernel")

    def minilm_case():
      spec = models.get_model("minilm_tiny").with_config(num_layers=1, dropout_rate=0.0,
                                                         attention_dropout_rate=0.0)
      params = spec.with_classifier(jax.random.key(5), spec.init(jax.random.key(0)), 4)
      apply = lambda p, b, *, train, rng: spec.classify(p, b, deterministic=not train, rng=rng)
      model = train.Model(params, apply, None, spec)
      k = jax.random.key(2)
      batch = {"input_ids": np.asarray(jax.random.randint(k, (B, T), 1, 1000), np.int32),
               "attention_mask": np.ones((B, T), np.int32),
               "label": np.arange(B, dtype=np.int32) % 4}
      batches = [batch] * STEPS   # learnable: the one batch is memorized
      return model, tasks.get_task("classification"), batches, "head/.*"

    def run(case, mesh_sizes):
      model, task, batches, head_regex = case
      devices = jax.devices()[:1] if mesh_sizes is None else jax.devices()
      mesh = sharding.make_mesh(mesh_sizes or {"data": 1}, devices)
      adapter = lj.lora(4, 8.0, r".*(q_proj|v_proj|query|value|down_proj|output)/kernel")
      head = lj.tree.nest(train.split_head(model.params, head_regex)[0])
      base, st = adapter.init(jax.random.key(3), model.params)
      st = lj.AdapterState(jax.tree.map(   # B != 0, so every factor gets a gradient from step 1
          lambda x: x + 0.05 * jax.random.normal(jax.random.key(4), x.shape), st.trainable),
          st.frozen)
      ocfg = common.base_config().optimizer
      ocfg.lr, ocfg.head_lr = 1e-2, 1e-2
      tx = optim.make_optimizer(ocfg, STEPS)
      init_state = functools.partial(steps.init_train_state, st, tx, head=head, rng=None)
      const, shardings = train.place(mesh, base, init_state, model.spec.partition_rules)
      state = sharding.put_global(init_state(), shardings)
      train_step, _ = train.make_steps(adapter, model, task, tx, state_shardings=shardings)
      losses = []
      for batch in batches:
        state, m = train_step(state, const, sharding.put_local_batch(batch,
                                                                     sharding.batch_sharding(mesh)))
        losses.append(float(m["loss"]))
      return np.array(losses), state, const

    const_mesh = lambda tree: jax.tree.leaves(tree)[0].sharding.mesh

    for name, case in (("llama", llama_case()), ("minilm", minilm_case())):
      ref, _, _ = run(case, None)
      assert ref[-1] < ref[0] - 0.1, (name, ref)   # it trains
      for mesh_name, sizes in MESHES.items():
        if sizes is None:
          continue
        losses, state, const = run(case, sizes)
        np.testing.assert_allclose(losses, ref, rtol=1e-5, atol=1e-5, err_msg=f"{name} {mesh_name}")
        print(f"{name} {mesh_name}: max |loss - one device| {np.max(np.abs(losses - ref)):.2e}")
        if mesh_name == "tensor":   # placed as the rules say; factors follow their kernels
          q = "layers/layer_0/attention/q_proj/kernel" if name == "llama" else \\
              "encoder/layer_0/attention/query/kernel"
          o = "layers/layer_0/mlp/down_proj/kernel" if name == "llama" else \\
              "encoder/layer_0/attention/output/kernel"
          flat = dict(lj.tree.flatten_with_names(state)[0])
          base_flat = dict(lj.tree.flatten_with_names(const)[0])
          mu = [p for p in flat if p.endswith(f"mu/adapter/{q}/b")]
          placed = {**{f"base/{p}": base_flat[p] for p in (q, o)}, **flat, "mu": flat[mu[0]]}
          want = {f"base/{q}": ("fsdp", "tensor"), f"base/{o}": ("tensor", "fsdp"),
                  f"adapter/{q}/a": ("fsdp", None), f"adapter/{q}/b": (None, "tensor"),
                  f"adapter/{o}/a": ("tensor", None), f"adapter/{o}/b": (None, "fsdp"),
                  "mu": (None, "tensor")}   # Adam's first moment of B mirrors B
          if name == "llama":   # the fully trained head keeps its rule's spec
            want["head/lm_head/kernel"] = ("fsdp", "tensor")
          wrong = {p: placed[p].sharding.spec for p, spec in want.items()
                   if not placed[p].sharding.is_equivalent_to(
                       jax.sharding.NamedSharding(const_mesh(const), P(*spec)), 2)}
          assert not wrong, wrong
          b = flat[f"adapter/{q}/b"]
          assert b.sharding.shard_shape(b.shape) == (4, b.shape[1] // 8), b.sharding

    # Through train_and_evaluate: `config.mesh` moves a run, and a checkpoint written on one mesh
    # resumes on another; the results do not change.
    import os, shutil
    from configs import digits_lora
    def digits_run(workdir, **mesh):
      c = digits_lora.get_config("runlocal")
      c.total_steps, c.eval_every, c.ckpt_every, c.progress, c.save_adapter = 6, 0, 3, False, False
      c.mesh.update(mesh)
      return train.train_and_evaluate(c, workdir)
    wd = tempfile.mkdtemp()
    r_data = digits_run(wd)                      # 8-way data parallel, checkpoints at 3 and 6
    os.remove(os.path.join(wd, "results.json"))
    shutil.rmtree(os.path.join(wd, "ckpt", "6"))
    r_mixed = digits_run(wd, data=2, fsdp=2, tensor=2)
    assert r_mixed["resumed_from"] == 3, r_mixed["resumed_from"]
    np.testing.assert_allclose(r_mixed["eval_loss"], r_data["eval_loss"], rtol=1e-5)
    assert r_mixed["accuracy"] == r_data["accuracy"] > 0.2, (r_mixed, r_data)
    print("MESH_OK")
""")


def test_meshes_match_one_device_and_factors_follow_their_kernels():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=root, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "MESH_OK" in out.stdout, out.stdout


@pytest.mark.parametrize("sizes, pattern", [
    ({"data": 3}, r"has 3 devices, but there are 8"),
    ({"data": -1, "fsdp": 3}, r"the other axes \(3 devices\) do not divide the 8 devices"),
    ({"data": -1, "tensor": -1}, r"at most one may be -1"),
    ({"data": 0, "fsdp": 8}, r"sizes must be >= 1"),
    ({"pipeline": 2}, r"unknown axes \['pipeline'\]; valid axes: \['data', 'fsdp', 'tensor'\]"),
])
def test_bad_mesh_is_one_clear_error(sizes, pattern):
  with pytest.raises(ValueError, match=pattern):
    sharding.mesh_shape(sizes, 8)


def test_rule_that_does_not_divide_is_one_clear_error():
  import jax.numpy as jnp   # pylint: disable=g-import-not-at-top
  params = {"k_proj": {"kernel": jnp.zeros((64, 12))}}
  with pytest.raises(ValueError, match=r"dim 1 of k_proj/kernel \(shape \(64, 12\)\) has size 12, "
                                       r"not divisible by the 8 devices of mesh axes 'tensor'"):
    sharding.param_specs(params, ((r".*kernel", ("fsdp", "tensor")),),
                         {"data": 1, "fsdp": 1, "tensor": 8})
  with pytest.raises(ValueError, match=r"must name each of the mesh axes .* at most once"):
    sharding.param_specs(params, ((r".*kernel", ("tensor", "tensor")),),
                         {"data": 1, "fsdp": 1, "tensor": 1})


def test_describe_shows_the_rules_and_the_factor_specs():
  import jax   # pylint: disable=g-import-not-at-top
  import lowrank_jax as lj   # pylint: disable=g-import-not-at-top
  from lowrank_jax import models   # pylint: disable=g-import-not-at-top
  spec = models.get_model("llama_tiny")
  params = jax.eval_shape(spec.init, jax.random.key(0))
  params = {**params, "extra": {"kernel": jax.ShapeDtypeStruct((3, 5), "float32")}}
  text = lj.describe(lj.lora(2, targets=r".*layer_0/mlp/down_proj/kernel"), params,
                     partition_rules=spec.partition_rules,
                     mesh_sizes={"data": 2, "fsdp": 2, "tensor": 2})
  lines = [" ".join(line.split()) for line in text.splitlines()]
  assert ("layers/layer_0/mlp/down_proj/kernel 128x64 P('tensor', 'fsdp') 64x32 "
          ".*/(o_proj|down_proj)/kernel") in lines
  assert "extra/kernel 3x5 P() 3x5 (unmatched: replicated)" in lines
  assert "1 of 22 params unmatched (replicated): ['extra/kernel']" in lines
  assert "layers/layer_0/mlp/down_proj/kernel/a 128x2 P('tensor', None)" in lines   # A: d_in
  assert "layers/layer_0/mlp/down_proj/kernel/b 2x64 P(None, 'fsdp')" in lines      # B: d_out
