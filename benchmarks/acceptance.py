"""Acceptance laws forced on the TiDAR decoder for timing (`tidar.StepHooks`): the step still runs
its full forward, LM head and verification; only the count it commits is overridden, so a benchmark
measures a stated acceptance rate instead of what random weights happen to accept."""

from __future__ import annotations

import jax.numpy as jnp

from tidar_jax.decode import tidar


def _accept_all(st, keys, target_logits, q, drafts, n_valid, data):
  """Every step accepts its k - 1 drafts; the next token is the verifier's own draw."""
  accepted, nxt = tidar.verify(st, keys, target_logits, q, drafts, n_valid)
  return jnp.full_like(accepted, st.block_size - 1), nxt


ALWAYS_ACCEPT = tidar.StepHooks(_accept_all, tidar.own_block)
