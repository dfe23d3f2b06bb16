"""Adapter files: our format round trip, and the Hugging Face PEFT layout (built by hand too)."""
import json
import os
import re
import tempfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import lowrank_jax as lj
from lowrank_jax import adapter_io
from lowrank_jax import base as base_lib
from lowrank_jax import tree as tree_lib
from lowrank_jax.models import llama
from lowrank_jax.models import minilm

MINILM_QV = r"encoder/layer_\d+/attention/(query|value)/kernel"
LLAMA_QV = r"layers/layer_\d+/attention/(q_proj|v_proj)/kernel"


def _randomize(state, key):
  """Non-zero B factors (init has B = 0, which would hide orientation mistakes)."""
  leaves, treedef = jax.tree.flatten(state.trainable)
  keys = jax.random.split(key, len(leaves))
  leaves = [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  return base_lib.AdapterState(jax.tree.unflatten(treedef, leaves), state.frozen)


def _minilm_tiny():
  cfg = minilm.MiniLMConfig.tiny()
  return minilm.init(jax.random.key(0), cfg), cfg


def _llama_tiny():
  cfg = llama.LlamaConfig.preset("tiny")
  return llama.init(jax.random.key(0), cfg), cfg


def test_round_trip_with_head_and_keys():
  params, _ = _minilm_tiny()
  adapter = lj.lora(rank=4, alpha=8.0, targets=MINILM_QV)
  _, state = adapter.init(jax.random.key(1), params)
  state = _randomize(state, jax.random.key(2))
  state = base_lib.AdapterState(state.trainable,
                                {"seed": jax.random.key(3), "mask": jnp.ones((2,), jnp.bool_),
                                 "pair": (jnp.zeros(2), None)})
  head = {"head": {"kernel": jnp.ones((64, 5)), "bias": jnp.zeros(5)}}
  d = tempfile.mkdtemp()
  adapter_io.save_adapter(d, state, {"method": "lora", "rank": 4}, head=head, adapter=adapter)
  state2, cfg, head2 = adapter_io.load_adapter(d)
  assert cfg == {"method": "lora", "rank": 4}
  assert adapter_io.saved_adapter_info(d) == {
      "name": "lora", "method": "lora",
      "hparams": {"rank": 4, "alpha": 8.0, "targets": MINILM_QV, "dropout": 0.0,
                  "use_rslora": False, "init": "kaiming_uniform", "niter": None,
                  "kernel_axes": None, "dtype": "float32", "impl": "custom_vjp"}}
  chex.assert_trees_all_equal(state.trainable, state2.trainable)
  chex.assert_trees_all_equal_structs(state.trainable, state2.trainable)
  assert isinstance(state2.trainable["encoder"]["layer_0"]["attention"]["query"]["kernel"],
                    lj.LoRAFactors)
  np.testing.assert_array_equal(jax.random.key_data(state2.frozen["seed"]),
                                jax.random.key_data(state.frozen["seed"]))
  assert state2.frozen["mask"].dtype == jnp.bool_
  assert state2.frozen["pair"][1] is None
  chex.assert_trees_all_equal(head, head2)
  names = safetensors.numpy.load_file(os.path.join(d, adapter_io.ADAPTER_FILE))
  assert "trainable/encoder/layer_0/attention/query/kernel/a" in names


def test_without_adapter_no_info():
  d = tempfile.mkdtemp()
  adapter_io.save_adapter(d, lj.EmptyState, {"run": 1})
  assert adapter_io.saved_adapter_info(d) is None


def test_not_an_adapter_dir():
  with pytest.raises(FileNotFoundError, match="not an adapter directory"):
    adapter_io.load_adapter(tempfile.mkdtemp())


@pytest.mark.parametrize("model, targets, short",
                         [("minilm", MINILM_QV, ["query", "value"]),
                          ("llama", LLAMA_QV, ["q_proj", "v_proj"])])
def test_export_import_round_trip(model, targets, short):
  params, cfg = _minilm_tiny() if model == "minilm" else _llama_tiny()
  adapter = lj.lora(rank=4, alpha=8.0, targets=targets)
  _, state = adapter.init(jax.random.key(1), params)
  state = _randomize(state, jax.random.key(2))
  d = tempfile.mkdtemp()
  adapter_io.export_peft(d, adapter, state, model=model, cfg=cfg)
  with open(os.path.join(d, adapter_io.PEFT_CONFIG)) as f:
    pcfg = json.load(f)
  assert (pcfg["peft_type"], pcfg["r"], pcfg["lora_alpha"]) == ("LORA", 4, 8.0)
  assert pcfg["target_modules"] == short
  tensors = safetensors.numpy.load_file(os.path.join(d, adapter_io.PEFT_WEIGHTS))
  hf = ("encoder.layer.0.attention.self.query" if model == "minilm"
        else "model.layers.0.self_attn.q_proj")
  ours = ("encoder/layer_0/attention/query/kernel" if model == "minilm"
          else "layers/layer_0/attention/q_proj/kernel")
  a = tree_lib.unnest(state.trainable)[ours].a
  d_in = a.shape[0]
  assert tensors[f"base_model.model.{hf}.lora_A.weight"].shape == (4, d_in)
  np.testing.assert_array_equal(tensors[f"base_model.model.{hf}.lora_A.weight"], np.asarray(a).T)
  adapter2, state2, info = adapter_io.import_peft(d, model=model, cfg=cfg)
  assert info["r"] == 4
  chex.assert_trees_all_equal(state.trainable, state2.trainable)
  chex.assert_trees_all_close(lj.merge(adapter.apply(params, state)),
                              lj.merge(adapter2.apply(params, state2)))


def test_handmade_peft_file_matches_dense_reference():
  """A PEFT file written with safetensors.numpy in PyTorch layout gives W + (alpha/r)·(B·A)ᵀ."""
  params, cfg = _minilm_tiny()
  r, alpha, d = 2, 6.0, 64
  rng = np.random.default_rng(0)
  lora_a = rng.normal(size=(r, d)).astype(np.float32)      # lora_A.weight (r, d_in)
  lora_b = rng.normal(size=(d, r)).astype(np.float32)      # lora_B.weight (d_out, r)
  path = tempfile.mkdtemp()
  safetensors.numpy.save_file({
      "base_model.model.encoder.layer.1.attention.self.value.lora_A.weight": lora_a,
      "base_model.model.encoder.layer.1.attention.self.value.lora_B.weight": lora_b},
      os.path.join(path, "adapter_model.safetensors"))
  with open(os.path.join(path, "adapter_config.json"), "w") as f:
    json.dump({"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["value"],
               "task_type": None}, f)
  adapter, state, _ = adapter_io.import_peft(path, model="minilm", cfg=cfg)
  merged = lj.merge(adapter.apply(params, state))
  # PyTorch: W_torch (d_out, d_in), y = x W_torchᵀ; PEFT: W_torch + s·B·A. Our kernel = W_torchᵀ.
  w_torch = np.asarray(params["encoder"]["layer_1"]["attention"]["value"]["kernel"]).T
  ref_torch = w_torch + (alpha / r) * lora_b @ lora_a
  np.testing.assert_allclose(merged["encoder"]["layer_1"]["attention"]["value"]["kernel"],
                             ref_torch.T, rtol=1e-5, atol=1e-5)
  # The adapted forward (factored path) equals the dense reference model.
  ids = jnp.asarray(rng.integers(0, 1000, (2, 8)), jnp.int32)
  dense_params = jax.tree.map(lambda x: x, params)
  dense_params["encoder"]["layer_1"]["attention"]["value"]["kernel"] = jnp.asarray(ref_torch.T)
  y = minilm.encode(adapter.apply(params, state), cfg, ids)
  y_ref = minilm.encode(dense_params, cfg, ids)
  np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
  # Other modules untouched.
  np.testing.assert_array_equal(merged["encoder"]["layer_0"]["attention"]["value"]["kernel"],
                                params["encoder"]["layer_0"]["attention"]["value"]["kernel"])


def test_seq_cls_prefix_and_head():
  params, cfg = _minilm_tiny()
  params = minilm.add_classifier_head(jax.random.key(5), params, 3)
  adapter = lj.lora(rank=2, targets=r"encoder/layer_0/attention/query/kernel")
  _, state = adapter.init(jax.random.key(1), params)
  d = tempfile.mkdtemp()
  adapter_io.export_peft(d, adapter, state, model="minilm", cfg=cfg, task_type="SEQ_CLS",
                         head={"head": params["head"]})
  names = set(safetensors.numpy.load_file(os.path.join(d, adapter_io.PEFT_WEIGHTS)))
  assert ("base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
          in names)
  assert "base_model.model.classifier.weight" in names
  with open(os.path.join(d, adapter_io.PEFT_CONFIG)) as f:
    pcfg = json.load(f)
  assert pcfg["modules_to_save"] == ["classifier"]
  assert pcfg["target_modules"] == ["encoder.layer.0.attention.self.query"]
  _, state2, info = adapter_io.import_peft(d, model="minilm", cfg=cfg)
  chex.assert_trees_all_equal(state.trainable, state2.trainable)
  chex.assert_trees_all_close(info["head"]["head"], params["head"])


def test_pissa_export_is_lora_of_original_weights():
  params, cfg = _llama_tiny()
  adapter = lj.pissa(rank=2, alpha=4.0, targets=r"layers/layer_0/attention/q_proj/kernel")
  base, init_state = adapter.init(jax.random.key(0), params)
  trained = _randomize(init_state, jax.random.key(1))
  d = tempfile.mkdtemp()
  adapter_io.export_peft(d, adapter, trained, model="llama", cfg=cfg, initial=init_state)
  lora_adapter, lora_state, info = adapter_io.import_peft(d, model="llama", cfg=cfg)
  assert (info["r"], info["lora_alpha"]) == (4, 8.0)
  chex.assert_trees_all_close(lj.merge(lora_adapter.apply(params, lora_state)),
                              lj.merge(adapter.apply(base, trained)), atol=1e-5, rtol=1e-5)


def test_errors():
  params, cfg = _minilm_tiny()
  with pytest.raises(ValueError, match=r"Unknown model 'gpt2'.*valid"):
    adapter_io.export_peft(tempfile.mkdtemp(), lj.lora(1), lj.EmptyState, model="gpt2",
                           cfg=cfg)
  _, state = lj.lora(rank=2, targets=MINILM_QV).init(jax.random.key(0), params)
  with pytest.raises(ValueError, match="not rank-4"):
    adapter_io.export_peft(tempfile.mkdtemp(), lj.lora(rank=4, targets=MINILM_QV), state,
                           model="minilm", cfg=cfg)
  path = tempfile.mkdtemp()
  safetensors.numpy.save_file(
      {"base_model.model.foo.lora_A.weight": np.zeros((1, 2), np.float32)},
      os.path.join(path, "adapter_model.safetensors"))
  with open(os.path.join(path, "adapter_config.json"), "w") as f:
    json.dump({"peft_type": "LORA", "r": 1, "lora_alpha": 1}, f)
  with pytest.raises(ValueError, match="module 'foo' is not a minilm module"):
    adapter_io.import_peft(path, model="minilm", cfg=cfg)
  with open(os.path.join(path, "adapter_config.json"), "w") as f:
    json.dump({"peft_type": "IA3", "r": 1}, f)
  with pytest.raises(ValueError, match="only peft_type 'LORA'"):
    adapter_io.import_peft(path, model="minilm", cfg=cfg)


def _peft_files(path):
  with open(os.path.join(path, adapter_io.PEFT_CONFIG)) as f:
    pcfg = json.load(f)
  return pcfg, safetensors.numpy.load_file(os.path.join(path, adapter_io.PEFT_WEIGHTS))


def _peft_delta(pcfg, tensors, hf):
  """ΔW in PyTorch (d_out, d_in) layout by PEFT's definition: scale·lora_B·lora_A, scale =
  lora_alpha/r, or lora_alpha/√r with use_rslora; float64."""
  r = pcfg["r"]
  scale = pcfg["lora_alpha"] / (np.sqrt(r) if pcfg["use_rslora"] else r)
  lora_a = tensors[f"base_model.model.{hf}.lora_A.weight"].astype(np.float64)
  lora_b = tensors[f"base_model.model.{hf}.lora_B.weight"].astype(np.float64)
  return scale * lora_b @ lora_a


LLAMA_Q = "layers/layer_0/attention/q_proj/kernel"
LLAMA_Q_HF = "model.layers.0.self_attn.q_proj"


# The exported factors and scale give the ΔW the adapter applies, derived by hand.
@pytest.mark.parametrize("rank, alpha, use_rslora",
                         [(3, 5.0, False), (3, 5.0, True), (4, None, False)])
def test_lora_delta_matches_hand_derivation(rank, alpha, use_rslora):
  params, cfg = _llama_tiny()
  adapter = lj.lora(rank=rank, alpha=alpha, targets=LLAMA_Q, use_rslora=use_rslora)
  _, state = adapter.init(jax.random.key(1), params)
  state = _randomize(state, jax.random.key(2))
  d = tempfile.mkdtemp()
  adapter_io.export_peft(d, adapter, state, model="llama", cfg=cfg)
  pcfg, tensors = _peft_files(d)
  f = tree_lib.unnest(state.trainable)[LLAMA_Q]
  a, b = np.asarray(f.a, np.float64), np.asarray(f.b, np.float64)
  alpha_used = rank if alpha is None else alpha      # lora's documented default alpha = r
  s = alpha_used / (np.sqrt(rank) if use_rslora else rank)
  want_torch = (s * a @ b).T                          # our kernel is (d_in, d_out)
  np.testing.assert_allclose(_peft_delta(pcfg, tensors, LLAMA_Q_HF), want_torch, rtol=1e-6,
                             atol=1e-6)
  assert ((pcfg["r"], pcfg["lora_alpha"], pcfg["use_rslora"])
          == (rank, float(alpha_used), use_rslora))


def test_pissa_delta_is_update_of_original_weights():
  params, cfg = _llama_tiny()
  rank, alpha = 2, 3.0
  adapter = lj.pissa(rank=rank, alpha=alpha, targets=LLAMA_Q, use_rslora=True)
  base, initial = adapter.init(jax.random.key(0), params)
  trained = _randomize(initial, jax.random.key(1))
  d = tempfile.mkdtemp()
  adapter_io.export_peft(d, adapter, trained, model="llama", cfg=cfg, initial=initial)
  pcfg, tensors = _peft_files(d)
  f = tree_lib.unnest(trained.trainable)[LLAMA_Q]
  f0 = tree_lib.unnest(initial.trainable)[LLAMA_Q]
  s = alpha / np.sqrt(rank)
  as64 = lambda x: np.asarray(x, np.float64)
  want = s * (as64(f.a) @ as64(f.b) - as64(f0.a) @ as64(f0.b))
  np.testing.assert_allclose(_peft_delta(pcfg, tensors, LLAMA_Q_HF), want.T, rtol=1e-6,
                             atol=1e-6)
  # W_original + ΔW is what the adapter applies on its residual base.
  w0 = as64(tree_lib.unnest(params)[LLAMA_Q])
  adapted = as64(tree_lib.unnest(lj.merge(adapter.apply(base, trained)))[LLAMA_Q])
  np.testing.assert_allclose(w0 + want, adapted, rtol=1e-4, atol=1e-4)


def test_residual_init_needs_matching_initial():
  params, cfg = _llama_tiny()
  adapter = lj.pissa(rank=2, targets=LLAMA_Q)
  _, initial = adapter.init(jax.random.key(0), params)
  with pytest.raises(ValueError, match=r"'pissa' replaced the base weights.*pass initial="):
    adapter_io.export_peft(tempfile.mkdtemp(), adapter, initial, model="llama", cfg=cfg)
  _, other = lj.pissa(rank=2, targets=LLAMA_QV).init(jax.random.key(0), params)
  with pytest.raises(ValueError, match="initial= has paths"):
    adapter_io.export_peft(tempfile.mkdtemp(), adapter, initial, model="llama", cfg=cfg,
                           initial=other)
  _, rank1 = lj.pissa(rank=1, targets=LLAMA_Q).init(jax.random.key(0), params)
  with pytest.raises(ValueError, match=f"initial= factors at {LLAMA_Q} have shapes"):
    adapter_io.export_peft(tempfile.mkdtemp(), adapter, initial, model="llama", cfg=cfg,
                           initial=rank1)
  lora = lj.lora(rank=2, targets=LLAMA_Q)
  _, state = lora.init(jax.random.key(0), params)
  with pytest.raises(ValueError, match="initial= is only for residual-init methods"):
    adapter_io.export_peft(tempfile.mkdtemp(), lora, state, model="llama", cfg=cfg,
                           initial=state)


def test_refuses_methods_without_peft_layout():
  params, cfg = _llama_tiny()
  for adapter in (lj.sorsa(2, targets=LLAMA_Q),
                  lj.chain(lj.lora(2, targets=LLAMA_Q))):
    _, state = adapter.init(jax.random.key(0), params)
    with pytest.raises(
        ValueError, match=rf"adapter '{re.escape(adapter.name)}' has no PEFT LoRA layout; "
        r"exportable methods: \['corda', 'lora', 'pissa'\]"):
      adapter_io.export_peft(tempfile.mkdtemp(), adapter, state, model="llama", cfg=cfg)
  bare = lj.lora(2, targets=LLAMA_Q)._replace(hparams={})
  _, state = bare.init(jax.random.key(0), params)
  with pytest.raises(ValueError, match=r"adapter.hparams lacks \['rank', 'alpha'"):
    adapter_io.export_peft(tempfile.mkdtemp(), bare, state, model="llama", cfg=cfg)

