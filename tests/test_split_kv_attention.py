"""The split-KV step attention (Pallas, interpreted on CPU) equals its reference, the dense masked
attention over the cache, for the AR and TiDAR steps, GQA and MHA, ragged lengths, several row tiles
and key splits (including splits with nothing live), and stale garbage past each row's step tokens;
the reference and its slot mask are checked against numpy loops."""

import jax.numpy as jnp
import numpy as np
import pytest

from tidar_jax import masks
from tidar_jax.kernels import split_kv_attention as skv

pytestmark = pytest.mark.usefixtures("fast_compile")  # compile-bound: small programs, interpreted kernels


def numpy_visible(lengths: np.ndarray, dense_step: np.ndarray, max_len: int) -> np.ndarray:
  """[batch, T, max_len] by definition: the committed slots, and slot length + u where step token u is seen."""
  B, T = len(lengths), dense_step.shape[0]
  out = np.zeros((B, T, max_len), bool)
  for b, n in enumerate(lengths):
    out[b, :, :n] = True
    out[b, :, n:n + T] = dense_step
  return out


@pytest.mark.parametrize("step", [masks.causal_step(1), masks.causal_step(5), masks.decode_step_intervals(4)],
                         ids=["ar", "causal5", "tidar4"])
def test_visible_slots_is_the_committed_cache_plus_the_step_mask(step):
  lengths = np.array([0, 7, 40 - step.tokens])
  got = skv.visible_slots(jnp.asarray(lengths), step, 40)
  np.testing.assert_array_equal(got, numpy_visible(lengths, step.dense(), 40))


def test_reference_is_the_softmax_over_visible_slots():
  rng = np.random.default_rng(0)
  B, T, H, Hkv, S, D = 2, 3, 4, 2, 10, 8
  q, k, v = rng.normal(size=(B, T, H, D)), rng.normal(size=(B, S, Hkv, D)), rng.normal(size=(B, S, Hkv, D))
  mask = numpy_visible(np.array([2, 5]), masks.causal_step(T).dense(), S)
  got = skv.reference(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), jnp.asarray(mask))
  want = np.zeros((B, T, H, D))
  for b in range(B):
    for t in range(T):
      for h in range(H):
        seen = np.flatnonzero(mask[b, t])
        s = k[b, seen, h // (H // Hkv)] @ q[b, t, h] / np.sqrt(D)
        p = np.exp(s - s.max())
        want[b, t, h] = (p / p.sum()) @ v[b, seen, h // (H // Hkv)]
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_key_blocks_and_bad_shapes():
  assert skv.key_block(2304) == 64 and skv.key_block(48) == 16 and skv.key_block(50) is None
  with pytest.raises(ValueError, match="max_len % 16"):
    q = jnp.zeros((1, 1, 2, 8))
    skv.step_attention(q, jnp.zeros((1, 50, 2, 8)), jnp.zeros((1, 50, 2, 8)), jnp.ones(1, jnp.int32),
                       masks.causal_step(1))


@pytest.mark.parametrize("k,heads,kv_heads,row_tile,splits", [
    (0, 2, 2, 0, 5),  # AR, MHA, more splits than live key blocks for the short row
    (3, 4, 2, 16, 3),  # TiDAR k=3: T=12, 24 rows per KV head -> 2 row tiles
    (4, 6, 2, 0, 2),  # TiDAR k=4: T=20, group 3 -> 60 rows, one 64-row tile with padding
])
def test_split_kv_equals_dense_masked_attention(k, heads, kv_heads, row_tile, splits):
  step = masks.causal_step(1) if k == 0 else masks.decode_step_intervals(k)
  T, B, S, D = step.tokens, 3, 96, 16
  rng = np.random.default_rng(k + heads)
  q = jnp.asarray(rng.normal(size=(B, T, heads, D)), jnp.float32)
  k_buf = rng.normal(size=(B, S, kv_heads, D)) * 2
  v_buf = rng.normal(size=(B, S, kv_heads, D))
  # One slot; a row whose last step token is the first slot of a new 32-slot key block; a full cache.
  lengths = np.array([1, 33 - T, S - T])
  for b, n in enumerate(lengths):  # loud garbage past the step tokens: must never be read
    k_buf[b, n + T:], v_buf[b, n + T:] = 50.0, 1e3
  k_buf, v_buf = jnp.asarray(k_buf, jnp.float32), jnp.asarray(v_buf, jnp.float32)
  lengths = jnp.asarray(lengths, jnp.int32)
  want = skv.reference(q, k_buf, v_buf, skv.visible_slots(lengths, step, S))
  got = skv.step_attention(q, k_buf, v_buf, lengths, step, row_tile=row_tile, splits=splits,
                           interpret=True)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
