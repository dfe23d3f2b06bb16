"""Monet layer: the collapsed forward against a float64 numpy reference that builds each of the E²
experts, the router against a numpy re-derivation (scipy's normal quantile), router sharing in
the decoder, parameter scaling against the closed form, knock-out, bad configs, a train step."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.stats import norm

from lowrank_jax import tasks
from lowrank_jax.models import _layers as L
from lowrank_jax.models import llama, monet

D, E, H, K, M = 6, 4, 2, 2, 4


def _relu2(x):
  return np.maximum(x, 0) ** 2


def _cfg(decompose, **kw):
  return monet.MonetConfig(experts=E, heads=H, topk=K, dim=M, groups=1, decompose=decompose, **kw)


def _random_experts(decompose, seed=0, d=D):
  """Experts params with every leaf random (biases included), std 0.5, float32."""
  p = monet.init_experts(jax.random.key(seed), d, _cfg(decompose))
  leaves, tree = jax.tree.flatten(p)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [0.5 * jax.random.normal(k, x.shape) for k, x in
                                   zip(keys, leaves)])


def _random_gates(seed, shape):
  """Softmax gates (..., H, E) over random logits with random masks (the arg-max kept)."""
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(*shape, H, E))
  keep = (rng.random(z.shape) < 0.5) | (z == z.max(-1, keepdims=True))
  g = np.where(keep, np.exp(z), 0.0)
  return g / g.sum(-1, keepdims=True)


def _np(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _expert_np(p, decompose, i, j, x):
  """Expert (i, j) of one token x (d,), literally from its pieces (float64)."""
  act = _relu2
  if decompose == "horizontal":
    m = M
    u_i = act(x @ p["u"]["kernel"][:, i * m:(i + 1) * m] + p["u"]["bias"][i * m:(i + 1) * m])
    v_j = p["v"]["kernel"][j * m:(j + 1) * m]                     # (m, d): V_j as x @ V_j
    return u_i @ v_j + p["b"][j]
  m = M // 2
  sl = lambda k: slice(k * m, (k + 1) * m)
  u1_i = act(x @ p["u1"]["kernel"][:, sl(i)] + p["u1"]["bias"][sl(i)])
  u2_j = act(x @ p["u2"]["kernel"][:, sl(j)] + p["u2"]["bias"][sl(j)])
  top = u1_i @ p["v11"]["kernel"][sl(i)] + u2_j @ p["v12"]["kernel"][sl(i)] + p["b1"][i]
  bottom = u1_i @ p["v21"]["kernel"][sl(j)] + u2_j @ p["v22"]["kernel"][sl(j)] + p["b2"][j]
  return np.concatenate([top, bottom])


def _naive_np(p, decompose, x, g1, g2, expert=_expert_np):
  """Σ_h Σ_{i,j} g1[h, i] g2[h, j] expert_ij(x) for every token of x (..., d)."""
  p = _np(p)
  xs, g1s, g2s = x.reshape(-1, x.shape[-1]), g1.reshape(-1, H, E), g2.reshape(-1, H, E)
  out = np.zeros_like(xs)
  for t in range(xs.shape[0]):
    for i in range(E):
      for j in range(E):
        w = sum(g1s[t, h, i] * g2s[t, h, j] for h in range(H))
        out[t] += w * expert(p, decompose, i, j, xs[t])
  return out.reshape(x.shape)


def _router_np(p, x, cfg, mean=None, var=None):
  """Gates (..., H, E) re-derived in float64: batch norm per head over tokens x experts (or the
  given statistics), τ = min(max n, norm.ppf(1 - K/E)), softmax of z masked to n >= τ."""
  out = []
  for k in ("w1", "w2"):
    z = (x.reshape(-1, x.shape[-1]) @ np.asarray(p[k]["kernel"], np.float64)).reshape(-1, H, E)
    mu = z.mean(axis=(0, 2)) if mean is None else mean
    v = z.var(axis=(0, 2)) if var is None else var
    n = (z - mu[:, None]) / np.sqrt(v[:, None] + cfg.norm_eps)
    tau = np.minimum(n.max(-1, keepdims=True), norm.ppf(1 - cfg.topk / cfg.experts))
    g = np.where(n >= tau, np.exp(z - z.max(-1, keepdims=True)), 0.0)
    out.append((g / g.sum(-1, keepdims=True)).reshape(*x.shape[:-1], H, E))
  return out


X = np.random.default_rng(0).normal(size=(2, 3, D))


def _f32(*arrays):
  return [jnp.asarray(a, jnp.float32) for a in arrays]


def _close(got, want, tol=1e-5):
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0,
                             atol=tol * np.abs(want).max())


@pytest.mark.parametrize("decompose", ["horizontal", "vertical"])
@pytest.mark.parametrize("d", [D, 20])       # d < E·m (wide pieces) and d > E·m (tall)
def test_collapsed_forward_equals_the_sum_over_all_experts(decompose, d):
  p, cfg = _random_experts(decompose, d=d), _cfg(decompose)
  x = np.random.default_rng(d).normal(size=(2, 3, d))
  g1, g2 = _random_gates(1, x.shape[:-1]), _random_gates(2, x.shape[:-1])
  got = jax.jit(monet.experts, static_argnums=4)(p, *_f32(x, g1, g2), cfg)
  _close(got, _naive_np(p, decompose, x, g1, g2))


@pytest.mark.parametrize("decompose", ["horizontal", "vertical"])
def test_layer_equals_numpy_router_and_naive_experts(decompose):
  cfg = _cfg(decompose)
  p = {"moe": _random_experts(decompose), "router": monet.init_router(jax.random.key(7), D, cfg,
                                                                      std=0.5)}
  got, (g1, g2) = jax.jit(monet.apply_layer, static_argnums=3)(p, *_f32(X), None, cfg)
  w1, w2 = _router_np(p["router"], X, cfg)
  _close(g1, w1)
  _close(g2, w2)
  _close(got, _naive_np(p["moe"], decompose, X, w1, w2))


def test_router_running_statistics_train_and_eval():
  cfg = _cfg("vertical", norm_momentum=0.25)
  p = monet.init_router(jax.random.key(3), D, cfg, std=0.5)
  state = {"norm1": {"mean": jnp.full((H,), 0.5), "var": jnp.full((H,), 2.0)},
           "norm2": {"mean": jnp.zeros((H,)), "var": jnp.ones((H,))}}
  route = jax.jit(monet.route, static_argnums=2, static_argnames="train")
  g1, _, new = route(p, *_f32(X), cfg, state=state, train=True)
  _close(g1, _router_np(p, X, cfg)[0])                       # batch statistics in training
  z = (X.reshape(-1, D) @ np.asarray(p["w1"]["kernel"], np.float64)).reshape(-1, H, E)
  count = z.shape[0] * E
  _close(new["norm1"]["mean"], 0.75 * 0.5 + 0.25 * z.mean(axis=(0, 2)))
  _close(new["norm1"]["var"], 0.75 * 2.0 + 0.25 * z.var(axis=(0, 2)) * count / (count - 1))
  g1, g2, same = route(p, *_f32(X), cfg, state=new, train=False)    # running statistics in eval
  want = _router_np(p, X, cfg, mean=np.asarray(new["norm1"]["mean"], np.float64),
                    var=np.asarray(new["norm1"]["var"], np.float64))[0]
  _close(g1, want)
  assert jax.tree.all(jax.tree.map(np.array_equal, same, new)) and g2.dtype == jnp.float32


def test_threshold_matches_scipy_and_passes_about_k_experts():
  for e, k in [(512, 32), (16, 1), (64, 63)]:
    cfg = monet.MonetConfig(experts=e, topk=k)
    np.testing.assert_allclose(cfg.threshold, norm.ppf(1 - k / e), rtol=1e-12)
  assert monet.MonetConfig(experts=8, topk=8).threshold == -np.inf       # K = E: dense
  cfg = monet.MonetConfig(experts=64, heads=2, topk=8, dim=2)
  p = monet.init_router(jax.random.key(0), 32, cfg)
  x = jax.random.normal(jax.random.key(1), (4096, 32))
  g1, _, _ = jax.jit(monet.route, static_argnums=2)(p, x, cfg)
  active = float(jnp.mean(jnp.sum(g1 > 0, axis=-1)))
  assert 7.0 < active < 9.0, active                            # Gaussian logits: ~K per head
  g_dense, _, _ = monet.route(p, x[:4], dataclasses.replace(cfg, topk=64))
  assert bool(jnp.all(g_dense > 0))


def test_bf16_tokens_route_in_float32():
  cfg = _cfg("horizontal")
  p = monet.init_router(jax.random.key(3), D, cfg, std=0.5)
  xb = jnp.asarray(X, jnp.bfloat16)
  g1, g2, _ = monet.route(p, xb, cfg)
  assert g1.dtype == g2.dtype == jnp.float32
  _close(g1, _router_np(p, np.asarray(xb, np.float64), cfg)[0])
  y = monet.experts(jax.tree.map(lambda a: a.astype(jnp.bfloat16), _random_experts("horizontal")),
                    xb, g1, g2, cfg)
  assert y.dtype == jnp.bfloat16


def test_params_grow_linearly_while_experts_grow_quadratically(capsys):
  cfg = monet.MonetConfig(heads=8, topk=32, dim=8)
  rows = monet.scaling_table(64, cfg)
  assert "262,144" in capsys.readouterr().out
  for r in rows:
    e = r["E"]
    assert r["experts"] == e * e
    assert r["params"] == r["formula"] == 2 * 64 * e * 8 + e * 8 + e * 64
    assert r["router"] == 2 * 64 * 8 * e
  per_piece = {r["params"] / r["E"] for r in rows}
  assert len(per_piece) == 1                                   # exactly linear in E
  hd = monet.scaling_table(64, dataclasses.replace(cfg, decompose="horizontal"), (16, 512))
  assert [r["params"] for r in hd] == [r["params"] for r in rows if r["E"] in (16, 512)]


def test_decoder_shares_the_router_across_a_group():
  """Layer 1 has no router and uses layer 0's gates: with the attention outputs and layer 0's
  experts zeroed, the hidden state is x + experts_1(norm_1(x), route_0(norm_0(x))), x the
  embedding; routing layer 1 from its own input would differ (different norm scales)."""
  cfg = llama.LlamaConfig(ffn="monet", num_layers=4, monet=dict(
      experts=E, heads=H, topk=K, dim=M, groups=2, decompose="vertical"))
  params = llama.init(jax.random.key(0), cfg)
  assert [("router" in params["layers"][f"layer_{i}"]) for i in range(4)] == [1, 0, 1, 0]
  assert "mlp" not in params["layers"]["layer_0"]
  two = dataclasses.replace(cfg, num_layers=2)
  p = {k: v for k, v in params.items() if k != "layers"}
  p["layers"] = {k: params["layers"][k] for k in ("layer_0", "layer_1")}
  zero = lambda a: jnp.zeros_like(a)
  for i in (0, 1):
    p["layers"][f"layer_{i}"]["attention"]["o_proj"]["kernel"] = zero(
        p["layers"][f"layer_{i}"]["attention"]["o_proj"]["kernel"])
  p["layers"]["layer_0"]["moe"] = jax.tree.map(zero, p["layers"]["layer_0"]["moe"])
  p["layers"]["layer_0"]["router"] = monet.init_router(jax.random.key(5), 64, two.monet, std=0.5)
  p["layers"]["layer_1"]["moe"] = jax.tree.map(lambda a: a + 0.3, p["layers"]["layer_1"]["moe"])
  for i, s in ((0, 0.5), (1, 2.0)):
    p["layers"][f"layer_{i}"]["post_attention_norm"]["scale"] = jnp.full((64,), s)
  ids = jnp.array([[3, 9, 4, 1, 7]])
  got = jax.jit(llama.hidden_states, static_argnums=2)(p, ids, two)
  x = p["embed"]["embedding"][ids]
  n0 = L.rms_norm(p["layers"]["layer_0"]["post_attention_norm"], x, two.rms_norm_eps)
  n1 = L.rms_norm(p["layers"]["layer_1"]["post_attention_norm"], x, two.rms_norm_eps)
  g1, g2, _ = monet.route(p["layers"]["layer_0"]["router"], n0, two.monet)
  want = L.rms_norm(p["final_norm"], x + monet.experts(p["layers"]["layer_1"]["moe"], n1, g1, g2,
                                                       two.monet), two.rms_norm_eps)
  np.testing.assert_allclose(got, want, atol=1e-5)
  own = monet.route(p["layers"]["layer_0"]["router"], n1, two.monet)[0]
  assert not np.allclose(own, g1, atol=1e-3)               # the test can tell the two apart
  tap = jax.jit(lambda q: monet.router_inputs(
      lambda r: llama.hidden_states(r, ids, two), q, ("layers", "layer_0", "router")))
  np.testing.assert_allclose(tap(p), n0, atol=1e-6)


def test_knock_out_zeroes_the_two_pieces():
  for decompose in ("horizontal", "vertical"):
    p, cfg = _random_experts(decompose), _cfg(decompose)
    ko = monet.knock_out(p, 1, 2, cfg)
    g1, g2 = _random_gates(1, X.shape[:-1]), _random_gates(2, X.shape[:-1])

    def expert_without(q, dec, i, j, x):      # pieces first 1 and second 2 set to zero
      q = jax.tree.map(np.copy, q)
      m = M if dec == "horizontal" else M // 2
      first = {"horizontal": ["u"], "vertical": ["u1", "v11", "v12", "b1"]}[dec]
      second = {"horizontal": ["v", "b"], "vertical": ["u2", "v21", "v22", "b2"]}[dec]
      for names, piece in ((first, 1), (second, 2)):
        for name in names:
          leaf = q[name]
          if name.startswith("u"):
            leaf["kernel"][:, piece * m:(piece + 1) * m] = 0
            leaf["bias"][piece * m:(piece + 1) * m] = 0
          elif name.startswith("v"):
            leaf["kernel"][piece * m:(piece + 1) * m] = 0
          else:
            leaf[piece] = 0
      return _expert_np(q, dec, i, j, x)

    _close(monet.experts(ko, *_f32(X, g1, g2), cfg),
           _naive_np(p, decompose, X, g1, g2, expert=expert_without))
    assert np.abs(np.asarray(ko["b1" if decompose == "vertical" else "b"])).sum() > 0
  with pytest.raises(ValueError, match=r"second=4 is not a piece index in \[0, 4\)"):
    monet.knock_out(p, 0, 4, cfg)


def test_bad_configs_are_refused():
  with pytest.raises(ValueError, match="topk=9 must be <= experts=8"):
    monet.MonetConfig(experts=8, topk=9)
  with pytest.raises(ValueError, match="MonetConfig.topk must be a positive integer"):
    monet.MonetConfig(topk=0)
  with pytest.raises(ValueError, match="dim=3 must be even with decompose='vertical'"):
    monet.MonetConfig(dim=3)
  monet.MonetConfig(dim=3, decompose="horizontal")
  with pytest.raises(ValueError, match="MonetConfig.decompose='diagonal' is not valid"):
    monet.MonetConfig(decompose="diagonal")
  with pytest.raises(ValueError, match="MonetConfig.activation='tanh' is not valid"):
    monet.MonetConfig(activation="tanh")
  with pytest.raises(ValueError, match="norm_momentum must be in"):
    monet.MonetConfig(norm_momentum=0.0)
  with pytest.raises(ValueError, match="hidden_size=65 must be even"):
    llama.LlamaConfig(ffn="monet", hidden_size=65, num_heads=1, num_kv_heads=1, head_dim=32,
                      monet={"experts": 4, "topk": 2})
  with pytest.raises(ValueError, match="LlamaConfig.monet is set but ffn='swiglu'"):
    llama.LlamaConfig(monet={"experts": 4})
  with pytest.raises(ValueError, match="LlamaConfig.ffn='moe' is not valid"):
    llama.LlamaConfig(ffn="moe")
  with pytest.raises(TypeError, match="MonetConfig or a mapping"):
    llama.LlamaConfig(ffn="monet", monet=4)
  cfg = llama.LlamaConfig(ffn="monet", monet={"experts": 4, "topk": 2})
  with pytest.raises(ValueError, match="ffn='monet' has no Hugging Face Llama layout"):
    llama.hf_name_map(cfg)
  with pytest.raises(ValueError, match="needs the gates of an earlier layer"):
    monet.apply_layer({"moe": {}}, jnp.zeros((1, D)), None, _cfg("vertical"))


def test_a_few_train_steps_lower_the_causal_lm_loss():
  cfg = llama.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2,
                          num_heads=2, num_kv_heads=1, ffn="monet",
                          monet={"experts": 8, "heads": 2, "topk": 2, "dim": 4, "groups": 2})
  params = llama.init(jax.random.key(0), cfg)
  ids = jnp.tile(jnp.arange(16, dtype=jnp.int32) % 5, (4, 1))        # a repeating pattern
  batch = {"input_ids": ids, "loss_mask": jnp.ones(ids.shape), "segment_ids": jnp.ones_like(ids)}
  task, opt = tasks.get_task("causal_lm"), optax.adam(1e-2)

  def loss(p):
    return task.loss(llama.causal_lm_logits(p, cfg, batch, deterministic=False), batch)[0]

  @jax.jit
  def step(p, o):
    value, grads = jax.value_and_grad(loss)(p)
    updates, o = opt.update(grads, o)
    return optax.apply_updates(p, updates), o, value

  o, losses = opt.init(params), []
  for _ in range(20):
    params, o, value = step(params, o)
    losses.append(float(value))
  assert losses[-1] < 0.5 * losses[0], losses
