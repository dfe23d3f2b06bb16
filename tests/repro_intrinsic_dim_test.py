"""experiments.repro_intrinsic_dim: the CNN subspace training against a hand-written loop on an
explicit float64 projection, the projections' column norms, d_int90 from rows, config errors."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import lowrank_jax as lj
from configs.repro import intrinsic_dim as config_lib
from experiments import repro_intrinsic_dim as exp
from lowrank_jax import tree as tree_lib
from lowrank_jax.adapters import intrinsic as intr

N, SIDE, D_SUB = 12, 8, 24      # examples, image side, subspace dimension


def _explicit_blocks(state, shapes: dict, d: int) -> dict:
  """{path: (leaf size, d) float64 rows of P}, rebuilt in numpy from the frozen state."""
  frozen = state.frozen
  if frozen.fastfood is not None:   # one block over the paths in sorted order
    paths = sorted(shapes)
    sizes = [int(np.prod(shapes[p])) for p in paths]
    full = intr.fastfood_matrix(frozen.fastfood, sum(sizes), d)
    return dict(zip(paths, np.split(full, np.cumsum(sizes)[:-1])))
  out = {}
  for p, blk in tree_lib.unnest(frozen.leaves).items():
    if isinstance(blk, intr.DenseLeaf):
      out[p] = np.asarray(blk.p, np.float64)
    else:
      m = np.zeros((int(np.prod(shapes[p])), d))
      np.add.at(m, (np.asarray(blk.rows), np.asarray(blk.cols)), np.asarray(blk.vals, np.float64))
      out[p] = m
  return out


def _cnn():
  """The experiment's CNN at width 2 (channels (2, 4), D = 146): params, classify, shapes."""
  params, classify, _ = exp.build_model("cnn", 2, 0)
  return params, classify, {p: x.shape for p, x in tree_lib.flatten_with_names(params)[0]}


@pytest.mark.parametrize("projection", ["fastfood", "dense", "sparse"])
def test_projection_columns_on_the_cnn_have_unit_norm(projection):
  params, _, shapes = _cnn()
  _, state = lj.intrinsic_dimension(D_SUB, projection).init(jax.random.key(0), params)
  blocks = _explicit_blocks(state, shapes, D_SUB)
  assert sorted(blocks) == sorted(shapes)                    # every leaf, biases included
  norms = np.sqrt(sum(np.sum(b * b, axis=0) for b in blocks.values()))
  if projection == "fastfood":   # unit norm in expectation only (D of the L = 256 rows kept)
    assert 0.6 < np.mean(norms ** 2) < 1.4, norms
  else:
    np.testing.assert_allclose(norms, 1.0, rtol=1e-6)


def test_cnn_subspace_training_matches_explicit_projection():
  params, classify, shapes = _cnn()
  flat0 = dict(tree_lib.flatten_with_names(params)[0])
  key_x, key_y = jax.random.split(jax.random.key(3))
  train = {"image": jax.random.normal(key_x, (N, SIDE, SIDE, 1)),
           "label": jax.random.randint(key_y, (N,), 0, 10)}
  adapter = lj.intrinsic_dimension(D_SUB, "sparse")
  got = exp.train_params(adapter, params, classify, train, lr=0.05, num_steps=3, batch_size=5,
                         seed=7)
  _, state = adapter.init(jax.random.key(0), params)          # the key train_params uses
  blocks = _explicit_blocks(state, shapes, D_SUB)

  def loss(theta, batch):
    p = tree_lib.replace_by_name(params, {
        k: flat0[k] + (jnp.asarray(blocks[k], jnp.float32) @ theta).reshape(shapes[k])
        for k in blocks})
    return optax.softmax_cross_entropy_with_integer_labels(classify(p, batch),
                                                           batch["label"]).mean()

  grad = jax.jit(jax.grad(loss))
  theta, opt = jnp.zeros(D_SUB), optax.adam(0.05)
  opt_state = opt.init(theta)
  rng = np.random.default_rng(7)      # epochs of 12 hold 2 batches of 5; step 3 starts a new one
  first = rng.permutation(N)
  picks = [first[0:5], first[5:10], rng.permutation(N)[0:5]]
  for idx in picks:
    g = grad(theta, {"image": train["image"][idx], "label": train["label"][idx]})
    upd, opt_state = opt.update(g, opt_state)
    theta = optax.apply_updates(theta, upd)
  assert float(jnp.linalg.norm(theta)) > 0.01                 # it moved
  for k, x in dict(tree_lib.flatten_with_names(got)[0]).items():
    want = np.asarray(flat0[k], np.float64) + (blocks[k] @ np.asarray(theta, np.float64)
                                               ).reshape(shapes[k])
    np.testing.assert_allclose(np.asarray(x), want, atol=2e-5, err_msg=k)


def test_summarize_takes_the_smallest_d_over_the_line():
  row = lambda proj, w, d, acc: {"projection": proj, "width": w, "num_params": 10 * w, "d": d,
                                 "accuracy": acc, "baseline_accuracy": 0.8}
  rows = [row("dense", 8, 100, 0.73), row("dense", 8, 50, 0.60), row("dense", 8, 200, 0.70),
          row("sparse", 8, 50, 0.71), row("sparse", 8, 100, 0.75),
          row("dense", 16, 50, 0.1), row("dense", 16, 100, 0.71)]
  s = exp.summarize(rows, 0.9)                                # line at 0.72
  assert s["d_int90"] == {"dense": {8: 100, 16: None}, "sparse": {8: 100}}
  assert s["num_params"] == {8: 80, 16: 160} and s["baseline_accuracy"][16] == 0.8


def test_fashion_split_is_standardised():
  train, test = exp.load_fashion_split(600, 50, 0)
  assert train["image"].shape == (600, 28, 28, 1) and test["image"].shape == (50, 28, 28, 1)
  np.testing.assert_allclose([float(train["image"].mean()), float(train["image"].std())],
                             [0.0, 1.0], atol=1e-4)
  assert set(np.unique(np.asarray(train["label"]))) <= set(range(10))


def test_config_args_and_errors():
  c = config_lib.get_config("model=cnn,projection=dense+sparse,widths=4+8")
  assert (c.model, c.dataset, c.projections, c.widths) == ("cnn", "fashion_mnist",
                                                          ("dense", "sparse"), (4, 8))
  assert config_lib.get_config().projections == ("fastfood",)
  with pytest.raises(ValueError, match="model='vit'.*valid models"):
    config_lib.get_config("model=vit")
  with pytest.raises(ValueError, match="projection='dense\\+lora'.*one or more of"):
    config_lib.get_config("projection=dense+lora")
  with pytest.raises(ValueError, match="widths='8\\+x'.*positive ints"):
    config_lib.get_config("widths=8+x")
  bad = ml_collections.ConfigDict(dict(model="cnn", widths=(2,), seed=0, dims=(10, 300),
                                       projections=("fastfood",)))
  with pytest.raises(ValueError, match="d = 300 exceeds the Fastfood block size 256"):
    exp.check_config(bad)
