"""The one-token step's fused attention block (Pallas, interpreted on CPU) computes what its reference,
the unfused step, computes -- norm scale, bias, qk-norm, RoPE, cache write at slot lengths[b], attention
over the committed slots plus the new token -- for ragged lengths (0, a block boundary, the last
slot), several key splits and blocks (including splits with nothing live), in fp32 and bf16, and
never reads the stale slots past a row's length."""

import jax.numpy as jnp
import numpy as np
import pytest

from tidar_jax.kernels import one_token_attention as ota
from tidar_jax.kernels.qkv_epilogue import Projection
from tidar_jax.model import default_inv_freq, rope_cos_sin

pytestmark = pytest.mark.usefixtures("fast_compile")  # compile-bound: small programs, interpreted kernels

H, HKV, D, DM, S, EPS, THETA = 6, 2, 16, 48, 64, 1e-6, 1e4
INV_FREQ = default_inv_freq(D, THETA)


@pytest.mark.parametrize("dtype,fold,qk_norm,splits,block_k", [
    (jnp.float32, True, False, 2, 16),  # 2 splits of two 16-key blocks each; the short rows leave one empty
    (jnp.bfloat16, False, True, 1, 32),  # one split of two 32-key blocks, qk-norm, q/k/v already normed
    (jnp.float32, True, False, 3, 16),  # 3 splits (padded to 4 in the merge): split 0 takes blocks 0 and 3
])
def test_one_token_attention_equals_the_unfused_step(dtype, fold, qk_norm, splits, block_k):
  rng = np.random.default_rng(splits)
  lengths = jnp.asarray([0, 16, 37, S - 1], jnp.int32)  # empty, a block boundary, mid-block, the last slot
  B = lengths.shape[0]
  positions = lengths + jnp.asarray([0, 3, 0, 5])  # positions need not equal slots

  def draw(*shape, scale=1.0):
    return jnp.asarray(scale * rng.standard_normal(shape), dtype)

  gains = (draw(D, scale=0.2) + 1, draw(D, scale=0.2) + 1) if qk_norm else (None, None)
  proj = Projection(draw(B, DM, scale=3.0) if fold else None, draw((H + 2 * HKV) * D, scale=0.5), *gains)
  qkv = draw(B, (H + 2 * HKV) * D, scale=2.0)
  k_buf, v_buf = (np.array(draw(B, S, HKV, D), np.float32) for _ in range(2))
  for b, n in enumerate(np.asarray(lengths)):  # loud stale slots past the length: never read
    k_buf[b, n + 1:], v_buf[b, n + 1:] = 50.0, 1e3
  k_buf, v_buf = jnp.asarray(k_buf, dtype), jnp.asarray(v_buf, dtype)

  cos, sin = rope_cos_sin(positions, INV_FREQ)
  want, want_k, want_v = ota.reference(qkv, proj, dtype, cos, sin, k_buf, v_buf, lengths, heads=H, eps=EPS)
  got, got_k, got_v = ota.attend(qkv, proj, dtype, cos, sin, k_buf, v_buf, lengths, heads=H, eps=EPS,
                                 splits=splits, block_k=block_k, interpret=True)
  # The cache: the new key/value at slot lengths[b] as the unfused step computes them (to rounding:
  # 1 / rms sums in another order), every other slot untouched.
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  written = np.arange(S)[None, :] == np.asarray(lengths)[:, None]  # [B, S]
  for got_buf, want_buf in ((got_k, want_k), (got_v, want_v)):
    got_buf, want_buf = np.asarray(got_buf, np.float32), np.asarray(want_buf, np.float32)
    np.testing.assert_array_equal(got_buf[~written], want_buf[~written])
    np.testing.assert_allclose(got_buf[written], want_buf[written], atol=tol, rtol=tol)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)

def test_one_token_attention_refuses_bad_shapes():
  zeros = jnp.zeros((1, 48, HKV, 12))
  with pytest.raises(ValueError, match="power-of-two head_dim"):
    ota.attend(jnp.zeros((1, (H + 2 * HKV) * 12)), Projection(None, None, None, None), jnp.float32,
               jnp.zeros((1, 6)), jnp.zeros((1, 6)), zeros, zeros, jnp.zeros(1, jnp.int32), heads=H, eps=EPS)
  with pytest.raises(ValueError, match="at most 16 query heads per KV head"):
    ota.attend(jnp.zeros((1, 20 * D)), Projection(None, None, None, None), jnp.float32, jnp.zeros((1, D // 2)),
               jnp.zeros((1, D // 2)), jnp.zeros((1, 48, 1, D)), jnp.zeros((1, 48, 1, D)), jnp.zeros(1, jnp.int32),
               heads=18, eps=EPS)
  with pytest.raises(ValueError, match="between 1 and max_len / block_k = 4"):
    ota.attend(jnp.zeros((1, (H + 2 * HKV) * D)), Projection(None, None, None, None), jnp.float32,
               jnp.zeros((1, D // 2)), jnp.zeros((1, D // 2)), jnp.zeros((1, S, HKV, D)), jnp.zeros((1, S, HKV, D)),
               jnp.zeros(1, jnp.int32), heads=H, eps=EPS, splits=8, block_k=16)
  assert ota.default_splits(1, 2, 2048, 64) == 32 and ota.default_splits(8, 2, 2048, 64) == 8
  assert ota.default_splits(1, 2, 128, 64) == 2
