"""Adapters compose with jax.sharding (data-parallel jit) and pmap, on 8 fake CPU devices.

Runs in a subprocess because the device count must be set before JAX starts.
"""
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import lowrank_jax as lj
    from lowrank_jax import testing
    assert jax.device_count() == 8, jax.devices()
    params = testing.tiny_params()
    k = jax.random.split(jax.random.key(0), 3)
    batch = {"ids": jax.random.randint(k[0], (16, 5), 0, 13),
             "images": jax.random.normal(k[1], (16, 6, 6, 3)),
             "y": jax.random.normal(k[2], (16, 10))}
    ad = lj.lora(2, 2.0, ["dense_0/kernel", "dense_1/kernel"])
    base, state = ad.init(jax.random.key(1), params)
    state = testing.perturb(state, jax.random.key(2))
    loss = lambda t, b: testing.tiny_loss(ad.apply(base, lj.AdapterState(t, {})), b)
    ref_l, ref_g = jax.jit(jax.value_and_grad(loss))(state.trainable, batch)

    # jit + NamedSharding: batch split over a 'data' axis, adapter replicated.
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
    rep = jax.device_put(state.trainable, NamedSharding(mesh, P()))
    l, g = jax.jit(jax.value_and_grad(loss))(rep, sharded)
    np.testing.assert_allclose(l, ref_l, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g, ref_g)

    # pmap: per-device gradients averaged with pmean equal the full-batch gradient.
    def pstep(t, b):
      l, g = jax.value_and_grad(loss)(t, b)
      return jax.lax.pmean(l, "d"), jax.lax.pmean(g, "d")
    split = jax.tree.map(lambda x: x.reshape((8, 2) + x.shape[1:]), batch)
    reps = jax.tree.map(lambda x: jnp.stack([x] * 8), state.trainable)
    pl, pg = jax.pmap(pstep, axis_name="d")(reps, split)
    np.testing.assert_allclose(pl[0], ref_l, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b, rtol=1e-4, atol=1e-6), pg, ref_g)
    print("SHARDING_OK")
""")


def test_jit_sharding_and_pmap_on_8_cpu_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=root, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "SHARDING_OK" in out.stdout
