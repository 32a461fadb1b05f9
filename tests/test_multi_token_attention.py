"""The many-token (TiDAR) step's fused attention block (Pallas, interpreted on CPU) computes what its
reference, the unfused step, computes -- bias, qk-norm, RoPE at each step token's own position, the cache
writes at slots lengths[b] + u, attention over the committed slots plus the step tokens under the
TiDAR step mask -- for ragged lengths (0, a block boundary, mid-block, the cache's end), step
tokens spanning two key blocks, several splits (some with nothing committed), fp32 and bf16, and
never reads the stale slots past a row's length."""

import jax.numpy as jnp
import numpy as np
import pytest

from tidar_jax.kernels import multi_token_attention as mta
from tidar_jax.kernels import support
from tidar_jax.kernels.qkv_epilogue import Projection
from tidar_jax.masks import decode_step_intervals
from tidar_jax.model import default_inv_freq, rope_cos_sin

pytestmark = pytest.mark.usefixtures("fast_compile")  # compile-bound: small programs, interpreted kernels

H, HKV, D, S, EPS, THETA = 6, 2, 16, 64, 1e-6, 1e4
INV_FREQ = default_inv_freq(D, THETA)


@pytest.mark.parametrize("dtype,block,qk_norm,splits,block_k,row_tile", [
    # k=4: 20 step tokens, two 16-key chunks; 3 splits over <= 3 committed blocks (short rows leave
    # splits empty); row tiles of 16 rows (8 tiles for 120 rows)
    (jnp.float32, 4, False, 3, 16, 16),
    (jnp.bfloat16, 2, True, 2, 32, 0),  # k=2: 6 tokens in one chunk, qk-norm, default row tile
])
def test_multi_token_attention_equals_the_unfused_step(dtype, block, qk_norm, splits, block_k, row_tile):
  rng = np.random.default_rng(block)
  step = decode_step_intervals(block)
  T = step.tokens
  lengths = jnp.asarray([0, 16, 37, S - T], jnp.int32)  # empty, a block boundary, mid-block, the cache's end
  B = lengths.shape[0]
  # positions need not equal slots: TiDAR's draft blocks repeat positions
  positions = lengths[:, None] + jnp.asarray(rng.integers(0, T, (B, T)), jnp.int32)

  def draw(*shape, scale=1.0):
    return jnp.asarray(scale * rng.standard_normal(shape), dtype)

  gains = (draw(D, scale=0.2) + 1, draw(D, scale=0.2) + 1) if qk_norm else (None, None)
  proj = Projection(None, draw((H + 2 * HKV) * D, scale=0.5), *gains)
  qkv = draw(B, T, (H + 2 * HKV) * D, scale=2.0)
  k_buf, v_buf = (np.array(draw(B, S, HKV, D), np.float32) for _ in range(2))
  for b, n in enumerate(np.asarray(lengths)):  # loud stale slots past the length: never read
    k_buf[b, n:], v_buf[b, n:] = 50.0, 1e3
  k_buf, v_buf = jnp.asarray(k_buf, dtype), jnp.asarray(v_buf, dtype)

  cos, sin = rope_cos_sin(positions, INV_FREQ)
  want, want_k, want_v = mta.reference(qkv, proj, dtype, cos, sin, k_buf, v_buf, lengths, step, heads=H, eps=EPS)
  got, got_k, got_v = mta.attend(qkv, proj, dtype, cos, sin, k_buf, v_buf, lengths, step, heads=H, eps=EPS,
                                 splits=splits, block_k=block_k, row_tile=row_tile, interpret=True)
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  slot = np.arange(S)[None, :]
  written = (slot >= np.asarray(lengths)[:, None]) & (slot < np.asarray(lengths)[:, None] + T)  # [B, S]
  for got_buf, want_buf in ((got_k, want_k), (got_v, want_v)):
    got_buf, want_buf = np.asarray(got_buf, np.float32), np.asarray(want_buf, np.float32)
    np.testing.assert_array_equal(got_buf[~written], want_buf[~written])  # every other slot untouched
    np.testing.assert_allclose(got_buf[written], want_buf[written], atol=tol, rtol=tol)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)


def test_multi_token_attention_refuses_bad_inputs():
  step = decode_step_intervals(2)
  args = (jnp.float32, jnp.zeros((1, 6, 6)), jnp.zeros((1, 6, 6)))
  with pytest.raises(ValueError, match="power-of-two head_dim"):
    mta.attend(jnp.zeros((1, 6, (H + 2 * HKV) * 12)), Projection(None, None, None, None), *args,
               jnp.zeros((1, 48, HKV, 12)), jnp.zeros((1, 48, HKV, 12)), jnp.zeros(1, jnp.int32), step,
               heads=H, eps=EPS)
  with pytest.raises(ValueError, match="Projection.x=None"):
    mta.attend(jnp.zeros((1, 6, (H + 2 * HKV) * D)), Projection(jnp.zeros((1, 8)), None, None, None), *args,
               jnp.zeros((1, S, HKV, D)), jnp.zeros((1, S, HKV, D)), jnp.zeros(1, jnp.int32), step, heads=H, eps=EPS)
  with pytest.raises(ValueError, match="row_tile=8 must be a multiple of 16"):
    mta.attend(jnp.zeros((1, 6, (H + 2 * HKV) * D)), Projection(None, None, None, None), *args,
               jnp.zeros((1, S, HKV, D)), jnp.zeros((1, S, HKV, D)), jnp.zeros(1, jnp.int32), step, heads=H, eps=EPS,
               row_tile=8)
  assert not support.multi_token(12, 2048) and not support.multi_token(D, 50)
  assert support.multi_token(128, 2048)
