"""Acceptance laws forced on the TiDAR decoder for timing (`tidar.StepHooks`): the step still runs
its full forward, LM head and verification; only the count it commits is overridden, so a benchmark
measures a stated acceptance rate instead of what random weights happen to accept.

`ALWAYS_ACCEPT`: every step accepts all k - 1 drafts. `law_hooks(probs)`: each row's count is drawn
per step from a histogram over a = 0 .. k-1 (capped at the row's valid drafts, as a pruned step
caps it), so full and pruned pre-drafting are timed under the same law."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from tidar_jax.decode import tidar

# Acceptance laws at k = 8 (P(a) for a = 0 .. 7 accepted drafts).
LAWS = {
    # results/small, tidar8 greedy: the share of steps that committed 1 .. 8 tokens
    "small": (0.53, 0.36, 0.07, 0.02, 0.0, 0.01, 0.01, 0.02),
    # mean 3 accepted drafts
    "mean3": (0.10, 0.20, 0.15, 0.15, 0.15, 0.10, 0.10, 0.05),
}


def _accept_all(st, keys, target_logits, q, drafts, n_valid, data):
  """Every step accepts its k - 1 drafts; the next token is the verifier's own draw."""
  accepted, nxt = tidar.verify(st, keys, target_logits, q, drafts, n_valid)
  return jnp.full_like(accepted, st.block_size - 1), nxt


ALWAYS_ACCEPT = tidar.StepHooks(_accept_all, tidar.own_block)


@dataclasses.dataclass(frozen=True)
class _DrawnCount:
  """A verify hook: the row's count ~ probs (hashable by value: one compilation per law)."""

  probs: tuple[float, ...]

  def __call__(self, st, keys, target_logits, q, drafts, n_valid, data):
    if len(self.probs) != st.block_size:
      raise ValueError(f"an acceptance law over {len(self.probs)} counts cannot drive block_size={st.block_size}")
    _, nxt = tidar.verify(st, keys, target_logits, q, drafts, n_valid)
    logits = jnp.log(jnp.asarray(self.probs, jnp.float32))
    drawn = jax.vmap(lambda key: jax.random.categorical(key, logits))(keys[:, 1]).astype(jnp.int32)  # [batch]
    return jnp.minimum(drawn, n_valid), nxt


def law_hooks(probs) -> tidar.StepHooks:
  """Hooks that draw each row's accepted count per step from `probs` (normalised here)."""
  p = np.asarray(probs, np.float64)
  if p.ndim != 1 or p.min() < 0 or p.sum() <= 0:
    raise ValueError(f"an acceptance law is a histogram over a = 0 .. k-1, got {probs!r}")
  return tidar.StepHooks(_DrawnCount(tuple(float(x) for x in p / p.sum())), tidar.own_block)
