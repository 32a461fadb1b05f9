"""Prefill shared by the AR and TiDAR decoders (docs/method.md §2, "Prefill").

Right-padded prompts [batch, N] (N = the compiled bucket, row b has n_b real tokens) run causally,
followed (TiDAR) by one block of k mask tokens at positions n_b .. n_b+k-1 that sees exactly its
row's prompt and itself: the static `prefill_mask(N, k)` ANDed with per-row key validity. Only the
prompt's K/V enter the cache (mask tokens are never cached); the cache length becomes n_b.

The prefill runs the model's own uncached forward (one pass over the prompt, where the layer-stacked
weights cost nothing extra); the decode steps run `engine.forward` over the per-layer cache.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from tidar_jax import masks
from tidar_jax.config import ModelConfig
from tidar_jax.decode import cache as cache_lib
from tidar_jax.model import Transformer


def prefill(params: Any, cfg: ModelConfig,
            prompts: jax.Array,  # [batch, N] int32, right-padded
            lengths: jax.Array,  # [batch] int32: n_b real tokens per row
            *,
            max_len: int, block_size: int, mask_id: jax.Array
            ) -> tuple[cache_lib.KVCache, jax.Array, jax.Array]:
  """Returns (cache with lengths n_b, hidden of the last prompt token c_{n_b-1} [batch, d_model],
  hidden of the mask block [batch, block_size, d_model]); block_size 0 (AR) gives an empty block.

  The hidden states are final-normed: the caller runs the LM head (`engine.logits`) only on the
  rows it needs.
  """
  B, N = prompts.shape
  k = block_size
  tokens = jnp.concatenate([prompts, jnp.full((B, k), mask_id, jnp.int32)], axis=1)  # [B, N+k]
  positions = jnp.concatenate([jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32)[None, :], (B, N)),
                               lengths[:, None] + jnp.arange(k, dtype=jnp.int32)[None, :]], axis=1)
  cols = jnp.arange(N + k)[None, :]  # [1, N+k]
  key_valid = (cols < lengths[:, None]) | (cols >= N)  # [B, N+k]: the row's prompt, or the block
  mask = jnp.asarray(masks.prefill_mask(N, k))[None] & key_valid[:, None, :]  # [B, N+k, N+k]
  hidden, kv = Transformer(cfg).apply(params, tokens, positions, mask, None, return_hidden=True)
  cache = cache_lib.write(cache_lib.init_cache(cfg, B, max_len), kv, N)  # padding slots >= n_b are ignored
  cache = cache_lib.with_lengths(cache, lengths)
  last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, d_model]
  return cache, last, hidden[:, N:]

