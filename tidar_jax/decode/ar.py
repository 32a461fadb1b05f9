"""Autoregressive decoding: prefill, then one token per forward in a `lax.while_loop`, all under one
`jax.jit` with fixed shapes (docs/method.md §2: "AR decoding is the same loop with k = 1 and no draft
blocks"). It is the reference TiDAR must match exactly (greedy) or in distribution (sampling).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from tidar_jax import masks
from tidar_jax.config import ModelConfig
from tidar_jax.decode import cache as cache_lib
from tidar_jax.decode import engine, loop
from tidar_jax.decode.weights import DecodeWeights, prepare_weights
from tidar_jax.decode.prefill import prefill
from tidar_jax.decode.sampling import SamplingParams, sample_logits

class _State(NamedTuple):
  cache: cache_lib.KVCache  # lengths = p per row (committed tokens)
  t0: jax.Array  # [batch] newest emitted token, at position p, not yet in the cache
  out: jax.Array  # [batch, max_new_tokens + 1]
  generated: jax.Array  # [batch]
  done: jax.Array  # [batch] bool
  forward_passes: jax.Array  # [batch]
  step: jax.Array  # [] int32: loop iterations so far


def _draw(keys: jax.Array, logits: jax.Array, sampling: SamplingParams) -> jax.Array:
  """One token per row: keys [batch], logits [batch, vocab] -> [batch], each row with its own key."""
  return jax.vmap(functools.partial(sample_logits, params=sampling))(keys, logits)


def _step(w: DecodeWeights, cfg: ModelConfig, keys: jax.Array, eos_id: jax.Array, s: _State, *,
          max_new_tokens: int, sampling: SamplingParams) -> _State:
  p = s.cache.lengths  # [batch]
  # t0 sees itself and the committed cache; its K/V land at slot p
  hidden, written = engine.forward(w, cfg, s.cache, s.t0[:, None], p[:, None], masks.causal_step(1))
  nxt = _draw(loop.keys_at(keys, s.step + 1)[:, 0], engine.logits(w, hidden[:, 0]), sampling)  # [batch]
  active = ~s.done
  out, emitted, hit_eos = loop.emit(s.out, s.generated, nxt[:, None], active.astype(jnp.int32), eos_id,
                                    max_new_tokens)
  generated = s.generated + emitted
  cache = cache_lib.with_lengths(written, p + emitted)  # a finished row does not commit slot p
  new = _State(cache, nxt, out, generated, s.done | hit_eos | (generated >= max_new_tokens),
               s.forward_passes + active, s.step + 1)
  return new._replace(t0=jnp.where(active, nxt, s.t0))


def _generate_ar(params, prompts, lengths, keys, eos_id, *, cfg: ModelConfig, max_new_tokens: int,
                 max_len: int, sampling: SamplingParams) -> loop.DecodeOutput:
  B = prompts.shape[0]
  keys = loop.key_table(keys, max_new_tokens, 1)  # [batch, steps, 1]; step 0 = prefill
  w = prepare_weights(params, cfg)  # once, outside the loop
  cache, last_h, _ = prefill(params, cfg, prompts, lengths, max_len=max_len, block_size=0, mask_id=0)
  t0 = _draw(keys[:, 0, 0], engine.logits(w, last_h), sampling)
  out = jnp.full((B, max_new_tokens + 1), loop.PAD_TOKEN, jnp.int32)
  out, generated, hit_eos = loop.emit(out, jnp.zeros((B,), jnp.int32), t0[:, None], jnp.ones((B,), jnp.int32),
                                      eos_id, max_new_tokens)
  state = _State(cache, t0, out, generated, hit_eos | (generated >= max_new_tokens),
                 jnp.ones((B,), jnp.int32), jnp.int32(0))
  step = functools.partial(_step, w, cfg, keys, eos_id, max_new_tokens=max_new_tokens, sampling=sampling)
  # Every active step emits one token, so max_new_tokens - 1 steps finish every row.
  state = jax.lax.while_loop(lambda s: ~jnp.all(s.done) & (s.step < max_new_tokens - 1), step, state)
  stats = loop.DecodeStats(state.forward_passes, (state.forward_passes - 1)[:, None])
  return loop.DecodeOutput(state.out[:, :max_new_tokens], state.generated, stats, state.cache)


_generate_ar = loop.decode_jit(_generate_ar, static_argnames=("cfg", "max_new_tokens", "max_len", "sampling"))


def generate_ar(params: Any, config: Any, prompts: Any, prompt_lengths: Any, *, max_new_tokens: int,
                sampling: SamplingParams, key: Any, eos_id: int | Sequence[int] | None, max_len: int | None = None
                ) -> loop.DecodeOutput:
  """Decodes right-padded prompts [batch, N] (row b has prompt_lengths[b] tokens) token by token.

  config: a ModelConfig or the checkpoint's ConfigDict. key: one PRNG key, or [batch] keys (row i
  then equals the batch-of-1 run with key i). eos_id: the id, or ids, that end a row (None: none).
  max_len: cache slots (default: prompt bucket + max_new_tokens + 1; allocated as
  `dispatch.cache_slots`: on a GPU rounded up to a multiple of 128).
  One compilation per (batch, prompt bucket, max_new_tokens, max_len, sampling). Returns tokens
  [batch, max_new_tokens], lengths, stats and the final cache.
  """
  cfg, _ = loop.resolve_config(config)
  req = loop.check_request(cfg, prompts, prompt_lengths, max_new_tokens=max_new_tokens, sampling=sampling,
                           key=key, max_len=max_len, lookahead=loop.step_tokens(0),
                           token_ids={"eos_id": eos_id})
  with loop.matmul_precision(cfg):
    return _generate_ar(params, req.prompts, req.lengths, req.keys, loop.eos_array(eos_id), cfg=cfg,
                        max_new_tokens=int(max_new_tokens), max_len=req.max_len, sampling=sampling)
