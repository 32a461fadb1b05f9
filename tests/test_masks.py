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


@pytest.mark.parametrize("k", [2, 4, 8])
def test_inference_block_sees_what_training_block_sees(k):
  """A decode block of a given absolute start sees the same positions as the training block there."""
  L = 4 * k
  train = masks.training_mask(L, k)
  step = masks.decode_step_mask(k)
  offsets = masks.decode_step_offsets(k)
  for b in range(1, L // k):
    start = b * k
    train_seen = {j for j in range(2 * L) if train[L + start, j]}
    train_positions = {j if j < L else j - L for j in train_seen}
    for a in range(k):
      p = start - a - 1  # t_0's position such that block a starts at `start`
      if p < 0:
        continue
      row = k + a * k
      seen = set(range(p))  # the cache: every committed position < p
      seen |= {p + int(offsets[j]) for j in np.flatnonzero(step[row])}
      assert seen == train_positions, (b, a)


def test_prefill_mask():
  n, k = 5, 3
  m = masks.prefill_mask(n, k)
  assert (m[:n, :n] == masks.causal_mask(n)).all() and not m[:n, n:].any()
  assert m[n:].all()
