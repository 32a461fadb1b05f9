"""Which draft blocks a TiDAR step pre-drafts (`tidar.predraft`), and how to choose them.

The paper's step drafts one block for every acceptance count a = 0 .. k-1: T = k + k² tokens per
row. Most steps accept only a few drafts, so most blocks are thrown away, and at batch > 1 those
tokens are not free. A pruned step keeps the blocks of a static set S of counts: T = k + |S|·k.
When the realised count a has no block, the next step drafts from the kept block with the largest
count a' < a (its offsets past the new t_0: k-1-(a-a') drafts), or has none; the decoder verifies
only the drafts it has (`tidar.py`), which keeps the output exactly AR's.

`best_counts` picks S for a measured acceptance histogram and batch size from a table of measured
step costs: the S that maximises expected tokens per step ÷ the step's cost relative to AR.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

ALL = "all"
AUTO = "auto"

# Step time ÷ the AR step's at the same batch, by batch and tokens per row T, for the 1.5B model over
# a 2048-slot cache on an H200: T = 16..72 from one predraft_throughput run (k = 8, pruned sets;
# results/bench/predraft_1p5b_h200.json), T = 272 (k = 16) from decode_latency (decode_1p5b_h200.json).
# Between measured T the cost is interpolated linearly, past the largest T extrapolated along the last
# segment (the step is compute-bound there); past the largest batch the largest batch's row is used.
STEP_COST: dict[int, dict[int, float]] = {
    1: {1: 1.0, 16: 1.244, 24: 1.314, 40: 1.385, 72: 1.523, 272: 2.309},
    8: {1: 1.0, 16: 1.356, 24: 1.608, 40: 1.917, 72: 2.916, 272: 8.642},
    32: {1: 1.0, 16: 1.960, 24: 2.792, 40: 3.682, 72: 7.035},
}


def configured(setting: Any, tidar_cfg: Any) -> Any:
  """`setting`, or when it is None the checkpoint's `tidar.predraft` ("all" without one)."""
  if setting is not None:
    return setting
  return ALL if tidar_cfg is None else tidar_cfg.get("predraft", ALL)


def counts(setting: Any, block_size: int) -> tuple[int, ...]:
  """`tidar.predraft` -> the sorted acceptance counts whose blocks a step drafts.

  setting: "all" (every count 0 .. k-1, the paper's step), a sequence of counts, or a string of
  comma-separated counts ("0,1,2,7", as a command line writes it). Raises ValueError naming the
  field and the fix."""
  k = block_size
  if isinstance(setting, str):
    if setting == ALL:
      return tuple(range(k))
    if setting == AUTO:
      raise ValueError("tidar.predraft='auto' is resolved by generate/evaluate from a measured acceptance "
                       "histogram (predraft.best_counts); pass 'all' or a set of counts here")
    try:
      setting = [int(x) for x in setting.replace(" ", "").strip("()[]").split(",") if x]
    except ValueError:
      raise ValueError(f"tidar.predraft={setting!r}: use 'all', 'auto' or comma-separated acceptance counts "
                       f"in 0..{k - 1}, e.g. '0,1,2,{k - 1}'") from None
  values = sorted({int(x) for x in setting})
  if not values or values[0] < 0 or values[-1] > k - 1 or any(int(x) != x for x in setting):
    raise ValueError(f"tidar.predraft={tuple(setting)!r}: needs at least one acceptance count, each in "
                     f"0..{k - 1} (block_size={k}); 'all' keeps every block")
  return tuple(values)


def is_full(kept: Sequence[int], block_size: int) -> bool:
  return tuple(kept) == tuple(range(block_size))


def step_tokens(block_size: int, kept: Sequence[int]) -> int:
  """Tokens a step feeds per row: k verification tokens and k per kept block."""
  return block_size + len(kept) * block_size


def fallback(kept: Sequence[int], block_size: int) -> tuple[np.ndarray, np.ndarray]:
  """For every realised count a = 0 .. k-1: (the kept block the next drafts come from, as an index
  into `kept`, or -1 when no kept count is <= a; the number of valid drafts k-1-(a-a'), 0 for none)."""
  source = np.full(block_size, -1, np.int32)
  n_valid = np.zeros(block_size, np.int32)
  for a in range(block_size):
    below = [j for j, c in enumerate(kept) if c <= a]
    if below:
      source[a] = below[-1]
      n_valid[a] = block_size - 1 - (a - kept[below[-1]])
  return source, n_valid


def expected_tokens(hist: Sequence[float], kept: Sequence[int]) -> float:
  """Expected tokens a step emits under S = kept, from the acceptance histogram measured with every
  block kept (hist[a]: steps that accepted a drafts). A step with n valid drafts is modelled as
  accepting min(a, n), a drawn from the histogram (drafts from an earlier block are taken to be as
  good as the block's own); the counts chain over steps and its stationary law weighs the steps."""
  k = len(hist)
  law = np.asarray(hist, np.float64)
  if law.sum() <= 0:
    raise ValueError("the acceptance histogram is empty: decode some prompts first")
  law = law / law.sum()
  _, n_valid = fallback(kept, k)
  # States: valid drafts n = 0 .. k-1. From n, the count is min(a, n); the next state is n_valid[count].
  move = np.zeros((k, k))
  for n in range(k):
    for a, pa in enumerate(law):
      move[n, n_valid[min(a, n)]] += pa
  # The stationary law: state (move - I) = 0 with the states summing to 1 (least squares, so a
  # periodic chain -- e.g. every step accepting all drafts of a single kept block 0 -- is fine too).
  system = np.vstack([(move - np.eye(k)).T, np.ones((1, k))])
  state = np.linalg.lstsq(system, np.append(np.zeros(k), 1.0), rcond=None)[0]
  emitted = [sum(pa * (min(a, n) + 1) for a, pa in enumerate(law)) for n in range(k)]
  return float(state @ np.asarray(emitted))


def step_cost(tokens: int, batch: int, table: Mapping[int, Mapping[int, float]] = STEP_COST) -> float:
  """A step of `tokens` per row at `batch`, relative to the AR step at the same batch (interpolated)."""
  rows = sorted(table)
  row = table[max([b for b in rows if b <= batch], default=rows[0])]
  ts = sorted(row)
  if tokens > ts[-1]:  # the last segment's slope: np.interp would hold the last value flat
    (t0, c0), (t1, c1) = (ts[-2], row[ts[-2]]), (ts[-1], row[ts[-1]])
    return float(c1 + (tokens - t1) * (c1 - c0) / (t1 - t0))
  return float(np.interp(tokens, ts, [row[t] for t in ts]))


def best_counts(hist: Sequence[float], batch: int, table: Mapping[int, Mapping[int, float]] = STEP_COST
                ) -> tuple[tuple[int, ...], float]:
  """(the S maximising expected tokens per step ÷ relative step cost, that ratio: the predicted
  speed-up over AR at this batch). Every subset up to k = 10, greedy growth past it."""
  k = len(hist)

  def score(kept):
    return expected_tokens(hist, kept) / step_cost(step_tokens(k, kept), batch, table)

  if k <= 10:
    subsets = (s for m in range(1, k + 1) for s in itertools.combinations(range(k), m))
    best = max(subsets, key=score)
    return tuple(best), score(best)
  kept: tuple[int, ...] = (0,)
  while True:  # add the count that helps most, while one helps
    options = [tuple(sorted(kept + (c,))) for c in range(k) if c not in kept]
    better = max(options, key=score, default=None)
    if better is None or score(better) <= score(kept):
      return kept, score(kept)
    kept = better
