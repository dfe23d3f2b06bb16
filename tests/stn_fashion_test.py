"""The per-example training-time transforms of experiments.stn_fashion, against numpy."""
import jax
import jax.numpy as jnp
import numpy as np

from experiments import stn_fashion

B = 6


def _images(seed=0):
  return jax.random.normal(jax.random.key(seed), (B, 28, 28, 1)) + 5.0   # never 0 by chance


def test_zero_strengths_are_the_identity():
  x = _images()
  out = stn_fashion.augment(x, jnp.zeros(B), jnp.zeros(B), jax.random.key(1))
  np.testing.assert_array_equal(out, x)
  np.testing.assert_array_equal(stn_fashion._dropout(x, jnp.zeros(B), jax.random.key(2)), x)


def test_shift_is_a_translation_within_its_limit_per_example():
  x = np.asarray(_images())
  shift = jnp.array([0.0, 1.0, 2.0, 3.0, 4.0, 2.4])
  out = np.asarray(stn_fashion.augment(jnp.asarray(x), shift, jnp.zeros(B), jax.random.key(3)))
  padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
  for b in range(B):
    limit = int(np.round(shift[b]))
    matches = [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)
               if np.array_equal(out[b], padded[b, 4 + dy:32 + dy, 4 + dx:32 + dx])]
    assert matches, b
    dy, dx = matches[0]
    assert max(abs(dy), abs(dx)) <= limit, (b, dy, dx, limit)


def test_cutout_zeroes_one_square_of_at_most_its_side():
  x = _images()
  side = jnp.array([0.0, 2.0, 5.0, 6.0, 10.0, 14.0])
  out = np.asarray(stn_fashion.augment(x, jnp.zeros(B), side, jax.random.key(4)))[..., 0]
  for b in range(B):
    rows, cols = np.nonzero(out[b] == 0)
    if side[b] == 0:
      assert rows.size == 0
      continue
    r0, r1, c0, c1 = rows.min(), rows.max(), cols.min(), cols.max()
    assert rows.size == (r1 - r0 + 1) * (c1 - c0 + 1)        # a full rectangle ...
    assert r1 - r0 + 1 <= side[b] and c1 - c0 + 1 <= side[b]  # ... within the square's side
    inner = (r0 > 0 and r1 < 27) and (c0 > 0 and c1 < 27)
    if inner:                                                 # not clipped by the border
      assert r1 - r0 + 1 == c1 - c0 + 1 == side[b], (b, r0, r1, c0, c1)


def test_dropout_rate_per_example():
  x = jnp.ones((4, 20_000))
  rate = jnp.array([0.0, 0.2, 0.5, 0.8])
  out = np.asarray(stn_fashion._dropout(x, rate, jax.random.key(5)))
  for b, r in enumerate(np.asarray(rate)):
    kept = out[b] != 0
    np.testing.assert_allclose(out[b][kept], 1.0 / (1.0 - r), rtol=1e-6)
    assert abs((1 - kept.mean()) - r) < 0.02, (r, 1 - kept.mean())
