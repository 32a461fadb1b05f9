"""Grouped-query attention over new tokens and (optionally) a KV cache.

Scores against the cache and against the new tokens are computed separately and joined before
one fp32 softmax, so a decode step never copies the cache to append its new keys.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from tidar_jax import dispatch, mask_half_attention
from tidar_jax.kernels import splash_attention
from tidar_jax.masks import MASKED

def dot_product_attention(
    q: jax.Array,  # [batch, q_len, heads, head_dim]
    k: jax.Array,  # [batch, q_len, kv_heads, head_dim] keys of the new tokens
    v: jax.Array,  # [batch, q_len, kv_heads, head_dim]
    mask: jax.Array | None,  # [batch or 1, q_len, q_len] bool, True = may attend (new -> new); None: causal
    cache_k: jax.Array | None = None,  # [batch, max_len, kv_heads, head_dim]
    cache_v: jax.Array | None = None,  # [batch, max_len, kv_heads, head_dim]
    cache_lengths: jax.Array | None = None,  # [batch] int32: slots < length are valid
    implementation: str = "dense",
    tidar_block: int = 0,  # > 0: q/k/v are the TiDAR training sequence; `mask` is unused (None)
) -> jax.Array:  # [batch, q_len, heads, head_dim]
  if implementation == "auto":
    implementation = dispatch.training_attention(q.dtype)
  if tidar_block:
    if implementation == "splash":
      return _splash_training_attention(q, k, v, tidar_block)
    return tidar_training_attention(q, k, v, tidar_block, implementation)
  if mask is None:
    if cache_k is not None:
      raise ValueError("mask=None (causal attention among the new tokens) is for a forward without a "
                       "KV cache; with a cache pass the [batch or 1, q_len, q_len] mask")
    return causal_attention(q, k, v, implementation)
  if implementation == "cudnn" and cache_k is None:
    return _cudnn_attention(q, k, v, mask)
  if implementation == FLASH_FOOTPRINT and cache_k is None:
    return flash_footprint(q, k, v)
  return _dense_attention(q, k, v, mask, cache_k, cache_v, cache_lengths)


def _splash_training_attention(q, k, v, block_size: int) -> jax.Array:
  """Splash attention with the static training mask, one kernel per shard (`_per_shard`)."""
  return _per_shard(functools.partial(splash_attention.tidar_splash_attention, block_size=block_size), q, k, v)


def _per_shard(fn: Callable[..., jax.Array], q: jax.Array, *kv: jax.Array) -> jax.Array:
  """fn(q, *kv) -> [batch, q_len, heads, head_dim], called once per (batch, heads) shard under a mesh
  (shard_map) as the logical axes of q [batch, q_len, heads, head_dim] and each kv [batch, k_len,
  kv_heads, head_dim] say: the compiler does not split a Pallas call, it would gather the global
  batch onto every device. Attention never crosses rows or KV groups, so per shard is the same."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn(q, *kv)
  q_spec = nn.logical_to_mesh_axes(("batch", "length", "heads", "head_dim"))
  kv_spec = nn.logical_to_mesh_axes(("batch", "length", "kv_heads", "head_dim"))
  return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec,) + (kv_spec,) * len(kv), out_specs=q_spec,
                       check_vma=False)(q, *kv)


def _dense_attention(q, k, v, mask, cache_k, cache_v, cache_lengths):
  if cache_k is None:  # XLA's own GQA attention: the same math, laid out better for CPU/GPU dots
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="xla")
  B, Q, H, D = q.shape
  Hkv = k.shape[2]
  q = q.reshape(B, Q, Hkv, H // Hkv, D)  # [batch, q_len, kv_heads, group, head_dim]
  scale = D**-0.5
  s = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32) * scale
  s = jnp.where(mask[:, None, None, :, :], s, MASKED)  # [batch, kv_heads, group, q_len, q_len]
  S = cache_k.shape[1]
  c = jnp.einsum("bqkgd,bckd->bkgqc", q, cache_k, preferred_element_type=jnp.float32) * scale
  valid = jnp.arange(S)[None, :] < cache_lengths[:, None]  # [batch, max_len]
  c = jnp.where(valid[:, None, None, None, :], c, MASKED)  # [batch, kv_heads, group, q_len, max_len]
  p_all = jax.nn.softmax(jnp.concatenate([c, s], axis=-1), axis=-1)
  p_cache, p_new = p_all[..., :S], p_all[..., S:]
  out = (jnp.einsum("bkgqc,bckd->bqkgd", p_cache.astype(cache_v.dtype), cache_v)
         + jnp.einsum("bkgqs,bskd->bqkgd", p_new.astype(v.dtype), v))
  return out.reshape(B, Q, H, D)


# Memory estimates only (`dry_run` on a machine without the target's flash kernel).
FLASH_FOOTPRINT = "flash_footprint"


@jax.custom_vjp
def flash_footprint(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Not attention: a stand-in with a flash kernel's memory footprint, for compiling a step whose
  memory is estimated where the kernel does not exist. Output [batch, q_len, heads, head_dim]; the
  backward keeps what flash attention keeps (q, k, v, the output and an fp32 log-sum-exp per query
  row) and no [q_len, k_len] scores. Its values mean nothing."""
  return _footprint_fwd(q, k, v)[0]


def _footprint_fwd(q, k, v):
  B, Q, H, D = q.shape
  kv = jnp.sum(k + v, axis=1, keepdims=True)  # [batch, 1, kv_heads, head_dim]
  out = q + jnp.repeat(kv, H // k.shape[2], axis=2)  # [batch, q_len, heads, head_dim]
  lse = jnp.sum(q.astype(jnp.float32), axis=-1)  # [batch, q_len, heads]
  return out, (q, k, v, out, lse)


def _footprint_bwd(res, g):
  q, k, v, out, lse = res
  B, Q, H, D = q.shape
  Hkv = k.shape[2]
  dq = ((g + out).astype(jnp.float32) * lse[..., None]).astype(q.dtype)
  t = jnp.sum(g, axis=1).reshape(B, 1, Hkv, H // Hkv, D).sum(axis=3)  # [batch, 1, kv_heads, head_dim]
  return dq, k * t, v * t


flash_footprint.defvjp(_footprint_fwd, _footprint_bwd)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str) -> jax.Array:
  """Causal self-attention of q/k/v [batch, q_len, *, head_dim] -> [batch, q_len, heads, head_dim] in
  the kernel's own causal mode: no mask array is read, and cuDNN's flash kernel skips the tiles above
  the diagonal (given the same mask as an array it computes every tile: twice the work)."""
  if implementation == "cudnn":
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
  if implementation == FLASH_FOOTPRINT:
    return flash_footprint(q, k, v)
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")


def _cudnn_attention(q, k, v, mask):
  """GPU fast path (training and prefill): cuDNN flash attention with the boolean mask."""
  B, Q = q.shape[:2]
  mask = jnp.broadcast_to(mask[:, None], (B, 1, Q, Q))  # [batch, 1, q_len, q_len]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")


def tidar_training_attention(q: jax.Array, k: jax.Array, v: jax.Array, block_size: int,
                             implementation: str) -> jax.Array:
  """Attention under `masks.training_mask(L, k)` for q/k/v [batch, 2L, heads, head_dim], computing only
  the blocks the mask allows instead of the dense [2L, 2L] score matrix.

  The clean half attends causally to the clean half (a causal kernel, no mask array). The mask half
  is `mask_half_attention`: its clean prefix through a causal-mode kernel (cuDNN on a GPU), its own
  blocks in einsums (with cuDNN: Pallas kernels, one call per shard), merged by log-sum-exp. Equal
  to the dense masked attention (tests/test_losses.py, tests/test_own_block_attention.py).
  """
  L = q.shape[1] // 2
  clean = causal_attention(q[:, :L], k[:, :L], v[:, :L], implementation)
  if implementation == FLASH_FOOTPRINT:  # what a flash kernel keeps for the mask half's queries
    return jnp.concatenate([clean, flash_footprint(q[:, L:], k[:, :L], v[:, :L])], axis=1)

  def mask_half(*x):
    return mask_half_attention.attention(*x, block_size, implementation)

  halves = (q[:, L:], k[:, :L], v[:, :L], k[:, L:], v[:, L:])  # queries; clean keys, values; mask keys, values
  # with cuDNN its own blocks are Pallas calls, which the compiler does not split across a mesh
  masked = _per_shard(mask_half, *halves) if implementation == "cudnn" else mask_half(*halves)
  return jnp.concatenate([clean, masked], axis=1)
