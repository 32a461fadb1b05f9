"""Split-KV ("flash-decoding") attention of one decode step's T queries over the KV cache (Pallas).

cuDNN's flash kernel parallelises over (batch, heads, query tiles) only: a TiDAR step at batch 1
(T = k + k² queries) over a 2k-slot cache runs 36 CTAs, leaving most of a GPU's SMs idle. Here
the grid also splits the keys, and the query heads sharing a KV head are
packed into the rows of one tile (GQA), so each program reads its KV slice once for all of them:

  grid (batch x kv_heads, row tiles, key splits); each program runs an online softmax over its
  share of the row's live key blocks and writes an unnormalised partial (o, m, l);
  `pallas_common.combine` merges the splits with their log-sum-exps (one XLA fusion).

The visibility of a key to a query is not a mask array: new token t sees the row's committed slots
(< length) and the step tokens the step's `masks.StepIntervals` allow (u < prefix[t], lo[t] <= u <
hi[t]), computed from three int vectors in-kernel instead of reading a [T, max_len] mask per layer.

Requirements (checked by `support.split_kv`): the cache's slot count is a multiple of the key block (the
decode loop allocates max_len rounded up to `dispatch.CACHE_ALIGN` on a GPU) and lengths + T <=
max_len (the host check of `loop.check_request`). Runs compiled on a GPU (Triton) and interpreted
elsewhere. `reference` is the dense masked softmax it must equal (and the decoders' attention off
the GPU); `visible_slots` is the [batch, T, max_len] mask both that and cuDNN read.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from tidar_jax.kernels import support
from tidar_jax.kernels.pallas_common import (combine, interpret_mode, key_block, online_softmax,
                                              online_softmax_start, triton_params)
from tidar_jax.masks import MASKED, StepIntervals


def visible_slots(lengths: jax.Array, step: StepIntervals, max_len: int) -> jax.Array:
  """[batch, T, max_len] bool: step token t may read its row's committed slots (< lengths[b]) and the
  slot lengths[b] + u of each step token u it sees."""
  slot = jnp.arange(max_len)[None, None, :] - lengths[:, None, None]  # [batch, 1, max_len]: u of the slot
  prefix, lo, hi = (jnp.asarray(a)[None, :, None] for a in step)  # [1, T, 1]
  return (slot < 0) | (slot < prefix) | ((slot >= lo) & (slot < hi))


def reference(q: jax.Array, k_buf: jax.Array, v_buf: jax.Array, mask: jax.Array) -> jax.Array:
  """The dense attention of q [batch, T, heads, head_dim] over the cache [batch, max_len, kv_heads,
  head_dim] (GQA) under mask [batch, T, max_len] (`visible_slots`): fp32 scores and softmax, P.V in
  the values' dtype -> [batch, T, heads, head_dim]."""
  B, T, H, D = q.shape
  Hkv = k_buf.shape[2]
  q = q.reshape(B, T, Hkv, H // Hkv, D)  # [batch, T, kv_heads, group, head_dim]
  s = jnp.einsum("btkgd,bskd->bkgts", q, k_buf, preferred_element_type=jnp.float32) * D**-0.5
  s = jnp.where(mask[:, None, None], s, MASKED)  # [batch, kv_heads, group, T, max_len]
  p = jax.nn.softmax(s, axis=-1).astype(v_buf.dtype)
  return jnp.einsum("bkgts,bskd->btkgd", p, v_buf).reshape(B, T, H, D)


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


def row_bounds(per_token: np.ndarray, group: int, rows: int) -> jax.Array:
  """A step token's interval bound [T] -> per query row [rows] (row t * group + g is token t); rows
  past T * group (tile padding) get 0: they see the committed slots only."""
  return jnp.asarray(np.pad(np.repeat(np.asarray(per_token, np.int32), group), (0, rows - len(per_token) * group)))


def partials(q_rows: jax.Array, k_buf: jax.Array, v_buf: jax.Array, lengths: jax.Array, step: StepIntervals,
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
  kernel = functools.partial(_kernel, block_k=block_k, splits=splits, new_tokens=step.tokens,
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
  )(lengths.astype(jnp.int32), *(row_bounds(a, group, R_pad) for a in step), q_rows, k_buf, v_buf)


@functools.partial(jax.jit, static_argnames=("step_key", "row_tile", "splits", "block_k", "num_warps",
                                             "num_stages", "interpret"))
def _attention(q, k_buf, v_buf, lengths, step_key, row_tile, splits, block_k, num_warps, num_stages, interpret):
  B, T, H, D = q.shape
  _, S, Hkv, _ = k_buf.shape
  G = H // Hkv
  R = T * G  # rows per KV head: row t * G + g is token t, query head g of the group
  tile, n_splits = tiling(B, T, H, Hkv, S, row_tile, splits)
  R_pad = -(-R // tile) * tile
  q_rows = q.reshape(B, T, Hkv, G, D).transpose(0, 2, 1, 3, 4).reshape(B, Hkv, R, D)
  q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, R_pad - R), (0, 0)))  # [batch, kv_heads, R_pad, D]
  o, m, l = partials(q_rows, k_buf, v_buf, lengths, StepIntervals(*(np.asarray(a, np.int32) for a in step_key)), G,
                     tile=tile, splits=n_splits, block_k=block_k or key_block(S), num_warps=num_warps,
                     num_stages=num_stages, interpret=interpret)
  out = combine(o, m, l)[:, :, :R]  # [batch, kv_heads, R, D]
  return out.reshape(B, Hkv, T, G, D).transpose(0, 2, 1, 3, 4).reshape(B, T, H, D).astype(q.dtype)


def step_attention(
    q: jax.Array,  # [batch, T, heads, head_dim]
    k_buf: jax.Array,  # [batch, max_len, kv_heads, head_dim]: the step's own keys already written
    v_buf: jax.Array,  # [batch, max_len, kv_heads, head_dim]
    lengths: jax.Array,  # [batch] int32 committed slots; step token u is at slot lengths[b] + u
    step: StepIntervals,  # static: which step tokens each step token sees
    *,
    row_tile: int = 0,  # 0: by T x group size
    splits: int = 0,  # 0: by the grid size and max_len
    block_k: int = 0,  # keys per inner iteration; 0: `key_block(max_len)`
    num_warps: int = 4,
    num_stages: int = 3,  # Triton's software pipelining depth of the key loop
    interpret: bool | None = None,  # None: compiled on GPU, interpreted elsewhere
) -> jax.Array:  # [batch, T, heads, head_dim]
  if block_k and k_buf.shape[1] % block_k:
    raise ValueError(f"block_k={block_k} must divide max_len={k_buf.shape[1]}")
  if not support.split_kv(k_buf.shape[1]):
    raise ValueError(f"split-KV attention needs max_len % 16 == 0 (got max_len={k_buf.shape[1]}); use "
                     "attention='cudnn' or 'dense'")
  return _attention(q, k_buf, v_buf, lengths, step.key(), row_tile, splits, block_k, num_warps, num_stages,
                    interpret_mode(interpret))
