"""Masks against an independent element-wise reading of docs/method.md §1-2."""

import numpy as np
import pytest

from tidar_jax import masks


def expected_training(i: int, j: int, L: int, k: int) -> bool:
  """Rule text of docs/method.md §1, one pair at a time (deliberately not vectorised like the builder)."""
  q_clean, k_clean = i < L, j < L
  if q_clean:
    return k_clean and j <= i
  pos_i = i - L
  b = pos_i // k
  if k_clean:
    return j < b * k
  pos_j = j - L
  return b * k <= pos_j < (b + 1) * k


@pytest.mark.parametrize("L,k", [(8, 1), (8, 2), (8, 4), (12, 3), (16, 8), (16, 16)])
def test_training_mask_every_entry(L, k):
  m = masks.training_mask(L, k)
  assert m.shape == (2 * L, 2 * L) and m.dtype == bool
  for i in range(2 * L):
    for j in range(2 * L):
      assert m[i, j] == expected_training(i, j, L, k), (i, j)


def test_training_mask_rejects_ragged_blocks():
  with pytest.raises(ValueError, match="multiple of block_size"):
    masks.training_mask(10, 4)


def test_causal_mask():
  m = masks.causal_mask(5)
  assert all(m[i, j] == (j <= i) for i in range(5) for j in range(5))


@pytest.mark.parametrize("k", [1, 2, 3, 4, 8])
def test_decode_mask_block_a_sees_t0_to_da_and_itself(k):
  m = masks.decode_step_mask(k)
  T = k + k * k
  assert m.shape == (T, T)
  for i in range(k):  # verification: causal, never sees mask tokens
    assert set(np.flatnonzero(m[i])) == set(range(i + 1))
  for a in range(k):
    block = set(range(k + a * k, k + (a + 1) * k))
    for row in block:
      assert set(np.flatnonzero(m[row])) == set(range(a + 1)) | block


@pytest.mark.parametrize("k", [2, 4, 8])
def test_decode_offsets(k):
  off = masks.decode_step_offsets(k)
  assert list(off[:k]) == list(range(k))
  for a in range(k):
    assert list(off[k + a * k: k + (a + 1) * k]) == list(range(a + 1, a + k + 1))


def step_columns(p: int, k: int, L: int) -> np.ndarray:
  """[T]: the training column holding each token of a decode step whose t_0 sits at position p: the
  verification tokens are clean tokens (column = position), the blocks' tokens mask tokens (L + position)."""
  positions = p + masks.decode_step_offsets(k)
  return np.where(np.arange(len(positions)) < k, positions, L + positions)


def keys_as_columns(mask_row: np.ndarray, columns: np.ndarray, cached: int) -> set[int]:
  """The training columns one inference query attends to: the committed (clean) tokens 0 .. cached-1
  in the cache, and the new tokens its mask row lets it see."""
  return set(range(cached)) | set(columns[mask_row].tolist())


@pytest.mark.parametrize("k", [2, 4, 8])
def test_inference_block_sees_what_training_block_sees(k):
  """Every query of a decode step (and of a prefill) attends to the same tokens as the training query
  of the same token, keys compared as training columns (which token, clean or mask, of which
  position): a key at the right position of the wrong kind, e.g. block a seeing the verification
  token a+1, at the position of the block's own first mask token, differs."""
  L = 4 * k
  train = masks.training_mask(L, k)
  step = masks.decode_step_mask(k)
  met = set()
  for p in range(L - 2 * k + 1):  # t_0's position; the last block ends at p + 2k - 1 < L
    columns = step_columns(p, k, L)
    for i, row in enumerate(columns):
      a = (i - k) // k  # the block of a mask query; -1 for the verification queries
      if a >= 0 and (p + a + 1) % k:
        continue  # block a starts off the multiples of k: no training block holds its tokens
      met.add(a)
      assert keys_as_columns(step[i], columns, p) == set(np.flatnonzero(train[row]).tolist()), (p, i)
  assert met == set(range(-1, k))  # the verification queries and every block a = 0 .. k-1
  for n in range(k, L, k):  # a prefill of n prompt tokens: its block is training block n / k
    columns = np.concatenate([np.arange(n), L + n + np.arange(k)])
    prefill = masks.prefill_mask(n, k)
    for i, row in enumerate(columns):
      assert keys_as_columns(prefill[i], columns, 0) == set(np.flatnonzero(train[row]).tolist()), (n, i)


def test_prefill_mask():
  n, k = 5, 3
  m = masks.prefill_mask(n, k)
  assert (m[:n, :n] == masks.causal_mask(n)).all() and not m[:n, n:].any()
  assert m[n:].all()
