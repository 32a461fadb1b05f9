"""The one-token (AR) decode step's attention block in two Pallas launches per layer.

At one new token per row the step's attention reads little (the 1.5B model's 2 KV heads x 2048
slots are 2 MB per layer), so what it costs is launches: unfused, the norm's mean square, q's
RoPE, two cache writes, the split-KV kernel and an XLA merge are seven kernels per layer. Here:

  `_attend_kernel`, grid (batch x kv_heads, key splits): every program finishes the q/k/v
    projection of its KV head -- the folded RMSNorm's 1 / rms(x) (`engine.normed_matmul`), the
    bias, qk-norm and RoPE, rounding where the unfused path rounds -- then runs an online softmax of
    its query heads over its share of the row's committed slots; the last split also takes the new
    token itself (from registers, not the cache), and the first writes the new key/value into the
    cache at slot lengths[b] (in place: the buffers are aliased). The query group is padded to the
    16 rows Triton's dot needs by repeating its last head (multiply + reduce on the CUDA cores
    instead spills the unrolled heads).
  `pallas_common.merge`, grid (batch x heads): merges the splits' partials (o, m, l) with
    their log-sum-exps and writes the attention output, ready for the o projection.

Programs only read slots < lengths[b] from the cache, and only (b, kv head, split 0) writes slot
lengths[b], so there is no read/write race. Runs compiled on a GPU (Triton) and interpreted
elsewhere; `reference` is the unfused step it must equal.
"""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from tidar_jax.kernels.pallas_common import (interpret_mode, key_block, merge, online_softmax, online_softmax_start,
                                              triton_params)
from tidar_jax.decode.cache import write_rows
from tidar_jax.kernels import split_kv_attention, support
from tidar_jax.kernels.qkv_epilogue import Projection, finish_projection, rope_halves, rounded
from tidar_jax.masks import causal_step
from tidar_jax.model import apply_rope, inverse_rms, rms_norm

_ROWS = support.GROUP_ROWS  # query rows per program: a KV head's query group, padded to what Triton's dot needs


def _pow2_at_most(n: int) -> int:
  return 1 << (max(1, n).bit_length() - 1)


def _chunk(n: int) -> int:
  """Largest power of two <= 1024 dividing n: Triton's tensors have power-of-two sizes."""
  return int(np.gcd(n, 1024))


def default_splits(batch: int, kv_heads: int, max_len: int, block_k: int) -> int:
  """Key splits: about 128 programs in all, at most one per key block (powers of two: measured so)."""
  per_row_head = -(-128 // (batch * kv_heads))
  return min(_pow2_at_most(per_row_head), _pow2_at_most(max_len // block_k))


def _attend_kernel(len_ref, cos_ref, sin_ref, qkv_ref, *refs, heads: int, kv_heads: int, block_k: int, splits: int,
                   eps: float, dtype, has_x: bool, has_bias: bool, has_qk_norm: bool):
  # qkv [batch, heads + 2 kv_heads, head_dim]; cos/sin [batch, head_dim / 2];
  # caches [batch, max_len, kv_heads, head_dim]
  it = iter(refs)
  x_ref = next(it) if has_x else None
  bias_ref = next(it) if has_bias else None
  qn_ref, kn_ref = (next(it), next(it)) if has_qk_norm else (None, None)
  k_in, v_in, o_ref, m_ref, l_ref, k_out, v_out = it
  del k_in, v_in  # aliased to k_out / v_out: read and written through those
  G, D = heads // kv_heads, qkv_ref.shape[2]
  half = D // 2
  b = pl.program_id(0) // kv_heads
  kvh = pl.program_id(0) % kv_heads
  j = pl.program_id(1)
  length = len_ref[b]

  def f32(a):
    return a.astype(jnp.float32)

  # Split j takes key blocks j, j + splits, j + 2 splits, ... below the row's length: its first
  # block does not depend on the length, so it is loaded at once, beside the length itself.
  # Every load that does not depend on arithmetic comes first -- that block, x, the q/k/v rows and
  # their bias -- so their latencies overlap (at one block per split, the AR case, that is the
  # whole kernel's memory traffic).
  keys0 = pl.ds(j * block_k, block_k)  # splits <= the cache's key blocks
  k0 = (k_out[b, keys0, kvh, pl.ds(0, half)], k_out[b, keys0, kvh, pl.ds(half, half)])
  v0 = v_out[b, keys0, kvh, :]
  if has_x:
    c = _chunk(x_ref.shape[1])
    xs = [f32(x_ref[b, pl.ds(i * c, c)]) for i in range(x_ref.shape[1] // c)]

  def load(rows, cols):  # rows [n] int -> (raw q/k/v values, bias or None), [n, width] fp32
    return f32(qkv_ref[b, rows, cols]), (f32(bias_ref[rows, cols]) if has_bias else None)

  # The group's query heads as 16 rows (Triton's dot needs >= 16): rows past the group repeat its
  # last head, so every load stays in bounds; the merge reads only the first G rows.
  q_rows = kvh * G + jnp.minimum(jax.lax.broadcasted_iota(jnp.int32, (_ROWS,), 0), G - 1)
  one = jnp.zeros((1,), jnp.int32)  # the new token's k and v rows, as [1] row vectors
  lo, hi, whole = pl.ds(0, half), pl.ds(half, half), pl.ds(0, D)
  q_raw = (load(q_rows, lo), load(q_rows, hi))
  k_raw = (load(heads + kvh + one, lo), load(heads + kvh + one, hi))
  v_raw = load(heads + kv_heads + kvh + one, whole)
  cos, sin = cos_ref[b, :][None, :], sin_ref[b, :][None, :]  # [1, half] fp32
  gains = ((f32(qn_ref[lo])[None, :], f32(qn_ref[hi])[None, :]), (f32(kn_ref[lo])[None, :], f32(kn_ref[hi])[None, :])
           ) if has_qk_norm else (None, None)

  inv_rms = jax.lax.rsqrt(sum(jnp.sum(xc * xc) for xc in xs) / x_ref.shape[1] + eps) if has_x else None

  def projected(raw):
    return finish_projection(raw, inv_rms, dtype)

  def with_rope(raw_lo, raw_hi, gain):
    return rope_halves(projected(raw_lo), projected(raw_hi), gain, cos, sin, dtype, eps)

  q_lo, q_hi = (q.astype(dtype) for q in with_rope(*q_raw, gains[0]))  # [16, half]
  k_lo, k_hi = with_rope(*k_raw, gains[1])  # [1, half]
  v_new = projected(v_raw)  # [1, D]

  @pl.when(j == 0)
  def _write_cache():
    k_out[b, pl.ds(length, 1), kvh, lo] = k_lo.astype(k_out.dtype)
    k_out[b, pl.ds(length, 1), kvh, hi] = k_hi.astype(k_out.dtype)
    v_out[b, pl.ds(length, 1), kvh, :] = v_new.astype(v_out.dtype)

  scale = D**-0.5

  def scores(k_lo, k_hi):  # [n, half] x 2 -> [16, n]
    dims = (((1,), (1,)), ((), ()))
    return (jax.lax.dot_general(q_lo, k_lo.astype(dtype), dims, preferred_element_type=jnp.float32)
            + jax.lax.dot_general(q_hi, k_hi.astype(dtype), dims, preferred_element_type=jnp.float32)) * scale

  def visible(i):  # [16, block_k]: key block i's committed slots
    return (i * block_k + jax.lax.broadcasted_iota(jnp.int32, (_ROWS, block_k), 1)) < length

  def block(t, carry):  # the split's t-th key block
    i = j + t * splits
    keys = pl.ds(i * block_k, block_k)
    s = scores(k_out[b, keys, kvh, lo], k_out[b, keys, kvh, hi])
    return online_softmax(carry, s, v_out[b, keys, kvh, :].astype(dtype), visible(i))

  # All masked when block j is past the length.
  carry = online_softmax(online_softmax_start(_ROWS, D), scores(*k0), v0.astype(dtype), visible(j))
  o, m, l = jax.lax.fori_loop(1, pl.cdiv(pl.cdiv(length, block_k) - j, splits), block, carry)
  # The new token (slot lengths[b], from registers) counts in the last split only.
  s_new = (jnp.sum(f32(q_lo) * k_lo, axis=1, keepdims=True) + jnp.sum(f32(q_hi) * k_hi, axis=1, keepdims=True)) * scale
  m_new = jnp.where(j == splits - 1, jnp.maximum(m, s_new[:, 0]), m)
  p_new = jnp.where(j == splits - 1, jnp.exp(s_new[:, 0] - m_new), 0.0)  # [16]
  r = jnp.exp(m - m_new)
  o_ref[b, kvh, j, :, :] = o * r[:, None] + rounded(p_new, dtype)[:, None] * v_new
  m_ref[b, kvh, j, :] = m_new
  l_ref[b, kvh, j, :] = l * r + p_new


def _attention(qkv, proj, cos, sin, k_buf, v_buf, lengths, *, heads, kv_heads, eps, dtype, splits, block_k,
               num_warps, num_stages, interpret):
  B, S, Hkv, D = k_buf.shape
  bias = None if proj.bias is None else proj.bias.reshape(-1, D)
  extra = [a for a in (proj.x, bias, proj.q_norm, proj.k_norm) if a is not None]
  n_in = 4 + len(extra) + 2
  part = (B, Hkv, splits, _ROWS)
  kernel = functools.partial(_attend_kernel, heads=heads, kv_heads=kv_heads, block_k=block_k, splits=splits, eps=eps,
                             dtype=dtype, has_x=proj.x is not None, has_bias=proj.bias is not None,
                             has_qk_norm=proj.q_norm is not None)
  o, m, l, k_buf, v_buf = pl.pallas_call(
      kernel,
      grid=(B * Hkv, splits),
      out_shape=[jax.ShapeDtypeStruct((*part, D), jnp.float32), jax.ShapeDtypeStruct(part, jnp.float32),
                 jax.ShapeDtypeStruct(part, jnp.float32), jax.ShapeDtypeStruct(k_buf.shape, k_buf.dtype),
                 jax.ShapeDtypeStruct(v_buf.shape, v_buf.dtype)],
      input_output_aliases={n_in - 2: 3, n_in - 1: 4},
      compiler_params=triton_params(num_warps, num_stages, interpret),
      interpret=interpret,
      name="one_token_attention",
  )(lengths.astype(jnp.int32), cos, sin, qkv.reshape(B, -1, D), *extra, k_buf, v_buf)
  out = merge(o, m, l, 1, heads, dtype, name="one_token_attention_merge", interpret=interpret)
  return out.reshape(B, heads * D), k_buf, v_buf


def attend(
    qkv: jax.Array,  # [batch, (heads + 2 kv_heads) * head_dim]: q, k, v projections before proj's steps
    proj: Projection,
    dtype,  # the compute dtype: every intermediate is rounded to it where the unfused step rounds
    cos: jax.Array,  # [batch, head_dim / 2] fp32: RoPE of the new token's position (`model.rope_cos_sin`)
    sin: jax.Array,  # [batch, head_dim / 2] fp32
    k_buf: jax.Array,  # [batch, max_len, kv_heads, head_dim]: committed slots < lengths
    v_buf: jax.Array,  # [batch, max_len, kv_heads, head_dim]
    lengths: jax.Array,  # [batch] int32: the new token goes to slot lengths[b]
    *,
    heads: int,
    eps: float,
    splits: int = 0,  # key splits (1 .. max_len / block_k); 0: `default_splits`
    block_k: int = 0,  # keys per inner iteration; 0: `key_block(max_len)`
    num_warps: int = 4,
    num_stages: int = 2,  # Triton's software pipelining depth of the key loop
    interpret: bool | None = None,  # None: compiled on a GPU, interpreted elsewhere
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """-> (attention output [batch, heads * head_dim] in `dtype`, k_buf, v_buf with the new token's
  key/value at slot lengths[b]). The caller guarantees lengths < max_len (`loop.check_request`)."""
  B, S, Hkv, D = k_buf.shape
  if not support.one_token(D, heads // Hkv, S):
    raise ValueError(f"one-token attention needs a power-of-two head_dim (got {D}), at most {_ROWS} query "
                     f"heads per KV head (got {heads // Hkv}) and max_len % 16 == 0 (got {S}); use the "
                     "split-KV step attention")
  block_k = block_k or key_block(S)
  splits = splits or default_splits(B, Hkv, S, block_k)
  if not 1 <= splits <= S // block_k:  # any count: the merge pads the splits to a power of two and masks them
    raise ValueError(f"splits={splits} must be between 1 and max_len / block_k = {S // block_k}")
  interpret = interpret_mode(interpret)
  return _attention(qkv, proj, cos, sin, k_buf, v_buf, lengths, heads=heads, kv_heads=Hkv, eps=eps, dtype=dtype,
                    splits=splits, block_k=block_k, num_warps=num_warps, num_stages=num_stages, interpret=interpret)


def reference(qkv: jax.Array, proj: Projection, dtype, cos: jax.Array, sin: jax.Array, k_buf: jax.Array,
              v_buf: jax.Array, lengths: jax.Array, *, heads: int, eps: float
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`attend` in XLA ops, the unfused step's way (the folded norm's scale, bias, qk-norm, RoPE, the
  cache write, `split_kv_attention.reference`), each intermediate stored in `dtype`: what the kernels
  must compute. Same arguments and results as `attend`."""
  B, S, Hkv, D = k_buf.shape
  y = qkv.astype(jnp.float32)
  if proj.x is not None:
    y = y * inverse_rms(proj.x.astype(jnp.float32), eps)
  y = y.astype(dtype)
  if proj.bias is not None:
    y = y + proj.bias[None, :]
  q, k, v = jnp.split(y.reshape(B, 1, -1, D), [heads, heads + Hkv], axis=2)  # [batch, 1, heads, head_dim], ...
  if proj.q_norm is not None:
    q, k = rms_norm(q, proj.q_norm, eps, dtype), rms_norm(k, proj.k_norm, eps, dtype)
  q, k = apply_rope(q, cos[:, None], sin[:, None]), apply_rope(k, cos[:, None], sin[:, None])
  k_buf, v_buf = write_rows(k_buf, k, lengths), write_rows(v_buf, v, lengths)
  mask = split_kv_attention.visible_slots(lengths, causal_step(1), S)
  return split_kv_attention.reference(q, k_buf, v_buf, mask).reshape(B, heads * D), k_buf, v_buf
