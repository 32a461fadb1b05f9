"""Grouped-query attention over new tokens and (optionally) a KV cache.

Scores against the cache and against the new tokens are computed separately and joined before
one fp32 softmax, so a decode step never copies the cache to append its new keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# A large finite negative instead of -inf: a fully masked query row (padding) gives a uniform
# softmax instead of NaNs that would poison gradients through `where`.
_MASKED = -1e30


def dot_product_attention(
    q: jax.Array,  # [batch, q_len, heads, head_dim]
    k: jax.Array,  # [batch, q_len, kv_heads, head_dim] keys of the new tokens
    v: jax.Array,  # [batch, q_len, kv_heads, head_dim]
    mask: jax.Array,  # [batch or 1, q_len, q_len] bool, True = may attend (new -> new)
    cache_k: jax.Array | None = None,  # [batch, max_len, kv_heads, head_dim]
    cache_v: jax.Array | None = None,  # [batch, max_len, kv_heads, head_dim]
    cache_lengths: jax.Array | None = None,  # [batch] int32: slots < length are valid
    implementation: str = "dense",
) -> jax.Array:  # [batch, q_len, heads, head_dim]
  if implementation == "auto":
    on_gpu = jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
    implementation = "cudnn" if on_gpu else "dense"
  if implementation == "cudnn" and cache_k is None:
    return _cudnn_attention(q, k, v, mask)
  return _dense_attention(q, k, v, mask, cache_k, cache_v, cache_lengths)


def _dense_attention(q, k, v, mask, cache_k, cache_v, cache_lengths):
  if cache_k is None:  # XLA's own GQA attention: the same math, laid out better for CPU/GPU dots
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="xla")
  B, Q, H, D = q.shape
  Hkv = k.shape[2]
  q_BQKGD = q.reshape(B, Q, Hkv, H // Hkv, D)
  scale = D**-0.5
  s_BKGQS = jnp.einsum("bqkgd,bskd->bkgqs", q_BQKGD, k, preferred_element_type=jnp.float32) * scale
  s_BKGQS = jnp.where(mask[:, None, None, :, :], s_BKGQS, _MASKED)
  S = cache_k.shape[1]
  c_BKGQC = jnp.einsum("bqkgd,bckd->bkgqc", q_BQKGD, cache_k, preferred_element_type=jnp.float32) * scale
  valid_BC = jnp.arange(S)[None, :] < cache_lengths[:, None]  # [batch, max_len]
  c_BKGQC = jnp.where(valid_BC[:, None, None, None, :], c_BKGQC, _MASKED)
  p_all = jax.nn.softmax(jnp.concatenate([c_BKGQC, s_BKGQS], axis=-1), axis=-1)
  p_cache, p_new = p_all[..., :S], p_all[..., S:]
  out = (jnp.einsum("bkgqc,bckd->bqkgd", p_cache.astype(cache_v.dtype), cache_v)
         + jnp.einsum("bkgqs,bskd->bqkgd", p_new.astype(v.dtype), v))
  return out.reshape(B, Q, H, D)


def _cudnn_attention(q, k, v, mask):
  """GPU fast path (training and prefill): cuDNN flash attention with the boolean mask."""
  B, Q = q.shape[:2]
  mask_BNQS = jnp.broadcast_to(mask[:, None], (B, 1, Q, Q))
  return jax.nn.dot_product_attention(q, k, v, mask=mask_BNQS, implementation="cudnn")
