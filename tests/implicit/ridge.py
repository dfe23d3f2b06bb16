"""Ridge-regression data shared by the implicit-differentiation tests."""
import jax.numpy as jnp
import numpy as np


def ridge_data(seed=0, n=40, nv=30, d=6):
  """(x, y, x_val, y_val) float64 with a linear target plus noise."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d))
  y = x @ rng.normal(size=d) + 0.5 * rng.normal(size=n)
  xv = rng.normal(size=(nv, d))
  yv = xv @ rng.normal(size=d) + 0.5 * rng.normal(size=nv)
  return tuple(jnp.asarray(a, jnp.float64) for a in (x, y, xv, yv))
