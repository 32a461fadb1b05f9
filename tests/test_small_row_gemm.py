"""The small-row GEMM kernel (`kernels/small_row_gemm.py`, interpreted here; compiled on a GPU) computes
x @ W in fp32 for both weight layouts, row counts that are and are not multiples of its 16-row tile,
and K split over programs or not, as its XLA reference does."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tidar_jax.kernels.pallas_common import MatrixTiling

from tidar_jax.kernels import small_row_gemm as srg

pytestmark = pytest.mark.usefixtures("fast_compile")


def _case(m: int, k: int, n: int, dtype=jnp.float32, seed: int = 0):
  x = jax.random.normal(jax.random.key(seed), (m, k), jnp.float32).astype(dtype)
  w = jax.random.normal(jax.random.key(seed + 1), (k, n), jnp.float32).astype(dtype)
  want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)  # [M, N]
  return x, w, want


@pytest.mark.parametrize("transposed", [True, False], ids=["W^T [N,K]", "W [K,N]"])
@pytest.mark.parametrize("m,tiling", [(16, None), (24, MatrixTiling(32, 16, 3)), (1, MatrixTiling(16, 32, 1)),
                                      (40, MatrixTiling(64, 16, 2))],
                         ids=["16-rows-default", "24-rows-splits3", "1-row-one-program-along-K", "40-rows-splits2"])
def test_gemm_equals_the_product(transposed, m, tiling):
  x, w, want = _case(m, 96, 64)
  y = srg.gemm(x, w.T if transposed else w, transposed=transposed, tiling=tiling)
  assert y.shape == (m, 64) and y.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  ref = srg.reference(x, w.T if transposed else w, transposed=transposed)
  np.testing.assert_allclose(np.asarray(ref), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_gemm_of_bf16_accumulates_in_fp32():
  """The decoder's operands are bf16; the kernel's sum over K is fp32, as XLA's reference is."""
  x, w, _ = _case(24, 128, 32, jnp.bfloat16, seed=3)
  y = srg.gemm(x, w, tiling=MatrixTiling(32, 32, 2))
  np.testing.assert_allclose(np.asarray(y), np.asarray(srg.reference(x, w)), rtol=2e-6, atol=1e-4)


def test_default_tiling_fills_the_gpu_and_tiles_the_matrix():
  # the 1.5B step's matrices (K, N): q/k/v fused, o, gate/up fused, down
  for k, n in [(1536, 2048), (1536, 1536), (1536, 17920), (8960, 1536)]:
    for m in (16, 24, 40, 72):
      t = srg.default_tiling(m, n, k)
      assert n % t.block_n == 0 and k % (t.block_k * t.splits) == 0
      steps = k // (t.block_k * t.splits)
      assert (n // t.block_n) * t.splits >= 264 or steps <= 4  # enough programs, or already short loops
  assert srg.default_tiling(16, 1536, 8960).splits > 1  # down: 24 output tiles alone would idle most SMs


def test_rows_pad_to_a_power_of_two_the_triton_lowering_takes():
  # a [48, 16] tile failed to lower on the H100: 40 rows must pad to 64, 72 to 128
  for m, padded in [(1, 16), (16, 16), (17, 32), (24, 32), (40, 64), (72, 128), (128, 128)]:
    assert srg.padded_rows(m) == padded


def test_bad_shapes_are_refused():
  x, w, _ = _case(8, 32, 16)
  with pytest.raises(ValueError, match="does not fit"):
    srg.gemm(x, w.T)  # W^T given as W
  with pytest.raises(ValueError, match="more than 128 rows"):
    srg.gemm(jnp.zeros((129, 32)), w)
  with pytest.raises(ValueError, match="does not tile"):
    srg.gemm(x, w, tiling=MatrixTiling(32, 16))
