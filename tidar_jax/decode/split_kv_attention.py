"""Split-KV ("flash-decoding") attention of one decode step's T queries over the KV cache (Pallas).

cuDNN's flash kernel parallelises over (batch, heads, query tiles) only: a TiDAR step at batch 1
(T = k + k² queries) over a 2k-slot cache runs 36 CTAs, leaving most of a GPU's SMs idle. Here
the grid also splits the keys, and the query heads sharing a KV head are
packed into the rows of one tile (GQA), so each program reads its KV slice once for all of them:

  grid (batch x kv_heads, row tiles, key splits); each program runs an online softmax over its
  share of the row's live key blocks and writes an unnormalised partial (o, m, l); `_combine`
  merges the splits with their log-sum-exps (one XLA fusion).

The visibility of a key to a query is not a mask array: every step mask we use is an "interval
form" (`interval_form`): new token t sees the row's committed slots (< length), the step tokens
u < prefix[t] and lo[t] <= u < hi[t]. That is AR ([[True]]) and TiDAR's `masks.decode_step_mask`
(verification: causal prefix; draft block a: prefix a + 1 plus its own block), computed from
three int vectors in-kernel instead of reading a [T, max_len] mask per layer.

Requirements (checked by `supported`): the cache's slot count is a multiple of the key block (the
decode loop allocates max_len rounded up to `loop.CACHE_ALIGN` on a GPU) and lengths + T <= max_len (the
host check of `loop.check_request`). Runs compiled on a GPU (Triton) and interpreted elsewhere
(tests compare it with the dense attention on CPU).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from tidar_jax.attention import MASKED  # finite: a row with nothing visible in a split gives l = 0, not NaN


class Intervals(NamedTuple):
  """Which step tokens each step token sees, as half-open intervals of step-token indices."""

  prefix: np.ndarray  # [T] int32: sees u < prefix[t]
  lo: np.ndarray  # [T] int32: and lo[t] <= u < hi[t]
  hi: np.ndarray  # [T] int32


def interval_form(step_mask: np.ndarray) -> Intervals | None:
  """[T, T] bool step mask -> its interval form, or None when it has none (then use another kernel).

  Each row must be one prefix [0, p) plus at most one more contiguous run [lo, hi)."""
  m = np.asarray(step_mask, bool)
  T = m.shape[0]
  prefix, lo, hi = np.zeros(T, np.int32), np.zeros(T, np.int32), np.zeros(T, np.int32)
  for t in range(T):
    row = m[t]
    p = int(np.argmin(row)) if not row.all() else T
    rest = np.flatnonzero(row[p:]) + p
    if rest.size:
      lo[t], hi[t] = rest[0], rest[-1] + 1
    prefix[t] = p
    rebuilt = (np.arange(T) < prefix[t]) | ((np.arange(T) >= lo[t]) & (np.arange(T) < hi[t]))
    if not np.array_equal(rebuilt, row):
      return None
  return Intervals(prefix, lo, hi)


def key_block(max_len: int) -> int | None:
  """Largest key block (power of two in 16..64) that tiles `max_len` slots, or None (64 timed
  fastest at the 1.5B shape)."""
  for block in (64, 32, 16):
    if max_len % block == 0:
      return block
  return None


def supported(step_mask: np.ndarray, max_len: int) -> bool:
  return key_block(max_len) is not None and interval_form(step_mask) is not None


def _row_tile(rows: int) -> int:
  """Query rows per program: Triton's dot wants >= 16; 64 keeps a TiDAR step's tiles full."""
  for tile in (16, 32):
    if rows <= tile:
      return tile
  return 64


def _splits(programs: int, max_len: int, block_k: int) -> int:
  """Key splits: about 200 programs, ~1.5 waves on a 132-SM GPU (timed fastest at the 1.5B
  shape), at most one per key block of the cache."""
  return int(max(1, min(-(-200 // programs), max_len // block_k)))


def tiling(batch: int, tokens: int, heads: int, kv_heads: int, max_len: int, row_tile: int = 0,
           splits: int = 0) -> tuple[int, int]:
  """(query rows per program, key splits) for a step; 0 = the default for that one."""
  rows = tokens * (heads // kv_heads)
  tile = row_tile or _row_tile(rows)
  n_tiles = -(-rows // tile)
  return tile, splits or _splits(batch * kv_heads * n_tiles, max_len, key_block(max_len))


def triton_params(num_warps: int, num_stages: int, interpret: bool):
  """A Pallas call's Triton compiler params; None when it is interpreted (off the GPU). Every
  decode kernel's (`one_token_attention`, `multi_token_attention`)."""
  if interpret:
    return None
  from jax.experimental.pallas import triton as plgpu
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def online_softmax_start(rows: int, head_dim: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`online_softmax`'s carry before any key: o = 0, m = MASKED, l = 0."""
  return (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), MASKED, jnp.float32),
          jnp.zeros((rows,), jnp.float32))


def online_softmax(carry: tuple[jax.Array, jax.Array, jax.Array], s: jax.Array, v: jax.Array,
                   visible: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One key block of a kernel's online softmax: carry (o [rows, D], m [rows], l [rows], fp32) after
  scaled scores s [rows, n] (fp32) and values v [n, D]; visible [rows, n] masks scores (None: all
  visible). P.V takes p in v's dtype, l the fp32 p. Also `one_token_attention`'s."""
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


def _kernel(len_ref, pre_ref, lo_ref, hi_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *,
            block_k: int, splits: int, new_tokens: int, scale: float):
  # len_ref [1]; pre/lo/hi [rows]; q [rows, head_dim]; k/v [max_len, head_dim] (this row, KV head)
  length = len_ref[0]
  live_blocks = pl.cdiv(length + new_tokens, block_k)  # keys past length + T are never visible
  per_split = pl.cdiv(live_blocks, splits)
  first = pl.program_id(2) * per_split
  last = jnp.minimum(first + per_split, live_blocks)
  q = q_ref[...]
  pre = (length + pre_ref[...])[:, None]  # [rows, 1] absolute slot bounds
  lo = (length + lo_ref[...])[:, None]
  hi = (length + hi_ref[...])[:, None]
  rows, head_dim = q.shape

  def step(block, carry, masked: bool):  # carry: [rows, head_dim], [rows], [rows] fp32
    start = block * block_k
    k = k_ref[pl.ds(start, block_k), :]
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
    visible = None
    if masked:
      slot = start + jax.lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
      visible = (slot < pre) | ((slot >= lo) & (slot < hi))
    return online_softmax(carry, s, v_ref[pl.ds(start, block_k), :], visible)

  init = online_softmax_start(rows, head_dim)
  # Blocks wholly inside the committed slots are visible to every row: no mask arithmetic there
  # (most of a step's blocks); only the blocks holding the step's own tokens are masked.
  committed = jnp.clip(length // block_k, first, last)
  carry = jax.lax.fori_loop(first, committed, functools.partial(step, masked=False), init)
  o, m, l = jax.lax.fori_loop(committed, last, functools.partial(step, masked=True), carry)
  o_ref[...] = o
  m_ref[...] = m
  l_ref[...] = l


def _combine(o: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
  """Partials over the split axis (2) -> the softmax-weighted output. o [..., splits, rows, D]."""
  top = m.max(axis=2, keepdims=True)
  w = jnp.exp(m - top)  # [..., splits, rows]; 0 for splits that saw nothing of a row
  num = (o * w[..., None]).sum(axis=2)
  den = (l * w).sum(axis=2)
  return num / jnp.where(den > 0, den, 1.0)[..., None]


def row_bounds(per_token: np.ndarray, group: int, rows: int) -> jax.Array:
  """A step token's interval bound [T] -> per query row [rows] (row t * group + g is token t); rows
  past T * group (tile padding) get 0: they see the committed slots only."""
  return jnp.asarray(np.pad(np.repeat(np.asarray(per_token, np.int32), group), (0, rows - len(per_token) * group)))


def partials(q_rows: jax.Array, k_buf: jax.Array, v_buf: jax.Array, lengths: jax.Array, intervals: Intervals,
             group: int, *, tile: int, splits: int, block_k: int, num_warps: int, num_stages: int, interpret: bool
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The kernel's launch: q_rows [batch, kv_heads, rows padded to tiles, head_dim] (row t * group + g
  is step token t, query head g of the KV head's group) over the cache -> each split's unnormalised
  partials o [batch, kv_heads, splits, rows, head_dim], m, l [batch, kv_heads, splits, rows] (fp32).
  Also `multi_token_attention`'s."""
  B, Hkv, R_pad, D = q_rows.shape
  S = k_buf.shape[1]

  def bh(i):
    return i // Hkv, i % Hkv

  row_spec = pl.BlockSpec((tile,), lambda i, r, j: (r,))
  kv_spec = pl.BlockSpec((None, S, None, D), lambda i, r, j: (bh(i)[0], 0, bh(i)[1], 0))
  part = (B, Hkv, splits, R_pad)
  kernel = functools.partial(_kernel, block_k=block_k, splits=splits, new_tokens=len(intervals.prefix),
                             scale=D**-0.5)
  return pl.pallas_call(
      kernel,
      grid=(B * Hkv, R_pad // tile, splits),
      in_specs=[pl.BlockSpec((1,), lambda i, r, j: (bh(i)[0],)), row_spec, row_spec, row_spec,
                pl.BlockSpec((None, None, tile, D), lambda i, r, j: (*bh(i), r, 0)), kv_spec, kv_spec],
      out_specs=[pl.BlockSpec((None, None, None, tile, D), lambda i, r, j: (*bh(i), j, r, 0)),
                 pl.BlockSpec((None, None, None, tile), lambda i, r, j: (*bh(i), j, r)),
                 pl.BlockSpec((None, None, None, tile), lambda i, r, j: (*bh(i), j, r))],
      out_shape=[jax.ShapeDtypeStruct((*part, D), jnp.float32), jax.ShapeDtypeStruct(part, jnp.float32),
                 jax.ShapeDtypeStruct(part, jnp.float32)],
      compiler_params=triton_params(num_warps, num_stages, interpret),
      interpret=interpret,
      name="split_kv_step_attention",
  )(lengths.astype(jnp.int32), *(row_bounds(a, group, R_pad) for a in intervals), q_rows, k_buf, v_buf)


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
  """`partials`' layout (o [batch, kv_heads, splits, rows, head_dim], m, l [batch, kv_heads, splits,
  rows]; row t * group + g is token t, query head g of the KV head's group) -> the softmax-weighted
  output [batch, tokens, heads, head_dim] in `dtype`, ready for the o projection: one Pallas program
  per (batch, token, head), a power-of-two head_dim. The fused attention blocks' merge
  (`one_token_attention`, `multi_token_attention`; `name` is the kernel's, for profiles);
  `step_attention` merges in XLA (`_combine`)."""
  B, Hkv, splits, _, D = o.shape
  return pl.pallas_call(
      functools.partial(_merge_kernel, tokens=tokens, heads=heads, kv_heads=Hkv, splits=splits),
      grid=(B * tokens * heads,),
      out_shape=jax.ShapeDtypeStruct((B, tokens, heads, D), dtype),
      compiler_params=triton_params(4, 1, interpret),  # no loop to pipeline
      interpret=interpret,
      name=name,
  )(o, m, l)


@functools.partial(jax.jit, static_argnames=("intervals_key", "row_tile", "splits", "block_k", "num_warps",
                                             "num_stages", "interpret"))
def _attention(q, k_buf, v_buf, lengths, intervals_key, row_tile, splits, block_k, num_warps, num_stages, interpret):
  B, T, H, D = q.shape
  _, S, Hkv, _ = k_buf.shape
  G = H // Hkv
  R = T * G  # rows per KV head: row t * G + g is token t, query head g of the group
  tile, n_splits = tiling(B, T, H, Hkv, S, row_tile, splits)
  R_pad = -(-R // tile) * tile
  q_rows = q.reshape(B, T, Hkv, G, D).transpose(0, 2, 1, 3, 4).reshape(B, Hkv, R, D)
  q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, R_pad - R), (0, 0)))  # [batch, kv_heads, R_pad, D]
  o, m, l = partials(q_rows, k_buf, v_buf, lengths, Intervals(*(np.asarray(a, np.int32) for a in intervals_key)), G,
                     tile=tile, splits=n_splits, block_k=block_k or key_block(S), num_warps=num_warps,
                     num_stages=num_stages, interpret=interpret)
  out = _combine(o, m, l)[:, :, :R]  # [batch, kv_heads, R, D]
  return out.reshape(B, Hkv, T, G, D).transpose(0, 2, 1, 3, 4).reshape(B, T, H, D).astype(q.dtype)


def step_attention(
    q: jax.Array,  # [batch, T, heads, head_dim]
    k_buf: jax.Array,  # [batch, max_len, kv_heads, head_dim]: the step's own keys already written
    v_buf: jax.Array,  # [batch, max_len, kv_heads, head_dim]
    lengths: jax.Array,  # [batch] int32 committed slots; step token u is at slot lengths[b] + u
    step_mask: np.ndarray,  # [T, T] static: which step tokens each step token sees
    *,
    row_tile: int = 0,  # 0: by T x group size
    splits: int = 0,  # 0: by the grid size and max_len
    block_k: int = 0,  # keys per inner iteration; 0: `key_block(max_len)`
    num_warps: int = 4,
    num_stages: int = 3,  # Triton's software pipelining depth of the key loop
    interpret: bool | None = None,  # None: compiled on GPU, interpreted elsewhere
) -> jax.Array:  # [batch, T, heads, head_dim]
  iv = interval_form(step_mask)
  if block_k and k_buf.shape[1] % block_k:
    raise ValueError(f"block_k={block_k} must divide max_len={k_buf.shape[1]}")
  if iv is None or key_block(k_buf.shape[1]) is None:
    raise ValueError(f"split-KV attention needs a step mask in interval form and max_len % 16 == 0 "
                     f"(got max_len={k_buf.shape[1]}); use attention='cudnn' or 'dense'")
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  key = tuple(tuple(int(x) for x in a) for a in iv)
  return _attention(q, k_buf, v_buf, lengths, key, row_tile, splits, block_k, num_warps, num_stages, interpret)
