"""Fixed-shape KV cache: allocated once, written at per-row offsets, never grown.

Layout: one (k, v) buffer pair per layer, each [batch, max_len, kv_heads, head_dim], plus lengths
[batch] int32. Separate buffers (not one [layers, ...] array) let the decode loop carry L arrays
that XLA updates in place and the unrolled layers read without slicing a stacked array per step.
Slots < lengths[row] hold exact keys/values of committed tokens at the position equal to the slot;
anything at or past the length is ignored by attention and is overwritten by later writes, so
rolling back rejected drafts (and dropping a TiDAR step's mask-block K/V) is just not advancing
`lengths`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from tidar_jax.config import ModelConfig
from tidar_jax.model import LayerKV


class KVCache(NamedTuple):
  k: tuple[jax.Array, ...]  # per layer: [batch, max_len, kv_heads, head_dim]
  v: tuple[jax.Array, ...]  # per layer: [batch, max_len, kv_heads, head_dim]
  lengths: jax.Array  # [batch] int32: number of valid (committed) slots per row

  @property
  def max_len(self) -> int:
    return self.k[0].shape[1]


class StackedKV(NamedTuple):
  """The cache as `Transformer.apply` takes it (and tests compare it): layer-stacked copies."""

  k: jax.Array  # [layers, batch, max_len, kv_heads, head_dim]
  v: jax.Array  # [layers, batch, max_len, kv_heads, head_dim]
  lengths: jax.Array  # [batch] int32


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
  shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  dtype = dtype or cfg.compute_dtype

  def per_layer() -> tuple[jax.Array, ...]:
    return tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))

  return KVCache(per_layer(), per_layer(), jnp.zeros((batch,), jnp.int32))


def write_rows(buffer: jax.Array, new: jax.Array, offsets: jax.Array) -> jax.Array:
  """buffer [batch, max_len, h, d] with new [batch, n, h, d] written at slots offsets[row] .. + n - 1.

  The caller guarantees offsets + n <= max_len (checked on the host before decoding), since
  `dynamic_update_slice` would otherwise clamp the offset and silently overwrite valid slots.
  """

  if buffer.shape[0] == 1:  # one row: an in-place slice update (vmapped, it becomes a scatter)
    return jax.lax.dynamic_update_slice(buffer, new.astype(buffer.dtype), (0, offsets[0], 0, 0))

  def write_row(dst, src, offset):  # dst [max_len, h, d], src [n, h, d]
    return jax.lax.dynamic_update_slice(dst, src.astype(dst.dtype), (offset, 0, 0))

  return jax.vmap(write_row)(buffer, new, offsets)


def write(cache: KVCache, new_kv: LayerKV, count: int) -> KVCache:
  """Writes the first `count` (static) tokens of layer-stacked K/V (as `Transformer.apply` returns
  them) at every row's slots lengths[row] .. + count - 1.

  `lengths` is unchanged: the caller sets it to the committed length (`with_lengths`).
  """
  k = tuple(write_rows(buf, new_kv.k[layer, :, :count], cache.lengths) for layer, buf in enumerate(cache.k))
  v = tuple(write_rows(buf, new_kv.v[layer, :, :count], cache.lengths) for layer, buf in enumerate(cache.v))
  return KVCache(k, v, cache.lengths)


def with_lengths(cache: KVCache, lengths: jax.Array) -> KVCache:
  return cache._replace(lengths=lengths.astype(jnp.int32))


def valid_slots(cache: KVCache) -> jax.Array:
  """[batch, max_len] bool: slot < length per row (what attention may read)."""
  return jnp.arange(cache.max_len)[None, :] < cache.lengths[:, None]


def stacked(cache: KVCache) -> StackedKV:
  """Layer-stacked copy of the cache (a copy: for tests and the uncached model, not the decode loop)."""
  return StackedKV(jnp.stack(cache.k), jnp.stack(cache.v), cache.lengths)
