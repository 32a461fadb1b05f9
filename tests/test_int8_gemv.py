"""The one-row int8 GEMV kernel (`kernels/int8_gemv.py`, interpreted here; compiled on a GPU)
computes x @ (q * scale) in fp32 for both weight layouts, with K split over programs or not, as its
XLA reference does."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tidar_jax.kernels.pallas_common import MatrixTiling

from tidar_jax.decode.weights import quantize_int8
from tidar_jax.kernels import int8_gemv as gemv

pytestmark = pytest.mark.usefixtures("fast_compile")


def _case(k: int, n: int, x_dtype=jnp.float32, seed: int = 0):
  w = jax.random.normal(jax.random.key(seed), (k, n), jnp.float32)
  q = quantize_int8(w)  # [K, N] int8, scale [N]
  x = jax.random.normal(jax.random.key(seed + 1), (k,), jnp.float32).astype(x_dtype)
  want = np.asarray(x, np.float64) @ (np.asarray(q.q, np.float64) * np.asarray(q.scale, np.float64))
  return x, q, want


@pytest.mark.parametrize("transposed", [True, False], ids=["W^T [N,K]", "W [K,N]"])
@pytest.mark.parametrize("tiling", [None, MatrixTiling(8, 16, 3), MatrixTiling(32, 32, 1), MatrixTiling(16, 8, 6)],
                         ids=["default", "splits3", "one-program-along-K", "splits6"])
def test_gemv_equals_the_dequantised_product(transposed, tiling):
  x, q, want = _case(96, 64)
  w = q.q.T if transposed else q.q
  y = gemv.gemv(x, w, q.scale, transposed=transposed, tiling=tiling)
  assert y.shape == (64,) and y.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  ref = gemv.reference(x, w, q.scale, transposed=transposed)
  np.testing.assert_allclose(np.asarray(ref), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_gemv_reads_a_bf16_row():
  """The engine's gate/up row is bf16 (q/k/v, o and down get the folded norm's fp32 row)."""
  x, q, want = _case(64, 32, jnp.bfloat16, seed=4)
  y = gemv.gemv(x, q.q, q.scale, transposed=False, tiling=MatrixTiling(16, 16, 2))
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("n,k,transposed", [
    (2048, 1536, True), (1536, 1536, True), (17920, 1536, False), (1536, 8960, True),  # 1.5B
    (6144, 4096, True), (4096, 4096, True), (24576, 4096, False), (4096, 12288, True),  # 8B
    (17, 100, False), (96, 66, True), (1, 1, True)])  # odd shapes: tiny tiles, still valid
def test_default_tiling_tiles_the_matrix(n, k, transposed):
  t = gemv.default_tiling(n, k, transposed)
  assert n % t.block_n == 0 and k % (t.block_k * t.splits) == 0
  for size in (t.block_n, t.block_k):
    assert size & (size - 1) == 0  # Triton's tensors have power-of-two sizes
  steps = k // (t.block_k * t.splits)
  assert steps <= 10 or t.block_k == 1  # short K loops: long ones measured up to 1.6x slower


def test_bad_shapes_and_tilings_are_named():
  x, q, _ = _case(64, 32)
  with pytest.raises(ValueError, match=r"x \(63,\).*want x \(64,\)"):
    gemv.gemv(x[:63], q.q, q.scale, transposed=False)
  with pytest.raises(ValueError, match="scale"):
    gemv.gemv(x, q.q, q.scale[:4], transposed=False)
  with pytest.raises(ValueError, match="does not tile N=32, K=64"):
    gemv.gemv(x, q.q, q.scale, transposed=False, tiling=MatrixTiling(32, 16, 3))
