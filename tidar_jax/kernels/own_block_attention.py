"""The own-block part of TiDAR's training mask half, with its merge, as two Pallas (Triton) kernels.

A mask token attends to the mask tokens of its own block of k (`mask_half_attention`). In XLA that
part is [L/k, k, k] products, far too small to run at speed, plus a merge with the prefix part in
several elementwise passes. Here one program takes a tile of `tile` mask tokens (whole blocks; the
tile's other blocks masked by `masks.training_blocks`' own-tile mask) for one KV head and its query
heads:

  `_forward_kernel`: the tile's scores, softmax and P.V, merged with the prefix part's output and
    log-sum-exp -> the mask half's output and log-sum-exp, in one pass over q/k/v and the prefix output;
  `_backward_kernel`: the own part's flash backward run with the merged output and log-sum-exp, adding
    its dq to the prefix part's (in place) and writing the mask keys' and values' gradients, the query
    heads of a KV head summed inside the program (a tile's keys see only the tile's queries: no atomics).

Compiled on a GPU, interpreted elsewhere (the tests), equal to `mask_half_attention`'s XLA path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from tidar_jax import masks
from tidar_jax.kernels.pallas_common import interpret_mode, triton_params
from tidar_jax.masks import MASKED


def tile_for(seq_len: int, block_size: int, head_dim: int) -> int | None:
  """Mask tokens per program: the largest of 64, 32, 16 that holds whole blocks and divides seq_len,
  or None where none does or head_dim is no power of two >= 16 (Triton's dot shapes)."""
  if head_dim < 16 or head_dim & (head_dim - 1):
    return None
  for tile in (64, 32, 16):
    if tile % block_size == 0 and seq_len % tile == 0:
      return tile
  return None


def _rows(tile: int):
  return pl.ds(pl.program_id(1) * tile, tile)


def _scores(q, k, allowed, scale):  # q, k [tile, head_dim] -> [tile, tile] fp32, masked
  s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
  return jnp.where(allowed, s, MASKED)


def _forward_kernel(allowed_ref, q_ref, k_ref, v_ref, o_pre_ref, lse_pre_ref, out_ref, lse_ref, *, tile: int,
                    group: int, scale: float):
  # allowed [tile, tile] int32; q, o_pre, out [batch, L, heads, head_dim]; k, v [batch, L, kv_heads, head_dim];
  # lse_pre, lse [batch, heads, L] fp32
  b, kvh, rows = pl.program_id(0), pl.program_id(2), _rows(tile)
  allowed = allowed_ref[...] != 0
  k, v = k_ref[b, rows, kvh, :], v_ref[b, rows, kvh, :]  # [tile, head_dim]
  for g in range(group):
    h = kvh * group + g
    s = _scores(q_ref[b, rows, h, :], k, allowed, scale)
    m = s.max(axis=1)
    p = jnp.exp(s - m[:, None])
    l = p.sum(axis=1)
    o_own = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32) / l[:, None]
    lse_own = m + jnp.log(l)
    lse_pre = lse_pre_ref[b, h, rows]
    top = jnp.maximum(lse_pre, lse_own)  # a row of block 0 sees no clean key: its prefix weight is 0
    lse = top + jnp.log(jnp.exp(lse_pre - top) + jnp.exp(lse_own - top))
    out = (jnp.exp(lse_pre - lse)[:, None] * o_pre_ref[b, rows, h, :].astype(jnp.float32)
           + jnp.exp(lse_own - lse)[:, None] * o_own)
    out_ref[b, rows, h, :] = out.astype(out_ref.dtype)
    lse_ref[b, h, rows] = lse


def _backward_kernel(allowed_ref, q_ref, k_ref, v_ref, out_ref, lse_ref, dout_ref, dq_pre_ref, dq_ref, dk_ref,
                     dv_ref, *, tile: int, group: int, scale: float):
  # allowed [tile, tile] int32; q, out, dout, dq_pre, dq [batch, L, heads, head_dim];
  # k, v, dk, dv [batch, L, kv_heads, head_dim]; lse [batch, heads, L] fp32 (the merged softmax's)
  b, kvh, rows = pl.program_id(0), pl.program_id(2), _rows(tile)
  allowed = allowed_ref[...] != 0
  k, v = k_ref[b, rows, kvh, :], v_ref[b, rows, kvh, :]  # [tile, head_dim]
  dk = jnp.zeros(k.shape, jnp.float32)
  dv = jnp.zeros(v.shape, jnp.float32)
  for g in range(group):
    h = kvh * group + g
    q, do = q_ref[b, rows, h, :], dout_ref[b, rows, h, :]
    delta = (do.astype(jnp.float32) * out_ref[b, rows, h, :].astype(jnp.float32)).sum(axis=1)  # [tile]
    p = jnp.where(allowed, jnp.exp(_scores(q, k, allowed, scale) - lse_ref[b, h, rows][:, None]), 0.0)
    dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    ds = (p * (dp - delta[:, None]) * scale).astype(q.dtype)  # [tile, tile]
    dq = jnp.dot(ds, k, preferred_element_type=jnp.float32) + dq_pre_ref[b, rows, h, :].astype(jnp.float32)
    dq_ref[b, rows, h, :] = dq.astype(dq_ref.dtype)
    dk += jax.lax.dot_general(ds, q, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    dv += jax.lax.dot_general(p.astype(do.dtype), do, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  dk_ref[b, rows, kvh, :] = dk.astype(dk_ref.dtype)
  dv_ref[b, rows, kvh, :] = dv.astype(dv_ref.dtype)


def _launch(kernel, args, out_shape, *, block_size: int, tile: int, heads: int, interpret: bool | None,
            name: str, aliases=None):
  B, L, Hkv, D = args[1].shape  # km
  _, own = masks.training_blocks(L, block_size, tile)
  interpret = interpret_mode(interpret)
  return pl.pallas_call(
      functools.partial(kernel, tile=tile, group=heads // Hkv, scale=D**-0.5),
      grid=(B, L // tile, Hkv),
      out_shape=out_shape,
      input_output_aliases=aliases or {},
      compiler_params=triton_params(4, 1, interpret),  # no loop to pipeline
      interpret=interpret,
      name=name,
  )(jnp.asarray(own.astype(np.int32)), *args)


def forward(q: jax.Array,  # [batch, L, heads, head_dim] the mask half's queries
            km: jax.Array,  # [batch, L, kv_heads, head_dim] the mask half's keys
            vm: jax.Array,  # [batch, L, kv_heads, head_dim]
            o_pre: jax.Array,  # [batch, L, heads, head_dim] the prefix part's output
            lse_pre: jax.Array,  # [batch, heads, L] fp32 its log-sum-exp
            block_size: int, tile: int, *, interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
  """-> (the mask half's output [batch, L, heads, head_dim] in q's dtype, its log-sum-exp [batch,
  heads, L] fp32): the own blocks' softmax merged with the prefix part's."""
  B, L, H, D = q.shape
  return _launch(_forward_kernel, (q, km, vm, o_pre, lse_pre.astype(jnp.float32)),
                 [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, H, L), jnp.float32)],
                 block_size=block_size, tile=tile, heads=H, interpret=interpret, name="own_block_attention_fwd")


def backward(q: jax.Array, km: jax.Array, vm: jax.Array,  # as in `forward`
             out: jax.Array,  # [batch, L, heads, head_dim] the mask half's (merged) output
             lse: jax.Array,  # [batch, heads, L] fp32 its (merged) log-sum-exp
             dout: jax.Array,  # [batch, L, heads, head_dim]
             dq_pre: jax.Array,  # [batch, L, heads, head_dim] the prefix part's dq
             block_size: int, tile: int, *, interpret: bool | None = None
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """-> (dq: the prefix part's plus the own part's, dkm, dvm) in their inputs' dtypes."""
  H = q.shape[2]
  return _launch(_backward_kernel, (q, km, vm, out, lse.astype(jnp.float32), dout, dq_pre),
                 [jax.ShapeDtypeStruct(q.shape, dq_pre.dtype), jax.ShapeDtypeStruct(km.shape, km.dtype),
                  jax.ShapeDtypeStruct(vm.shape, vm.dtype)],
                 block_size=block_size, tile=tile, heads=H, interpret=interpret, name="own_block_attention_bwd",
                 aliases={7: 0})  # dq_pre (after the mask) -> dq
