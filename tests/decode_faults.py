"""Broken TiDAR steps, chosen per row: the negative controls that the exactness tests must catch,
planted through `tidar.StepHooks` (the production step has none of them)."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from tidar_jax.decode import sampling, tidar

FAULTS = ("", "always_accept", "residual_from_p", "wrong_q", "wrong_block", "fallback_q")  # "": correct


def _verify(st, keys, target_logits, q, drafts, n_valid, data):
  """always_accept: every draft passes, the bonus from p[k-1]; residual_from_p: a rejection draws from
  p instead of max(0, p - q); wrong_q: the drafts are judged with a uniform q; fallback_q: only the
  drafts of a pruned step's fallback block (rows with fewer than k-1 valid drafts) are."""
  uniform = -math.log(q.shape[-1])
  fallback = (data == FAULTS.index("fallback_q")) & (n_valid < st.block_size - 1)
  q = jnp.where(((data == FAULTS.index("wrong_q")) | fallback)[:, None, None], uniform, q)
  accepted, nxt = tidar.verify(st, keys, target_logits, q, drafts, n_valid)
  always = data == FAULTS.index("always_accept")
  accepted = jnp.where(always, st.block_size - 1, accepted)
  from_p = always | (data == FAULTS.index("residual_from_p"))
  logp = target_logits if st.sampling.greedy else sampling.process_logits(target_logits, st.sampling)
  logp_a = jnp.take_along_axis(logp, accepted[:, None, None], axis=1)[:, 0]  # [batch, vocab]
  return accepted, jnp.where(from_p, jax.vmap(sampling.sample)(keys[:, 1], logp_a), nxt)


def _draft_block(accepted, data):
  """wrong_block: drafts from the previous outcome's block (off by one; right at a = 0)."""
  return jnp.where(data == FAULTS.index("wrong_block"), jnp.maximum(accepted - 1, 0), accepted)


HOOKS = tidar.StepHooks(_verify, _draft_block)


def faulty(names) -> dict:
  """`generate_tidar` / `trace_tidar` keyword arguments that break row i as names[i] says."""
  unknown = sorted(set(names) - set(FAULTS))
  if unknown:
    raise ValueError(f"unknown faults {unknown}: use names from {FAULTS}")
  return dict(hooks=HOOKS, hook_data=np.array([FAULTS.index(n) for n in names], np.int32))
