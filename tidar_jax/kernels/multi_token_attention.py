"""A many-token (TiDAR) decode step's attention block in three Pallas launches per layer.

Around the split-KV kernel (`split_kv_attention.py`) a TiDAR step spent six XLA kernels per
layer: q's RoPE + regrouping into rows + padding, the key and value cache writes (RoPE on the
keys), and a three-kernel merge of the splits with the transpose back to [batch, T, heads,
head_dim]. Here:

  `_prologue_kernel`, grid (batch x kv_heads, query tiles + step-token tiles): finishes the q/k/v
    projection -- bias, qk-norm, RoPE at each step token's own position, rounding where the
    unfused step rounds -- straight from the q/k/v matmul's output. Query programs write q in the
    split-KV kernel's row layout (row t * group + g is step token t, query head g of the KV head's
    group; the tile padding repeats the last row, so every load is in bounds); key/value programs
    write step token u's key and value into the cache at slot lengths[b] + u, in place (aliased).
  the split-KV kernel (`split_kv_attention.partials`), unchanged: the step's keys are in the cache.
  `pallas_common.merge`, grid (batch x T x heads): merges one query row's split partials
    and writes [batch, T, heads, head_dim], ready for the o projection.

Six launches per layer become three. A one-token step has its own two kernels
(`one_token_attention.py`). Runs compiled on a GPU (Triton) and interpreted elsewhere; `reference`
is the unfused step it must equal.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from tidar_jax.decode.cache import write_rows
from tidar_jax.kernels import split_kv_attention, support
from tidar_jax.kernels.pallas_common import interpret_mode, key_block, merge, triton_params
from tidar_jax.kernels.qkv_epilogue import Projection, finish_projection, rope_halves
from tidar_jax.kernels.split_kv_attention import partials, tiling
from tidar_jax.masks import StepIntervals
from tidar_jax.model import apply_rope, rms_norm


_PROLOGUE_ROWS = 16  # query rows / step tokens per prologue program: many small programs


def _prologue_kernel(len_ref, cos_ref, sin_ref, qkv_ref, *refs, T: int, heads: int, kv_heads: int, tile: int,
                     q_tiles: int, eps: float, dtype, has_bias: bool, has_qk_norm: bool):
  # qkv [batch, T * (heads + 2 kv_heads), head_dim]; cos/sin [batch, T, head_dim / 2] fp32;
  # q_rows [batch, kv_heads, rows padded, head_dim]; caches [batch, max_len, kv_heads, head_dim]
  it = iter(refs)
  bias_ref = next(it) if has_bias else None
  qn_ref, kn_ref = (next(it), next(it)) if has_qk_norm else (None, None)
  k_in, v_in, q_out, k_out, v_out = it
  del k_in, v_in  # aliased to k_out / v_out
  G, D = heads // kv_heads, qkv_ref.shape[2]
  W, half = heads + 2 * kv_heads, D // 2  # q/k/v heads per token; RoPE's halves
  b = pl.program_id(0) // kv_heads
  kvh = pl.program_id(0) % kv_heads
  p = pl.program_id(1)
  lo, hi, whole = pl.ds(0, half), pl.ds(half, half), pl.ds(0, D)
  iota = jax.lax.broadcasted_iota(jnp.int32, (tile,), 0)

  def load(tokens, head, cols):  # tokens, head [tile] int -> (raw, bias or None) [tile, width] fp32
    raw = qkv_ref[b, tokens * W + head, cols].astype(jnp.float32)
    return raw, (bias_ref[head, cols].astype(jnp.float32) if has_bias else None)

  def roped(tokens, head, gain_ref):  # -> RoPE'd halves [tile, half] fp32, after bias and qk-norm
    gain = (gain_ref[lo].astype(jnp.float32)[None, :], gain_ref[hi].astype(jnp.float32)[None, :]
            ) if has_qk_norm else None
    return rope_halves(finish_projection(load(tokens, head, lo), None, dtype),
                       finish_projection(load(tokens, head, hi), None, dtype), gain,
                       cos_ref[b, tokens, :], sin_ref[b, tokens, :], dtype, eps)

  @pl.when(p < q_tiles)
  def _queries():  # rows p * tile ..: row t * G + g is token t, query head kvh * G + g
    rows = jnp.minimum(p * tile + iota, T * G - 1)  # the padding repeats the last row
    q_lo, q_hi = roped(rows // G, kvh * G + rows % G, qn_ref)
    q_out[b, kvh, pl.ds(p * tile, tile), lo] = q_lo.astype(q_out.dtype)
    q_out[b, kvh, pl.ds(p * tile, tile), hi] = q_hi.astype(q_out.dtype)

  @pl.when(p >= q_tiles)
  def _keys_values():  # step tokens u = (p - q_tiles) * tile ..: their key/value at slot lengths[b] + u
    u = jnp.minimum((p - q_tiles) * tile + iota, T - 1)  # past T: repeats of the last token, same values
    head = jnp.zeros_like(u) + kvh
    k_lo, k_hi = roped(u, heads + head, kn_ref)
    v = finish_projection(load(u, heads + kv_heads + head, whole), None, dtype)
    slots = len_ref[b] + u
    k_out[b, slots, kvh, lo] = k_lo.astype(k_out.dtype)
    k_out[b, slots, kvh, hi] = k_hi.astype(k_out.dtype)
    v_out[b, slots, kvh, :] = v.astype(v_out.dtype)


@functools.partial(jax.jit, static_argnames=("step_key", "heads", "eps", "dtype", "row_tile", "splits",
                                             "block_k", "num_warps", "num_stages", "interpret"))
def _attention(qkv, proj, cos, sin, k_buf, v_buf, lengths, *, step_key, heads, eps, dtype, row_tile, splits,
               block_k, num_warps, num_stages, interpret):
  B, T, _ = qkv.shape
  _, S, Hkv, D = k_buf.shape
  G = heads // Hkv
  tile, n_splits = tiling(B, T, heads, Hkv, S, row_tile, splits)
  R_pad = -(-T * G // tile) * tile
  q_tiles, kv_tiles = R_pad // _PROLOGUE_ROWS, -(-T // _PROLOGUE_ROWS)
  bias = None if proj.bias is None else proj.bias.reshape(-1, D)
  extra = [a for a in (bias, proj.q_norm, proj.k_norm) if a is not None]
  n_in = 4 + len(extra) + 2
  q_rows, k_buf, v_buf = pl.pallas_call(
      functools.partial(_prologue_kernel, T=T, heads=heads, kv_heads=Hkv, tile=_PROLOGUE_ROWS, q_tiles=q_tiles,
                        eps=eps, dtype=dtype, has_bias=proj.bias is not None, has_qk_norm=proj.q_norm is not None),
      grid=(B * Hkv, q_tiles + kv_tiles),
      out_shape=[jax.ShapeDtypeStruct((B, Hkv, R_pad, D), dtype), jax.ShapeDtypeStruct(k_buf.shape, k_buf.dtype),
                 jax.ShapeDtypeStruct(v_buf.shape, v_buf.dtype)],
      input_output_aliases={n_in - 2: 1, n_in - 1: 2},
      compiler_params=triton_params(4, 1, interpret),  # the prologue has no loop to pipeline
      interpret=interpret,
      name="multi_token_attention_prologue",
  )(lengths.astype(jnp.int32), cos, sin, qkv.reshape(B, -1, D), *extra, k_buf, v_buf)
  o, m, l = partials(q_rows, k_buf, v_buf, lengths, StepIntervals(*(np.asarray(a, np.int32) for a in step_key)), G,
                     tile=tile, splits=n_splits, block_k=block_k, num_warps=num_warps,
                     num_stages=num_stages, interpret=interpret)
  out = merge(o, m, l, T, heads, dtype, name="multi_token_attention_merge", interpret=interpret)  # [B, T, H, D]
  return out.reshape(B, T, heads * D), k_buf, v_buf


def attend(
    qkv: jax.Array,  # [batch, T, (heads + 2 kv_heads) * head_dim]: q, k, v projections (normed) before proj's steps
    proj: Projection,  # bias and qk-norm gains (proj.x must be None: nothing to fold at many rows)
    dtype,  # the compute dtype: every intermediate is rounded to it where the unfused step rounds
    cos: jax.Array,  # [batch, T, head_dim / 2] fp32: RoPE of each step token's position (`model.rope_cos_sin`)
    sin: jax.Array,  # [batch, T, head_dim / 2] fp32
    k_buf: jax.Array,  # [batch, max_len, kv_heads, head_dim]: committed slots < lengths
    v_buf: jax.Array,  # [batch, max_len, kv_heads, head_dim]
    lengths: jax.Array,  # [batch] int32: step token u goes to slot lengths[b] + u
    step: StepIntervals,  # static: which step tokens each step token sees
    *,
    heads: int,
    eps: float,
    row_tile: int = 0,  # split-KV query rows per program (a multiple of 16); 0: `split_kv_attention.tiling`
    splits: int = 0,  # key splits; 0: by the grid size and max_len
    block_k: int = 0,  # keys per inner iteration; 0: `key_block(max_len)`
    num_warps: int = 4,
    num_stages: int = 3,  # Triton's software pipelining depth of the split-KV key loop
    interpret: bool | None = None,  # None: compiled on a GPU, interpreted elsewhere
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """-> (attention output [batch, T, heads * head_dim] in `dtype`, k_buf, v_buf with step token u's
  key/value at slot lengths[b] + u). The caller guarantees lengths + T <= max_len."""
  B, S, Hkv, D = k_buf.shape
  if proj.x is not None:
    raise ValueError("multi-token attention takes normed q/k/v (Projection.x=None): the norm is folded only at one row")
  if not support.multi_token(D, S):
    raise ValueError(f"multi-token attention needs a power-of-two head_dim (got {D}) and max_len % 16 == 0 "
                     f"(got {S}); use the split-KV step attention")
  block_k = block_k or key_block(S)
  if S % block_k:
    raise ValueError(f"block_k={block_k} must divide max_len={S}")
  if row_tile % _PROLOGUE_ROWS:
    raise ValueError(f"row_tile={row_tile} must be a multiple of {_PROLOGUE_ROWS} (0: the default)")
  return _attention(qkv, proj, cos, sin, k_buf, v_buf, lengths, step_key=step.key(), heads=heads, eps=eps, dtype=dtype,
                    row_tile=row_tile, splits=splits, block_k=block_k, num_warps=num_warps, num_stages=num_stages,
                    interpret=interpret_mode(interpret))


def reference(qkv: jax.Array, proj: Projection, dtype, cos: jax.Array, sin: jax.Array, k_buf: jax.Array,
              v_buf: jax.Array, lengths: jax.Array, step: StepIntervals, *, heads: int, eps: float
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`attend` in XLA ops, the unfused step's way (bias, qk-norm, RoPE at each token's position, the
  cache writes, `split_kv_attention.reference`), each intermediate stored in `dtype`: what the kernels
  must compute. Same arguments and results as `attend`."""
  B, T, _ = qkv.shape
  S, Hkv, D = k_buf.shape[1:]
  y = qkv if proj.bias is None else qkv + proj.bias[None, None, :]
  q, k, v = jnp.split(y.reshape(B, T, -1, D), [heads, heads + Hkv], axis=2)  # [batch, T, heads, head_dim], ...
  if proj.q_norm is not None:
    q, k = rms_norm(q, proj.q_norm, eps, dtype), rms_norm(k, proj.k_norm, eps, dtype)
  q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
  k_buf, v_buf = write_rows(k_buf, k, lengths), write_rows(v_buf, v, lengths)
  mask = split_kv_attention.visible_slots(lengths, step, S)
  return split_kv_attention.reference(q, k_buf, v_buf, mask).reshape(B, T, heads * D), k_buf, v_buf
