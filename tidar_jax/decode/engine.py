"""The decode step's transformer: the model's math over a per-layer KV cache, for a decode loop.

With the weights `weights.prepare_weights` lays out once, and the same math as `Transformer`
(tests/test_decode_engine.py):

  * `forward` first writes the step's T new keys/values into each layer's own cache buffer at every
    row's slots lengths[b] .. lengths[b] + T - 1 (in place), then runs ONE attention of the T
    queries over the cache: each sees the row's committed slots plus the step tokens its static
    `masks.StepIntervals` allow. On a GPU that is the split-KV Pallas kernel
    (`kernels/split_kv_attention.py`), which splits the keys across programs; cuDNN and the dense
    einsum read a per-row [T, max_len] mask instead. `lengths` is left to the caller, who commits
    only what it accepted (the rest is overwritten next step);
  * on the split-KV path, everything between a step's q/k/v matmul and its o matmul -- norm scale,
    bias, qk-norm, RoPE, the cache write, attention and the split merge -- runs in Pallas kernels
    (`fused_attention`), fewer launches per layer: two for a one-token step (AR,
    `kernels/one_token_attention.py`), three for a TiDAR step (`kernels/multi_token_attention.py`).

Which kernel runs where is `tidar_jax.dispatch`'s choice.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tidar_jax import dispatch
from tidar_jax.config import ModelConfig
from tidar_jax.decode.cache import KVCache, write_rows
from tidar_jax.decode.weights import DecodeWeights, Int8Matrix, LayerWeights, Matrix
from tidar_jax.kernels import int8_gemv, multi_token_attention, one_token_attention, small_row_gemm, split_kv_attention
from tidar_jax.kernels.qkv_epilogue import Projection
from tidar_jax.masks import StepIntervals
from tidar_jax.model import fp32_logits, inverse_rms, rms_norm, rope, rope_cos_sin, rope_inv_freq


def attend(q: jax.Array, k_buf: jax.Array, v_buf: jax.Array, lengths: jax.Array, step: StepIntervals,
           kernel: str) -> jax.Array:
  """q [batch, T, heads, head_dim] over the cache [batch, max_len, kv_heads, head_dim] (GQA), the step's
  keys already written -> [batch, T, heads, head_dim]. kernel: one of `dispatch.DECODE_KERNELS`."""
  if kernel == "split_kv":
    return split_kv_attention.step_attention(q, k_buf, v_buf, lengths, step)
  mask = split_kv_attention.visible_slots(lengths, step, k_buf.shape[1])  # [batch, T, max_len]
  if kernel == "cudnn":
    return jax.nn.dot_product_attention(q, k_buf, v_buf, mask=mask[:, None], implementation="cudnn")
  return split_kv_attention.reference(q, k_buf, v_buf, mask)


def matmul(x: jax.Array, w: Matrix, transposed: bool = False) -> jax.Array:
  """x [..., d_in] @ W -> [..., d_out] in x's dtype (fp32 accumulation); w is W [d_in, d_out], or
  W^T [d_out, d_in] when `transposed`.

  One row against W^T (the batch-1 AR step) is a multiply + row reduction: XLA's row-reduction
  kernel streams the weight near the copy rate, faster than its one-row GEMV fusion, a padded GEMM
  or a reduction over W [d_in, d_out]. More rows go to a GEMM, which reads either layout. One row
  against an int8 matrix goes to `int8_gemv.gemv` where `dispatch.int8_gemv` says so, and a few rows
  against a matrix of their dtype to `small_row_gemm.gemm` where `dispatch.small_row_gemm` says so.
  """
  rows = int(np.prod(x.shape[:-1]))
  spec = "...k,nk->...n" if transposed else "...k,kn->...n"
  int8 = isinstance(w, Int8Matrix)  # the int8 -> compute-dtype convert and the scale fuse into the kernel
  m = w.q if int8 else w
  if int8 and dispatch.int8_gemv(rows):
    y = int8_gemv.gemv(x.reshape(-1), w.q, w.scale, transposed=transposed)  # [d_out] fp32
    return y.astype(x.dtype).reshape(*x.shape[:-1], -1)
  if not int8 and x.dtype == m.dtype and dispatch.small_row_gemm(rows):
    y = small_row_gemm.gemm(x.reshape(rows, -1), m, transposed=transposed)  # [rows, d_out] fp32
    return y.astype(x.dtype).reshape(*x.shape[:-1], -1)
  if transposed and rows == 1:
    y = jnp.sum(x.reshape(1, -1).astype(jnp.float32) * m.astype(jnp.float32), axis=1)  # [d_out]
  elif int8:
    y = jnp.einsum(spec, x, m.astype(x.dtype), preferred_element_type=jnp.float32)
  else:  # output in x's dtype: an fp32 GEMM output converted afterwards is an extra pass (measured slower)
    y = jnp.einsum(spec, x, m)
  if int8:
    y = y * w.scale.reshape((1,) * (y.ndim - 1) + (-1,))
  return y.astype(x.dtype).reshape(*x.shape[:-1], -1)


def normed_matmul(x: jax.Array, gain: jax.Array, cfg: ModelConfig, w: Matrix, transposed: bool
                   ) -> tuple[jax.Array, jax.Array | None]:
  """rms_norm(x, gain) @ W as (y, inv_rms): at one row y = (x * gain) @ W and inv_rms = 1 / rms(x)
  [..., 1] (fp32) is the caller's to apply -- the same product, but the normalised vector is never
  written out: XLA fuses x * gain into the matmul and the scale into its consumer (two kernels
  fewer per layer). More rows: y is normalised, inv_rms None."""
  if int(np.prod(x.shape[:-1])) != 1:
    with jax.named_scope("norm"):
      h = rms_norm(x, gain, cfg.norm_eps, cfg.compute_dtype)
    return matmul(h, w, transposed), None
  with jax.named_scope("norm"):
    x32 = x.astype(jnp.float32)
    inv_rms = inverse_rms(x32, cfg.norm_eps)  # [..., 1]
    xg = x32 * gain.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
  return matmul(xg if transposed else xg.astype(cfg.compute_dtype), w, transposed), inv_rms


def _normed(y: jax.Array, inv_rms: jax.Array | None, cfg: ModelConfig) -> jax.Array:
  """`normed_matmul`'s product with its norm scale applied, in the compute dtype."""
  if inv_rms is None:
    return y
  return (y.astype(jnp.float32) * inv_rms).astype(cfg.compute_dtype)


def project_qkv(lw: LayerWeights, cfg: ModelConfig, x: jax.Array, positions: jax.Array
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Residual stream [batch, T, d_model] -> q [batch, T, heads, head_dim], k, v [batch, T, kv_heads,
  head_dim], with the attention norm, qk-norm and RoPE applied as in the model."""
  B, T, _ = x.shape
  H, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  # One matmul instead of three: [batch, T, (H + 2 Hkv) D]
  qkv = _normed(*normed_matmul(x, lw.attn_norm, cfg, lw.wqkv_t, transposed=True), cfg)
  if lw.bqkv is not None:
    qkv = qkv + lw.bqkv[None, None, :]
  q, k, v = jnp.split(qkv, [H * D, (H + Hkv) * D], axis=-1)
  q, k, v = q.reshape(B, T, H, D), k.reshape(B, T, Hkv, D), v.reshape(B, T, Hkv, D)
  if lw.q_norm is not None:  # Qwen3: per-head RMSNorm before RoPE
    q = rms_norm(q, lw.q_norm, cfg.norm_eps, cfg.compute_dtype)
    k = rms_norm(k, lw.k_norm, cfg.norm_eps, cfg.compute_dtype)
  inv_freq = rope_inv_freq(cfg)
  return rope(q, positions, inv_freq), rope(k, positions, inv_freq), v


def unfused_attention(lw: LayerWeights, cfg: ModelConfig, x: jax.Array, positions: jax.Array, k_buf: jax.Array,
                      v_buf: jax.Array, lengths: jax.Array, step: StepIntervals, kernel: str
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`project_qkv`, the cache write and the attention of a step in XLA ops around `attend`'s kernel (what the
  fused kernels must equal). x [batch, T, d_model] -> ([batch, T, heads, head_dim], k_buf, v_buf)."""
  with jax.named_scope("attn/qkv"):
    q, k, v = project_qkv(lw, cfg, x, positions)
  with jax.named_scope("cache_write"):  # before attending: the new tokens are read from the cache
    k_buf, v_buf = write_rows(k_buf, k, lengths), write_rows(v_buf, v, lengths)
  with jax.named_scope("attn/core"):
    return attend(q, k_buf, v_buf, lengths, step, kernel), k_buf, v_buf


def fused_attention(lw: LayerWeights, cfg: ModelConfig, x: jax.Array, cos_sin: tuple[jax.Array, jax.Array],
                    k_buf: jax.Array, v_buf: jax.Array, lengths: jax.Array, step: StepIntervals
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`project_qkv`, the cache write and the attention of a step, with everything after the q/k/v matmul in
  Pallas kernels: `one_token_attention`'s two at T = 1, `multi_token_attention`'s three at T > 1.
  x [batch, T, d_model] -> ([batch, T, heads * head_dim], k_buf, v_buf)."""
  T = x.shape[1]
  with jax.named_scope("attn/qkv"):
    qkv, inv_rms = normed_matmul(x, lw.attn_norm, cfg, lw.wqkv_t, transposed=True)  # [batch, T, (H+2Hkv)D]
  with jax.named_scope("attn/core"):
    proj = Projection(None if inv_rms is None else x[:, 0], lw.bqkv, lw.q_norm, lw.k_norm)
    if T == 1:
      out, k_buf, v_buf = one_token_attention.attend(qkv[:, 0], proj, cfg.compute_dtype, *cos_sin, k_buf, v_buf,
                                                     lengths, heads=cfg.num_heads, eps=cfg.norm_eps)
      return out[:, None], k_buf, v_buf
    return multi_token_attention.attend(qkv, proj, cfg.compute_dtype, *cos_sin, k_buf, v_buf, lengths, step,
                                        heads=cfg.num_heads, eps=cfg.norm_eps)


def _layer(lw: LayerWeights, cfg: ModelConfig, x: jax.Array, positions: jax.Array, k_buf: jax.Array,
           v_buf: jax.Array, lengths: jax.Array, step: StepIntervals, kernel: str,
           cos_sin: tuple[jax.Array, jax.Array] | None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One pre-norm block over x [batch, T, d_model]; returns (x, k_buf, v_buf) with the T new
  keys/values written at slots lengths[b] .. + T - 1. cos_sin: the step's RoPE tables, given when it
  takes `fused_attention`."""
  B, T, _ = x.shape
  if cos_sin is not None:
    out, k_buf, v_buf = fused_attention(lw, cfg, x, cos_sin, k_buf, v_buf, lengths, step)
  else:
    out, k_buf, v_buf = unfused_attention(lw, cfg, x, positions, k_buf, v_buf, lengths, step, kernel)
  with jax.named_scope("attn/o"):
    x = x + matmul(out.reshape(B, T, -1), lw.wo_t, transposed=True)
  with jax.named_scope("mlp"):  # gate/up: one matmul instead of two, [batch, T, mlp_dim] each
    gate, up = jnp.split(_normed(*normed_matmul(x, lw.mlp_norm, cfg, lw.wgu, transposed=False), cfg), 2, axis=-1)
    x = x + matmul(jax.nn.silu(gate) * up, lw.wd_t, transposed=True)
  return x, k_buf, v_buf


def forward(w: DecodeWeights, cfg: ModelConfig, cache: KVCache, tokens: jax.Array, positions: jax.Array,
            step: StepIntervals, attention: str | None = None) -> tuple[jax.Array, KVCache]:
  """One decode step over T new tokens per row.

  tokens, positions: [batch, T]. step: static, which new tokens each new token sees (AR:
  `masks.causal_step(1)`; TiDAR: `masks.decode_step_intervals(k)`). Every new token also sees its
  row's committed slots. Returns (final-normed hidden [batch, T, d_model], the cache with every
  layer's T new keys/values written at slots lengths[b] .. lengths[b] + T - 1 and `lengths`
  unchanged). The caller guarantees lengths + T <= max_len (the host check of
  `loop.check_request`). `attention`: one of `dispatch.DECODE_KERNELS`, overriding cfg.attention's
  choice (tests run the split-KV kernel interpreted on CPU this way).
  """
  B, T = tokens.shape
  if step.tokens != T:
    raise ValueError(f"the step's intervals describe {step.tokens} tokens, tokens has {T}")
  kernel = attention or dispatch.decode_attention(cfg.attention, cfg.compute_dtype, T, cache.max_len, B)
  if kernel not in dispatch.DECODE_KERNELS:
    raise ValueError(f"attention={kernel!r}: use one of {list(dispatch.DECODE_KERNELS)}")
  cos_sin = None  # the fused attention block's RoPE tables, shared by every layer
  if kernel == "split_kv" and dispatch.fused_attention(cfg, T, cache.max_len):
    # [batch, head_dim / 2] each at one token, [batch, T, head_dim / 2] at more
    cos_sin = rope_cos_sin(positions[:, 0] if T == 1 else positions, rope_inv_freq(cfg))
  x = jnp.take(w.embed, tokens, axis=0)  # [batch, T, d_model]
  new_k, new_v = [], []
  for lw, k_buf, v_buf in zip(w.layers, cache.k, cache.v):  # unrolled: each layer reads its own arrays
    x, k_buf, v_buf = _layer(lw, cfg, x, positions, k_buf, v_buf, cache.lengths, step, kernel, cos_sin)
    new_k.append(k_buf)
    new_v.append(v_buf)
  with jax.named_scope("final_norm"):
    h = rms_norm(x, w.final_norm, cfg.norm_eps, cfg.compute_dtype)
  return h, KVCache(tuple(new_k), tuple(new_v), cache.lengths)


def logits(w: DecodeWeights, hidden: jax.Array) -> jax.Array:
  """LM head: [..., d_model] final-normed hidden -> [..., vocab] fp32 logits (run it only on the
  rows you need)."""
  with jax.named_scope("logits"):
    if w.lm_head is None:
      return fp32_logits(hidden, w.embed, True)
    return fp32_logits(hidden, w.lm_head, False)
