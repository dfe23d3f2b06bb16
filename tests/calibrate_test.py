"""Tests of `lowrank_jax.calibrate`: hand-computed covariances on the tiny model."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax import calibrate
from lowrank_jax import testing
from lowrank_jax import tree as tree_lib

DENSE = ["dense_0/kernel", "dense_1/kernel"]


def _inputs(params, batch):
  """The rows entering dense_0 and dense_1 (computed by hand from the tiny model)."""
  h0 = np.asarray(params["embed"]["embedding"])[np.asarray(batch["ids"])]
  h1 = np.tanh(h0 @ np.asarray(params["dense_0"]["kernel"]) + np.asarray(params["dense_0"]["bias"]))
  return h0.reshape(-1, 6).astype(np.float64), h1.reshape(-1, 8).astype(np.float64)


def _batches(n=2):
  return [testing.tiny_batch(jax.random.key(20 + i)) for i in range(n)]


def test_covariance_matches_hand_computation():
  params = testing.tiny_params()
  batches = _batches(3)
  stats = calibrate.collect(testing.tiny_apply, params, batches, DENSE)
  x0 = np.concatenate([_inputs(params, b)[0] for b in batches])
  x1 = np.concatenate([_inputs(params, b)[1] for b in batches])
  s0, s1 = stats["dense_0"]["kernel"], stats["dense_1"]["kernel"]
  assert s0.cov.dtype == jnp.float32 and s0.cov.shape == (6, 6)
  np.testing.assert_allclose(s0.cov, x0.T @ x0 / len(x0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(s1.cov, x1.T @ x1 / len(x1), rtol=1e-5, atol=1e-6)
  assert float(s0.count) == len(x0) == 60
  assert s0.out_cov is None


def test_mask_excludes_padding_tokens():
  params = testing.tiny_params()
  batches = _batches(2)
  for i, b in enumerate(batches):
    m = np.ones((4, 5), np.float32)
    m[:, 3 + i:] = 0.0
    m[1, 1:] = 0.0
    b["mask"] = jnp.asarray(m)
  stats = calibrate.collect(testing.tiny_apply, params, batches, DENSE, mask_key="mask")
  rows0, rows1 = [], []
  for b in batches:
    keep = np.asarray(b["mask"]).reshape(-1) > 0
    x0, x1 = _inputs(params, b)
    rows0.append(x0[keep])
    rows1.append(x1[keep])
  x0, x1 = np.concatenate(rows0), np.concatenate(rows1)
  np.testing.assert_allclose(stats["dense_0"]["kernel"].cov, x0.T @ x0 / len(x0), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(stats["dense_1"]["kernel"].cov, x1.T @ x1 / len(x1), rtol=1e-5,
                             atol=1e-6)
  assert float(stats["dense_0"]["kernel"].count) == len(x0)
  # mask_fn gives the same thing.
  stats2 = calibrate.collect(testing.tiny_apply, params, batches, DENSE,
                             mask_fn=lambda b: b["mask"])
  np.testing.assert_allclose(stats2["dense_1"]["kernel"].cov, stats["dense_1"]["kernel"].cov)


def test_output_covariance_and_conv_patch_layout():
  params = testing.tiny_params()
  batches = _batches(2)
  stats = calibrate.collect(testing.tiny_apply, params, batches, DENSE + ["conv/kernel"],
                            kinds=("covariance", "output_covariance"), kernel_axes="conv")
  x0 = np.concatenate([_inputs(params, b)[0] for b in batches])
  y0 = x0 @ np.asarray(params["dense_0"]["kernel"], np.float64)
  np.testing.assert_allclose(stats["dense_0"]["kernel"].out_cov, y0.T @ y0 / len(y0), rtol=1e-5,
                             atol=1e-6)
  # conv: y = patches @ kernel.reshape(d_in, c_out), so out_cov == W_mᵀ C W_m checks that the
  # im2col features follow the kernel's own (kh, kw, c_in) order.
  s = stats["conv"]["kernel"]
  assert s.cov.shape == (27, 27) and float(s.count) == 2 * 4 * 6 * 6
  wm = np.asarray(params["conv"]["kernel"], np.float64).reshape(27, 4)
  np.testing.assert_allclose(s.out_cov, wm.T @ np.asarray(s.cov, np.float64) @ wm, rtol=1e-4,
                             atol=1e-5)


def test_corda_sample_scale():
  params = testing.tiny_params()
  batches = _batches(2)
  stats = calibrate.collect(testing.tiny_apply, params, batches, ["dense_0/kernel"],
                            sample_scale="corda")
  rows = []
  for b in batches:
    x0 = _inputs(params, b)[0].reshape(4, 5, 6)
    rows.append((x0 / np.abs(x0.max(axis=(1, 2)))[:, None, None]).reshape(-1, 6))
  x = np.concatenate(rows)
  np.testing.assert_allclose(stats["dense_0"]["kernel"].cov, x.T @ x / len(x), rtol=1e-5,
                             atol=1e-6)


def test_memory_bounded_outputs_do_not_depend_on_batch():
  params = testing.tiny_params()
  fn = calibrate.batch_stats_fn(testing.tiny_apply, params, DENSE,
                                kinds=("covariance", "output_covariance"))
  small = jax.eval_shape(fn, params, testing.tiny_batch())
  big_batch = {"ids": jnp.zeros((64, 33), jnp.int32), "images": jnp.zeros((64, 6, 6, 3)),
               "y": jnp.zeros((64, 10))}
  big = jax.eval_shape(fn, params, big_batch)
  assert jax.tree_util.tree_map(lambda s: s.shape, small) == \
      jax.tree_util.tree_map(lambda s: s.shape, big)
  for s in jax.tree_util.tree_leaves(big):
    assert 64 not in s.shape and 33 not in s.shape and s.size <= 64
  # The jitted function's output is only the statistics (no activations leak out).
  out = jax.jit(fn)(params, big_batch)
  assert set(out) == set(DENSE)


def test_stats_feed_adapter_init_shapes_nested_and_flat():
  from lowrank_jax.adapters import _leafwise
  params = testing.tiny_params()
  stats = calibrate.collect(testing.tiny_apply, params, _batches(1), DENSE)
  flat = _leafwise.flat_stats(stats)
  assert sorted(flat) == DENSE


@pytest.mark.parametrize("kwargs, match", [
    (dict(kinds=("cov",)), "kinds"),
    (dict(kinds=()), "kinds"),
    (dict(sample_scale="max"), "sample_scale"),
    (dict(mask_key="attention_mask"), "attention_mask"),
    (dict(targets=["embed/embedding"]), "embedding"),
    (dict(targets=["dense_9/kernel"]), "matches no parameter path"),
    (dict(batches=[]), "no batch"),
])
def test_errors(kwargs, match):
  args = dict(targets=DENSE, batches=_batches(1))
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    calibrate.collect(testing.tiny_apply, testing.tiny_params(), **args)


def test_unused_target_raises():
  params = testing.tiny_params()
  apply0 = lambda p, b: testing.ops.dense(p["embed"]["embedding"][b["ids"]], p["dense_0"]["kernel"])
  with pytest.raises(ValueError, match="never multiplied"):
    calibrate.collect(apply0, params, _batches(1), DENSE)


def test_project_model_minilm_tiny_with_attention_mask():
  """Works on the project's models unchanged: all linear kernels of a tiny MiniLM, pads masked."""
  from lowrank_jax.models import minilm
  cfg = minilm.MiniLMConfig.tiny()
  params = minilm.init(jax.random.key(0), cfg)
  ids = jax.random.randint(jax.random.key(1), (3, 7), 1, cfg.vocab_size)
  mask = jnp.asarray([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5], jnp.int32)
  batch = {"input_ids": ids, "attention_mask": mask}
  apply_fn = lambda p, b: minilm.encode(p, cfg, b["input_ids"], b["attention_mask"])
  stats = calibrate.collect(apply_fn, params, [batch, batch], r"encoder/.*/kernel",
                            mask_key="attention_mask")
  flat = tree_lib.unnest(stats)
  assert len(flat) == 6 * cfg.num_layers
  for path, s in flat.items():
    assert float(s.count) == 2 * 13, path
    d_in = dict(tree_lib.flatten_with_names(params)[0])[path].shape[0]
    assert s.cov.shape == (d_in, d_in)
    np.testing.assert_allclose(s.cov, s.cov.T, rtol=1e-5, atol=1e-6)
  # layer 0 query input = embeddings after LayerNorm: check against the masked rows by hand.
  e = params["embeddings"]
  x = (e["word_embeddings"]["embedding"][ids] + e["position_embeddings"]["embedding"][:7][None]
       + e["token_type_embeddings"]["embedding"][jnp.zeros_like(ids)])
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  x = (x - mu) / jnp.sqrt(var + cfg.layer_norm_eps) * e["norm"]["scale"] + e["norm"]["bias"]
  rows = np.asarray(x, np.float64)[np.asarray(mask) > 0]
  np.testing.assert_allclose(flat["encoder/layer_0/attention/query/kernel"].cov,
                             rows.T @ rows / len(rows), rtol=1e-4, atol=1e-5)
