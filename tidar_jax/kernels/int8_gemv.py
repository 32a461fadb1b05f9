"""One row against an int8 layer matrix in a Pallas (Triton) kernel: the batch-1 step's matmuls
with `model.decode_quant="int8"`.

XLA's row reduction streams an int8 matrix at about half its bf16 byte rate, so without this
kernel the int8 option halves the weights' memory but not the AR step's time. Here each program
streams small [block_n, block_k] tiles of the int8 weight, converts them in registers and
accumulates x * W in fp32 (no tensor cores: one row has nothing to reuse), reducing over K once at
the end; the per-output-channel scale is applied on the way out. bf16 weights stay XLA's: this
kernel over them is slower than XLA's row reduction.

Layouts, as the decoder stores them (`decode.weights.LayerWeights`): W^T [N, K] (q/k/v, o, down; the tile
is `block_n` rows of `block_k` contiguous bytes) or W [K, N] (gate/up; `block_k` rows of
`block_n` contiguous bytes). `splits` > 1 also divides K over the grid (for a matrix with few
output tiles, like down's 1536 rows of 8960); the splits' partial sums are added by XLA, in the
consumer's fusion. Runs compiled on a GPU (Triton) and interpreted elsewhere; `reference` is the
dequantised product it must equal.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from tidar_jax.kernels.pallas_common import MatrixTiling, split_k_matmul


def _splits(steps: int, max_steps: int) -> int:
  """Fewest programs along K that leave each at most `max_steps` inner steps."""
  return next(s for s in range(1, steps + 1) if steps % s == 0 and steps // s <= max_steps)


def default_tiling(n: int, k: int, transposed: bool) -> MatrixTiling:
  """Small tiles (1-4 KB of int8), several programs per SM, at most 6-10 inner steps each.

  Chosen by timing the whole 1.5B AR step (a one-matrix microbenchmark ranks tilings differently):
  q/k/v and o (K = 1536) 4 x 512 in one program along K; down (K = 8960, whose largest
  power-of-two divisor is 256) 8 x 128 over 7 programs; gate/up ([K, N]) 32 x 128 over 8. Larger
  tiles or long single-program K loops are slower."""
  # gcd(n, a power of two): the largest power of two up to it that divides n (Triton's sizes)
  if transposed:  # rows of W^T: block_k contiguous bytes per row
    block_k = 512 if k % 512 == 0 else math.gcd(k, 128)
    block_n = math.gcd(n, 4 if block_k == 512 else 8)
    return MatrixTiling(block_n, block_k, _splits(k // block_k, 10))
  block_n = math.gcd(n, 128)  # rows of W: block_n contiguous bytes per row
  block_k = math.gcd(k, 32)
  return MatrixTiling(block_n, block_k, _splits(k // block_k, 6))


def _kernel(x_ref, w_ref, s_ref, o_ref, *, transposed: bool, block_n: int, block_k: int, steps: int):
  # x [K]; w [N, K] (transposed) or [K, N] int8; s [N] fp32; o [splits, N] fp32
  outs = pl.ds(pl.multiple_of(pl.program_id(0) * block_n, block_n), block_n)
  first = pl.program_id(1) * steps * block_k

  def step(i, acc):  # acc [block_n, block_k] or [block_k, block_n] fp32
    ins = pl.ds(pl.multiple_of(first + i * block_k, block_k), block_k)
    x = x_ref[ins].astype(jnp.float32)
    if transposed:
      return acc + w_ref[outs, ins].astype(jnp.float32) * x[None, :]
    return acc + w_ref[ins, outs].astype(jnp.float32) * x[:, None]

  shape = (block_n, block_k) if transposed else (block_k, block_n)
  acc = jax.lax.fori_loop(0, steps, step, jnp.zeros(shape, jnp.float32))
  y = jnp.sum(acc, axis=1 if transposed else 0)  # [block_n]
  o_ref[pl.program_id(1), outs] = y * s_ref[outs]


def gemv(x: jax.Array, q: jax.Array, scale: jax.Array, *, transposed: bool, tiling: MatrixTiling | None = None,
         interpret: bool | None = None) -> jax.Array:
  """x [K] (any float dtype) against the int8 matrix q (W^T [N, K] when `transposed`, else W [K, N])
  with one fp32 scale per output channel: (x @ (q * scale)) -> [N] fp32, accumulated in fp32."""
  n, k = q.shape if transposed else q.shape[::-1]
  if x.shape != (k,) or scale.shape != (n,):
    raise ValueError(f"gemv: x {x.shape} and scale {scale.shape} do not fit a {'transposed ' * transposed}"
                     f"matrix {q.shape} (want x ({k},), scale ({n},))")
  kernel = functools.partial(_kernel, transposed=transposed)
  return split_k_matmul(kernel, (x, q, scale.astype(jnp.float32)), tiling=tiling or default_tiling(n, k, transposed),
                        n=n, k=k, rows=(), name="int8_gemv", interpret=interpret)


def reference(x: jax.Array, q: jax.Array, scale: jax.Array, *, transposed: bool) -> jax.Array:
  """`gemv` in XLA: x [K] against the dequantised matrix, fp32 -> [N]."""
  w = q.astype(jnp.float32) * (scale[:, None] if transposed else scale[None, :])
  return jnp.dot(w, x.astype(jnp.float32)) if transposed else jnp.dot(x.astype(jnp.float32), w)
