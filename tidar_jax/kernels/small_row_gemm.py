"""A few rows against a bf16 layer matrix in a Pallas (Triton) kernel: the matmuls of a pruned TiDAR
step (16-72 tokens per row at batch 1) that should cost about what the one-row AR step's do.

The step's time is the weights' stream: 16 rows reuse each weight tile 16 times, far below the
tensor cores' need, so a GEMM this short is bound by the bytes of W, like a GEMV. XLA's GEMMs at
these M stream the weights well below the copy rate (a 72-row step's matmuls took 1.48 ms where the
one-row products of the same weights took 0.95 ms on an H200). Here every program holds all M rows
(padded to a power of two of at least 16: the tensor-core dot's least, and Triton's lowering takes
only power-of-two shapes) and streams [block_k, block_n] tiles of W
once, accumulating in fp32; `splits` > 1 also divides K over the grid, for matrices with few output
tiles (down: N = 1536), and XLA adds the splits' partial sums in the consumer's fusion.

Layouts, as the decoder stores them: W [K, N] or W^T [N, K] (`transposed`). Compiled on a GPU,
interpreted elsewhere; `reference` is XLA's product it must equal. The decoder's `engine.matmul`
takes it where `dispatch.small_row_gemm` says so; `benchmarks/step_matmuls` times it against XLA at
the pruned steps' row counts.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from tidar_jax.kernels.pallas_common import MatrixTiling, split_k_matmul

ROW_TILE = 16  # Triton's dot needs at least 16 rows
MAX_ROWS = 128  # past this XLA's GEMMs reuse each weight tile enough to run near their peak


def padded_rows(m: int) -> int:
  """The rows a program holds for M rows: the next power of two, at least ROW_TILE (Pallas' Triton
  lowering refuses a [48, 16] tile, so 40 rows pad to 64, not 48)."""
  return max(ROW_TILE, 1 << max(m - 1, 0).bit_length())


def default_tiling(m: int, n: int, k: int, *, programs: int = 264) -> MatrixTiling:
  """Tiles of 64 output channels by 64-128 input channels, and enough splits along K that the grid
  has at least `programs` programs (two per SM of an H100/H200) while each keeps 4+ inner steps."""
  block_n = math.gcd(n, 64)
  block_k = math.gcd(k, 128 if m <= 32 else 64)  # the [m, block_k] x tile and the W tile share registers
  steps = k // block_k
  splits = next((s for s in range(1, steps + 1)
                 if steps % s == 0 and ((n // block_n) * s >= programs or steps // s <= 4)), steps)
  return MatrixTiling(block_n, block_k, splits, num_stages=3)


def _kernel(x_ref, w_ref, o_ref, *, transposed: bool, block_n: int, block_k: int, steps: int):
  # x [M, K] (M a power of two >= 16); w [K, N] or [N, K] (transposed); o [splits, M, N] fp32
  outs = pl.ds(pl.multiple_of(pl.program_id(0) * block_n, block_n), block_n)
  first = pl.program_id(1) * steps * block_k

  def step(i, acc):  # acc [M, block_n] fp32
    ins = pl.ds(pl.multiple_of(first + i * block_k, block_k), block_k)
    x = x_ref[:, ins]  # [M, block_k]
    if transposed:  # w tile [block_n, block_k], contracted over its second axis as the split-KV scores are
      w = w_ref[outs, ins]
      return acc + jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return acc + jnp.dot(x, w_ref[ins, outs], preferred_element_type=jnp.float32)

  rows = x_ref.shape[0]
  o_ref[pl.program_id(1), :, outs] = jax.lax.fori_loop(0, steps, step, jnp.zeros((rows, block_n), jnp.float32))


def gemm(x: jax.Array, w: jax.Array, *, transposed: bool = False, tiling: MatrixTiling | None = None,
         interpret: bool | None = None) -> jax.Array:
  """x [M, K] @ W -> [M, N] fp32 (fp32 accumulation), for M <= MAX_ROWS; w is W [K, N], or W^T
  [N, K] when `transposed`; x and w share a dtype (bf16 in the decoder)."""
  m, k = x.shape
  n = w.shape[0] if transposed else w.shape[1]
  if w.shape != ((n, k) if transposed else (k, n)) or m > MAX_ROWS:
    raise ValueError(f"small_row_gemm: x {x.shape} does not fit a {'transposed ' * transposed}matrix {w.shape}, "
                     f"or has more than {MAX_ROWS} rows")
  padded = padded_rows(m)
  xp = jnp.pad(x, ((0, padded - m), (0, 0)))  # [padded, K]
  kernel = functools.partial(_kernel, transposed=transposed)
  return split_k_matmul(kernel, (xp, w), tiling=tiling or default_tiling(m, n, k), n=n, k=k, rows=(padded,),
                        name="small_row_gemm", interpret=interpret)[:m]


def reference(x: jax.Array, w: jax.Array, *, transposed: bool = False) -> jax.Array:
  """`gemm` in XLA: x [M, K] @ W (or W^T's transpose), fp32 accumulation -> [M, N] fp32."""
  spec = "mk,nk->mn" if transposed else "mk,kn->mn"
  return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)
