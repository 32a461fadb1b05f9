"""What the GPU (Triton) Pallas kernels of the decode step share: compiler parameters, the
compiled-or-interpreted choice, key blocks, the online softmax of a key loop, the merge of
key-split partials, and the tiled split-K grid of the matmul kernels."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from tidar_jax.masks import MASKED  # finite: a row with nothing visible in a split gives l = 0, not NaN


def interpret_mode(interpret: bool | None) -> bool:
  """A kernel's `interpret` argument: None is compiled (Triton) on a GPU and interpreted elsewhere,
  where the tests compare each kernel with its reference."""
  return jax.default_backend() != "gpu" if interpret is None else interpret


def triton_params(num_warps: int, num_stages: int, interpret: bool):
  """A Pallas call's Triton compiler params; None when it is interpreted (off the GPU)."""
  if interpret:
    return None
  from jax.experimental.pallas import triton as plgpu
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def key_block(max_len: int) -> int | None:
  """Largest key block (power of two in 16..64) that tiles `max_len` slots, or None (64 timed
  fastest at the 1.5B shape)."""
  for block in (64, 32, 16):
    if max_len % block == 0:
      return block
  return None


def online_softmax_start(rows: int, head_dim: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`online_softmax`'s carry before any key: o = 0, m = MASKED, l = 0."""
  return (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), MASKED, jnp.float32),
          jnp.zeros((rows,), jnp.float32))


def online_softmax(carry: tuple[jax.Array, jax.Array, jax.Array], s: jax.Array, v: jax.Array,
                   visible: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One key block of a kernel's online softmax: carry (o [rows, D], m [rows], l [rows], fp32) after
  scaled scores s [rows, n] (fp32) and values v [n, D]; visible [rows, n] masks scores (None: all
  visible). P.V takes p in v's dtype, l the fp32 p."""
  o, m, l = carry
  if visible is not None:
    s = jnp.where(visible, s, MASKED)
  m_new = jnp.maximum(m, s.max(axis=1))
  p = jnp.exp(s - m_new[:, None])
  if visible is not None:
    p = jnp.where(visible, p, 0.0)
  rescale = jnp.exp(m - m_new)
  o = o * rescale[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return o, m_new, l * rescale + p.sum(axis=1)


def combine(o: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
  """Key-split partials merged in XLA: o [..., splits, rows, D], m, l [..., splits, rows] (fp32, split
  axis 2) -> the softmax-weighted output [..., rows, D]; a row no split saw gives 0."""
  top = m.max(axis=2, keepdims=True)
  w = jnp.exp(m - top)  # [..., splits, rows]; 0 for splits that saw nothing of a row
  num = (o * w[..., None]).sum(axis=2)
  den = (l * w).sum(axis=2)
  return num / jnp.where(den > 0, den, 1.0)[..., None]


def _merge_kernel(o_ref, m_ref, l_ref, out_ref, *, tokens: int, heads: int, kv_heads: int, splits: int):
  # o [batch, kv_heads, splits, rows, head_dim] fp32; m, l [batch, kv_heads, splits, rows];
  # out [batch, tokens, heads, head_dim]
  p = pl.program_id(0)
  b, t, h = p // (tokens * heads), (p // heads) % tokens, p % heads
  G = heads // kv_heads
  kvh, row = h // G, t * G + h % G
  n = 1 << max(0, (splits - 1).bit_length())  # Triton's vectors are powers of two: repeats, weighted 0
  s = jnp.minimum(jax.lax.broadcasted_iota(jnp.int32, (n,), 0), splits - 1)
  live = jax.lax.broadcasted_iota(jnp.int32, (n,), 0) < splits
  m = jnp.where(live, m_ref[b, kvh, s, row], MASKED)  # [n]
  w = jnp.where(live, jnp.exp(m - jnp.max(m)), 0.0)  # 0 for splits that saw nothing
  den = jnp.sum(l_ref[b, kvh, s, row] * w)
  den = jnp.where(den > 0, den, 1.0)  # a row that saw nothing gives 0, not NaN
  out_ref[b, t, h, :] = (jnp.sum(o_ref[b, kvh, s, row, :] * w[:, None], axis=0) / den).astype(out_ref.dtype)


def merge(o: jax.Array, m: jax.Array, l: jax.Array, tokens: int, heads: int, dtype, *, name: str,
          interpret: bool) -> jax.Array:
  """Key-split partials (o [batch, kv_heads, splits, rows, head_dim], m, l [batch, kv_heads, splits,
  rows]; row t * group + g is token t, query head g of the KV head's group) -> the softmax-weighted
  output [batch, tokens, heads, head_dim] in `dtype`, ready for the o projection: one Pallas program
  per (batch, token, head), a power-of-two head_dim. The fused attention blocks' merge (`name`: the
  kernel's, for profiles); `combine` is the same in XLA."""
  B, Hkv, splits, _, D = o.shape
  return pl.pallas_call(
      functools.partial(_merge_kernel, tokens=tokens, heads=heads, kv_heads=Hkv, splits=splits),
      grid=(B * tokens * heads,),
      out_shape=jax.ShapeDtypeStruct((B, tokens, heads, D), dtype),
      compiler_params=triton_params(4, 1, interpret),  # no loop to pipeline
      interpret=interpret,
      name=name,
  )(o, m, l)


class MatrixTiling(NamedTuple):
  """How a matmul kernel tiles W: a grid of N / block_n output tiles x `splits` programs along K."""
  block_n: int  # output channels per program (a power of two dividing N)
  block_k: int  # input channels per inner step (a power of two dividing K / splits)
  splits: int = 1  # programs along K
  num_warps: int = 4
  num_stages: int = 2


def split_k_matmul(kernel: Callable, operands: tuple, *, tiling: MatrixTiling, n: int, k: int,
                   rows: tuple[int, ...], name: str, interpret: bool | None) -> jax.Array:
  """Runs a matmul kernel over `tiling`'s grid and adds its K-split partial sums -> [*rows, N] fp32.

  kernel(*operand_refs, out_ref, block_n=, block_k=, steps=): program (i, j) writes output tile i of
  split j into out_ref [splits, *rows, N] after `steps` inner steps of block_k input channels."""
  t = tiling
  if n % t.block_n or k % (t.block_k * t.splits):
    raise ValueError(f"{name}: {t} does not tile N={n}, K={k} (block_n must divide N, block_k * splits K)")
  interpret = interpret_mode(interpret)
  partial = pl.pallas_call(
      functools.partial(kernel, block_n=t.block_n, block_k=t.block_k, steps=k // (t.block_k * t.splits)),
      grid=(n // t.block_n, t.splits),
      out_shape=jax.ShapeDtypeStruct((t.splits, *rows, n), jnp.float32),
      compiler_params=triton_params(t.num_warps, t.num_stages, interpret),
      interpret=interpret,
      name=name,
  )(*operands)
  return partial[0] if t.splits == 1 else jnp.sum(partial, axis=0)
