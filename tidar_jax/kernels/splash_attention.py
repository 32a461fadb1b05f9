"""TiDAR training attention on TPU: jax's Pallas splash attention with the static training mask.

The training mask (`masks.training_mask(L, k)`: causal clean half, each mask block over its clean
prefix and itself) is a static numpy array, which is what splash attention wants: it is cut into
(q, kv) blocks once, when the kernel is built, and blocks with no allowed entry are skipped in the
forward and both backward kernels (at L = 4096, k = 16 and 512-blocks 68.8% of the (q, kv)
blocks; `block_sparsity`). Kernels are built once per (padded length, L, k, group size, blocks).

Grouped-query attention runs as splash's MQA kernel per KV head: the G = heads / kv_heads query
heads of one KV head are the kernel's heads. Splash does not scale the queries: we do. On a
machine without a TPU the kernel runs in Pallas interpret mode (tests); `reference` is the dense
masked softmax it must equal.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from tidar_jax import masks

LANES = 128  # TPU tiles are multiples of 128 along the sequence


def block_length(padded_len: int) -> int:
  """The (q, kv) block edge: 512 where it divides the padded length, else 256, else 128."""
  return next(b for b in (512, 256, 128) if padded_len % b == 0)


def padded_mask(seq_len: int, block_size: int) -> np.ndarray:
  """[P, P] bool: the training mask of the 2L = seq_len tokens, padded to a multiple of 128; a
  padding query sees only itself (no empty softmax row) and no real query sees padding."""
  P = -(-seq_len // LANES) * LANES
  out = np.eye(P, dtype=bool)
  out[:seq_len, :seq_len] = masks.training_mask(seq_len // 2, block_size)
  return out


def block_sparsity(seq_len: int, block_size: int) -> dict[str, float]:
  """Share of (q, kv) blocks splash skips for the training mask of 2L = seq_len tokens, and the share
  of the dense attention's score entries it still computes (every visited block is computed whole)."""
  mask = padded_mask(seq_len, block_size)
  b = block_length(mask.shape[0])
  n = mask.shape[0] // b
  visited = mask.reshape(n, b, n, b).any(axis=(1, 3))  # [q blocks, kv blocks]
  return {"block": b, "blocks_skipped": 1.0 - float(visited.mean()), "computed_fraction": float(visited.mean())}


@functools.lru_cache(maxsize=None)
def _kernel(seq_len: int, block_size: int, group: int, interpret: bool):
  mask = padded_mask(seq_len, block_size)
  b = block_length(mask.shape[0])
  sizes = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                            block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  heads = splash_mask.MultiHeadMask([splash_mask.NumpyMask(mask)] * group)
  return splash.make_splash_mqa_single_device(heads, block_sizes=sizes, interpret=interpret)


def tidar_splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, block_size: int,
                           interpret: bool | None = None) -> jax.Array:
  """Attention under `masks.training_mask(L, block_size)`.

  q: [batch, 2L, heads, head_dim]; k, v: [batch, 2L, kv_heads, head_dim]
  returns: [batch, 2L, heads, head_dim]
  interpret: run the kernel in Pallas interpret mode (default: unless on a TPU).
  """
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  B, T, H, D = q.shape
  Hkv = k.shape[2]
  G = H // Hkv
  P = -(-T // LANES) * LANES
  kernel = _kernel(T, block_size, G, interpret)
  pad = [(0, 0), (0, P - T), (0, 0), (0, 0)]
  # [batch, kv_heads, group, P, head_dim]
  q_heads = jnp.pad(q * jnp.asarray(D**-0.5, q.dtype), pad).reshape(B, P, Hkv, G, D).transpose(0, 2, 3, 1, 4)
  k_heads = jnp.pad(k, pad).transpose(0, 2, 1, 3)  # [batch, kv_heads, P, head_dim]
  v_heads = jnp.pad(v, pad).transpose(0, 2, 1, 3)
  out = jax.vmap(jax.vmap(kernel))(q_heads, k_heads, v_heads)  # [batch, kv_heads, group, P, head_dim]
  return out.transpose(0, 3, 1, 2, 4).reshape(B, P, H, D)[:, :T]


def reference(q: jax.Array, k: jax.Array, v: jax.Array, block_size: int) -> jax.Array:
  """The dense masked softmax attention the kernel must equal (same shapes as the kernel)."""
  B, T, H, D = q.shape
  G = H // k.shape[2]
  kr, vr = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, kr, preferred_element_type=jnp.float32) * D**-0.5
  s = jnp.where(jnp.asarray(masks.training_mask(T // 2, block_size)), s, -1e30)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1).astype(v.dtype), vr)
