"""The split-KV step attention (Pallas, interpreted on CPU) equals the dense masked attention over
the cache, for the AR and TiDAR step masks, GQA and MHA, ragged lengths, several row tiles and key
splits (including splits with nothing live), and stale garbage past each row's step tokens."""

import jax.numpy as jnp
import numpy as np
import pytest

from tidar_jax import masks
from tidar_jax.decode import split_kv_attention as skv
from tidar_jax.decode.cache import KVCache
from tidar_jax.decode.engine import _attend, step_attention_mask

pytestmark = pytest.mark.usefixtures("fast_compile")  # compile-bound: small programs, interpreted kernels


def test_interval_form_rebuilds_the_step_masks_and_refuses_others():
  for mask in (np.ones((1, 1), bool), masks.causal_mask(5), masks.decode_step_mask(4)):
    iv = skv.interval_form(mask)
    u = np.arange(mask.shape[0])[None, :]
    rebuilt = (u < iv.prefix[:, None]) | ((u >= iv.lo[:, None]) & (u < iv.hi[:, None]))
    np.testing.assert_array_equal(rebuilt, mask)
  two_runs = np.array([[1, 0, 1, 0, 1]] * 5, bool)  # a prefix plus two more runs: no interval form
  assert skv.interval_form(two_runs) is None
  assert skv.key_block(2304) == 64 and skv.key_block(48) == 16 and skv.key_block(50) is None
  with pytest.raises(ValueError, match="max_len % 16"):
    q = jnp.zeros((1, 1, 2, 8))
    skv.step_attention(q, jnp.zeros((1, 50, 2, 8)), jnp.zeros((1, 50, 2, 8)), jnp.ones(1, jnp.int32),
                       np.ones((1, 1), bool))


@pytest.mark.parametrize("k,heads,kv_heads,row_tile,splits", [
    (0, 2, 2, 0, 5),  # AR, MHA, more splits than live key blocks for the short row
    (3, 4, 2, 16, 3),  # TiDAR k=3: T=12, 24 rows per KV head -> 2 row tiles
    (4, 6, 2, 0, 2),  # TiDAR k=4: T=20, group 3 -> 60 rows, one 64-row tile with padding
])
def test_split_kv_equals_dense_masked_attention(k, heads, kv_heads, row_tile, splits):
  step_mask = np.ones((1, 1), bool) if k == 0 else masks.decode_step_mask(k)
  T, B, S, D = step_mask.shape[0], 3, 96, 16
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
  want = _attend(q, k_buf, v_buf, lengths, step_mask,
                 step_attention_mask(KVCache((k_buf,), (v_buf,), lengths), step_mask), "dense")
  got = skv.step_attention(q, k_buf, v_buf, lengths, step_mask, row_tile=row_tile, splits=splits,
                           interpret=True)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
