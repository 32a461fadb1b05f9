"""Fixed-shape KV cache: allocated once, written at per-row offsets, never grown.

Layout (layer-stacked to match the scanned model): k, v [layers, batch, max_len, kv_heads, head_dim];
lengths [batch] int32. Slots < lengths[row] hold exact keys/values of committed tokens at the
position equal to the slot; anything at or past the length is ignored by attention and is
overwritten by later writes, so rolling back rejected drafts is just not advancing `lengths`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from tidar_jax.config import ModelConfig
from tidar_jax.model import LayerKV


class KVCache(NamedTuple):
  k: jax.Array  # [layers, batch, max_len, kv_heads, head_dim]
  v: jax.Array  # [layers, batch, max_len, kv_heads, head_dim]
  lengths: jax.Array  # [batch] int32: number of valid (committed) slots per row

  @property
  def max_len(self) -> int:
    return self.k.shape[2]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  dtype = dtype or cfg.compute_dtype
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))


def write(cache: KVCache, new_kv: LayerKV, count: int) -> KVCache:
  """Writes the first `count` (static) new tokens of every row at slots lengths[row] ... + count - 1.

  `lengths` is unchanged: the caller sets it to the committed length (`with_lengths`), which may
  be shorter than what was written (a TiDAR step writes k verification tokens, keeps a + 1).
  The caller guarantees lengths + count <= max_len (checked on the host before decoding), since
  `dynamic_update_slice` would otherwise clamp the offset and silently overwrite valid slots.
  """

  def write_row(dst, src, offset):  # dst [layers, max_len, h, d], src [layers, count, h, d]
    return jax.lax.dynamic_update_slice(dst, src.astype(dst.dtype), (0, offset, 0, 0))

  write_all = jax.vmap(write_row, in_axes=(1, 1, 0), out_axes=1)
  k = write_all(cache.k, new_kv.k[:, :, :count], cache.lengths)
  v = write_all(cache.v, new_kv.v[:, :, :count], cache.lengths)
  return KVCache(k, v, cache.lengths)


def with_lengths(cache: KVCache, lengths: jax.Array) -> KVCache:
  return cache._replace(lengths=lengths.astype(jnp.int32))


def valid_slots(cache: KVCache) -> jax.Array:
  """[batch, max_len] bool: slot < length per row (what attention may read)."""
  return jnp.arange(cache.max_len)[None, :] < cache.lengths[:, None]
