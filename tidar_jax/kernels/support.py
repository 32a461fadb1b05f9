"""Which shapes each GPU decode kernel takes: rules only, no kernel code, so `tidar_jax.dispatch`
reads them without importing the kernels (whose references import the model)."""

from __future__ import annotations

from tidar_jax.kernels.pallas_common import key_block

GROUP_ROWS = 16  # one-token attention: a KV head's query group padded to one 16-row tile (Triton's dot)


def rope_head_dim(head_dim: int) -> bool:
  """Triton needs power-of-two vectors: a head_dim that is one, and so are its halves (RoPE's)."""
  return head_dim >= 4 and head_dim & (head_dim - 1) == 0


def split_kv(max_len: int) -> bool:
  """Key blocks that tile the cache."""
  return key_block(max_len) is not None


def one_token(head_dim: int, group: int, max_len: int) -> bool:
  """A head_dim Triton can split into RoPE halves, key blocks that tile the cache, and a KV head's
  query group (heads / kv_heads) that fits one tile."""
  return rope_head_dim(head_dim) and group <= GROUP_ROWS and split_kv(max_len)


def multi_token(head_dim: int, max_len: int) -> bool:
  """A power-of-two head_dim (its halves are RoPE's) and key blocks that tile the cache."""
  return rope_head_dim(head_dim) and split_kv(max_len)
