"""Static boolean attention masks (True = query row may attend to key column), built once with numpy.

Conventions are fixed by docs/method.md: §1 for the doubled training sequence, §2 for the
decode step. Every mask here is a constant under jit; callers slice it with static indices.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

# The score of a masked (query, key) pair: large, negative and finite, so a query row that sees
# nothing (padding, or a kernel's key split holding none of its keys) softmaxes to a uniform row or
# a zero partial instead of NaNs that would poison gradients through `where`.
MASKED = -1e30


@functools.cache
def causal_mask(length: int) -> np.ndarray:
  """[length, length]: position i sees j <= i (the AR-only case)."""
  return np.tril(np.ones((length, length), dtype=bool))


@functools.cache
def training_mask(seq_len: int, block_size: int) -> np.ndarray:
  """[2L, 2L] mask over `[x_0..x_{L-1}, M..M]` (docs/method.md §1).

  clean i -> clean j: j <= i; clean never sees mask. Mask at position i in block b = i // k:
  sees clean j < b*k and the mask tokens of its own block (bidirectional), nothing else.
  """
  if seq_len % block_size:
    raise ValueError(f"seq_len={seq_len} is not a multiple of block_size={block_size}")
  L, k = seq_len, block_size
  block = np.arange(L) // k  # [L] block index of each mask-half position
  mask = np.zeros((2 * L, 2 * L), dtype=bool)
  mask[:L, :L] = causal_mask(L)
  mask[L:, :L] = np.arange(L)[None, :] < (block * k)[:, None]  # prefix strictly before the block
  mask[L:, L:] = block[:, None] == block[None, :]
  mask.setflags(write=False)
  return mask


@functools.cache
def training_blocks(seq_len: int, block_size: int, own_tile: int) -> tuple[np.ndarray, np.ndarray]:
  """The block structure of `training_mask(L, k)`, sliced from it (one source of truth).

  Returns (prefix [L, L]: which clean keys each mask token sees; own [t, t]: which mask keys a mask
  token sees within its tile of `own_tile` mask tokens, a multiple of k dividing L, so the tile holds
  whole blocks). Asserts what a structured attention relies on: clean rows are exactly causal and
  never see the mask half, a mask row sees no mask key outside its own tile, and the prefix lies
  strictly inside the causal triangle (a causal-mode kernel skips the rest).
  """
  L, k, t = seq_len, block_size, own_tile
  if t % k or L % t:
    raise ValueError(f"own_tile={t} must be a multiple of block_size={k} and divide seq_len={L}")
  mask = training_mask(L, k)
  nt = L // t
  assert np.array_equal(mask[:L, :L], causal_mask(L)) and not mask[:L, L:].any()
  mask_half = mask[L:, L:].reshape(nt, t, nt, t)
  own = mask_half[0, :, 0, :]
  assert np.array_equal(mask_half, np.einsum("bc,qs->bqcs", np.eye(nt, dtype=bool), own))
  prefix = mask[L:, :L]
  assert not np.triu(prefix).any(), "the prefix must lie strictly inside the causal triangle"
  return prefix, own


class StepIntervals(NamedTuple):
  """Which new tokens each new token of a decode step sees, as half-open intervals of step-token
  indices: token t sees u < prefix[t] and lo[t] <= u < hi[t] (besides its row's committed cache
  slots, which the decoder adds). Every decode step has this form (AR: one token that sees itself;
  TiDAR: a causal verification prefix, and draft blocks that see a verification prefix plus their
  own block), so the kernels read three [T] vectors instead of a dense [T, T] mask per layer."""

  prefix: np.ndarray  # [T] int32
  lo: np.ndarray  # [T] int32
  hi: np.ndarray  # [T] int32

  @property
  def tokens(self) -> int:
    return len(self.prefix)

  def dense(self) -> np.ndarray:
    """[T, T] bool: the same visibility as a mask (read-only)."""
    u = np.arange(self.tokens)[None, :]
    mask = (u < self.prefix[:, None]) | ((u >= self.lo[:, None]) & (u < self.hi[:, None]))
    mask.setflags(write=False)
    return mask

  def key(self) -> tuple[tuple[int, ...], ...]:
    """A hashable copy, for jit's static arguments."""
    return tuple(tuple(int(x) for x in a) for a in self)


def _frozen_intervals(prefix, lo, hi) -> StepIntervals:
  arrays = tuple(np.asarray(a, np.int32) for a in (prefix, lo, hi))
  for a in arrays:
    a.setflags(write=False)
  return StepIntervals(*arrays)


@functools.cache
def causal_step(tokens: int) -> StepIntervals:
  """T new tokens, each seeing the ones before it and itself: an AR step (T = 1) or a causal chunk."""
  return _frozen_intervals(np.arange(1, tokens + 1), np.zeros(tokens), np.zeros(tokens))


@functools.cache
def decode_step_intervals(block_size: int, kept: tuple[int, ...] | None = None) -> StepIntervals:
  """The TiDAR step (docs/method.md §2): T = k + |kept|·k new tokens.

  Index layout: 0..k-1 verification `[t_0, d_1..d_{k-1}]` (causal); then one draft block per kept
  acceptance count (None: every count 0..k-1, the paper's step), the j-th block (count a = kept[j])
  at indices k + j*k .. k + j*k + k - 1, seeing verification 0..a and its own block only.
  """
  k = block_size
  kept = tuple(range(k)) if kept is None else kept
  a = np.repeat(np.asarray(kept, np.int32), k)  # [|kept| k] the count of each draft token's block
  start = k + np.repeat(np.arange(len(kept)), k) * k  # its block's first index
  return _frozen_intervals(np.concatenate([np.arange(1, k + 1), a + 1]),
                           np.concatenate([np.zeros(k), start]), np.concatenate([np.zeros(k), start + k]))


@functools.cache
def decode_step_mask(block_size: int, kept: tuple[int, ...] | None = None) -> np.ndarray:
  """[T, T] bool: `decode_step_intervals` as a dense mask (the reference attention's and the tests'
  view of the step)."""
  return decode_step_intervals(block_size, kept).dense()


@functools.cache
def prefill_mask(prompt_len: int, block_size: int) -> np.ndarray:
  """[n + k, n + k]: the prompt causally, then one draft block seeing the whole prompt and itself.

  For a batch of right-padded prompts the caller ANDs per-row key validity (key < n_row, or key in
  the block), so the block of a shorter row sees exactly its own prompt.
  """
  n, k = prompt_len, block_size
  mask = np.zeros((n + k, n + k), dtype=bool)
  mask[:n, :n] = causal_mask(n)
  mask[n:, :] = True
  mask.setflags(write=False)
  return mask


def decode_step_offsets(block_size: int, kept: tuple[int, ...] | None = None) -> np.ndarray:
  """[T] position of each step token relative to p (t_0's position): 0..k-1, then the block of
  count a at a+1..a+k (kept: as in `decode_step_intervals`)."""
  k = block_size
  kept = tuple(range(k)) if kept is None else kept
  blocks = (np.asarray(kept)[:, None] + 1 + np.arange(k)[None, :]).reshape(-1)  # [|kept| k]
  return np.concatenate([np.arange(k), blocks]).astype(np.int32)
