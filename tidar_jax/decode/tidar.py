"""TiDAR decoding: draft and verify in one forward per step (docs/method.md §2), prefill plus one
`lax.while_loop` under one `jax.jit`, fixed shapes, per-row acceptance.

Each step feeds T = k + k² tokens: `[t_0, d_1 .. d_{k-1}]` at positions p .. p+k-1 (causal, over
the cache) and k mask blocks, block a at positions p+a+1 .. p+a+k seeing the cache, t_0 .. d_a and
itself (the static `masks.decode_step_intervals(k)`). `engine.forward` writes all T tokens' K/V at slots
p .. p+T-1 and attends over the cache; committing a + 1 tokens is setting the row's length to
p+a+1 (the verification K/V were computed causally with the right prefix; the slots past it,
rejected drafts and mask blocks, are overwritten next step). The LM head runs on the k
verification rows (plus slot 0 of every block when verify_beta < 1) and, after acceptance, on the
chosen block's offsets 1 .. k-1 only: never on all T rows (at k = 16 and a 152k vocab that buffer
is ~165 MB per row).

Pruned pre-drafting (`predraft`: a set S of acceptance counts) feeds only the blocks of the counts
in S: T = k + |S|·k. A row then carries n_valid <= k-1 valid drafts. When the realised count a has a
block, the next drafts are its offsets 1 .. k-1 (n_valid = k-1); otherwise they are the offsets
a-a'+1 .. k-1 of the kept block with the largest count a' < a, which sits a-a' positions earlier
(n_valid = k-1-(a-a')), or there are none (n_valid = 0). Verification accepts at most n_valid drafts;
if all of them pass, the next token is a plain sample from the AR distribution at index n_valid
(the bonus), as if the invalid drafts did not exist. This stays exact for the same reason the full
step is: each draft is a proposal drawn from a distribution q that is fixed before its acceptance
draw and known to the verifier (the fallback block's q at that offset), and speculative sampling
with any such proposal emits exactly the AR law; a step with fewer proposals is the same rule with
fewer drafts. Invalid verification slots are written past the committed length and overwritten.

`trace_tidar` (tests only) runs the same prefill and steps and returns the state after each: the
drafts and q that the loop carries from step to step are not part of the output.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tidar_jax import masks
from tidar_jax import predraft as predraft_lib
from tidar_jax.config import ModelConfig
from tidar_jax.decode import cache as cache_lib
from tidar_jax.decode import engine, loop, sampling
from tidar_jax.decode.prefill import prefill
from tidar_jax.decode.sampling import SamplingParams
from tidar_jax.decode.weights import DecodeWeights, prepare_weights

_KEY_USES = 3  # keys per step: verification, one spare for a hook, drafts (the prefill uses the last)


class _State(NamedTuple):
  cache: cache_lib.KVCache  # lengths = p per row: exact K/V of the committed positions 0 .. p-1
  t0: jax.Array  # [batch] newest committed token, at position p, not yet in the cache
  drafts: jax.Array  # [batch, k-1] drafts for positions p+1 .. p+k-1
  n_valid: jax.Array  # [batch] int32: the leading drafts that are proposals (k-1 unless a block was pruned)
  q: jax.Array  # [batch, k-1, vocab] processed log-probs the drafts were drawn from ([.., 1] if greedy)
  out: jax.Array  # [batch, max_new_tokens + k]
  generated: jax.Array  # [batch]
  done: jax.Array  # [batch] bool
  forward_passes: jax.Array  # [batch]
  accepted_hist: jax.Array  # [batch, k]
  step: jax.Array  # [] int32: loop iterations so far


class _Static(NamedTuple):
  cfg: ModelConfig
  block_size: int
  max_new_tokens: int
  max_len: int
  sampling: SamplingParams
  verify_beta: float
  kept: tuple[int, ...]  # the acceptance counts whose draft blocks a step feeds (`predraft_lib.counts`)
  hooks: StepHooks


def _target_logits(ar_logits: jax.Array, diffusion_logits: jax.Array | None, beta: float) -> jax.Array:
  """The verifier's logits: beta * AR + (1 - beta) * diffusion for the same position (beta = 1: AR)."""
  if diffusion_logits is None:
    return ar_logits
  return beta * ar_logits + (1.0 - beta) * diffusion_logits


def _sample_rows(keys: jax.Array, logits: jax.Array, params: SamplingParams) -> tuple[jax.Array, jax.Array]:
  """One draw per row and position: logits [batch, n, vocab] -> (tokens [batch, n], the processed
  log-probs they were drawn from [batch, n, vocab]; greedy: argmax and a [batch, n, 1] placeholder)."""
  if params.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), jnp.zeros(logits.shape[:2] + (1,), jnp.float32)
  logprobs = sampling.process_logits(logits, params)
  return jax.vmap(sampling.sample)(keys, logprobs), logprobs


def _force_drafts(st: _Static, forced: jax.Array | None, t0_position: jax.Array, drafts: jax.Array,
                  q: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Replaces the drafts [batch, k-1] for positions t0_position+1 .. +k-1 (t0_position [batch]) by
  `forced[row, position]` ([batch, max_len]) where that entry is >= 0, with a one-hot q [batch, k-1,
  vocab] (the distribution the forced draft is drawn from)."""
  if forced is None:
    return drafts, q
  table = jax.vmap(lambda row, start: jax.lax.dynamic_slice(row, (start,), (st.block_size - 1,)))(
      forced, t0_position + 1)  # [batch, k-1]
  use = table >= 0
  drafts = jnp.where(use, table, drafts)
  if not st.sampling.greedy:
    one_hot = jnp.arange(q.shape[-1])[None, None, :] == table[:, :, None]  # [batch, k-1, vocab]
    q = jnp.where(use[:, :, None], jnp.where(one_hot, 0.0, -jnp.inf), q)
  return drafts, q


def verify(st: _Static, keys: jax.Array, target_logits: jax.Array, q: jax.Array, drafts: jax.Array,
           n_valid: jax.Array, data: Any = None) -> tuple[jax.Array, jax.Array]:
  """Rejection sampling of each row's drafts against the verifier: keys [batch, uses], target_logits
  [batch, k, vocab], q [batch, k-1, vocab'] (the drafts' processed log-probs), drafts [batch, k-1],
  n_valid [batch] (acceptance stops there) -> (accepted [batch] in 0..n_valid, next token [batch]).
  `data`: unused (`StepHooks`)."""
  # Greedy verification only needs the argmax, which processing does not move.
  greedy = st.sampling.greedy
  logp = target_logits if greedy else sampling.process_logits(target_logits, st.sampling)  # [batch, k, vocab]
  n = None if predraft_lib.is_full(st.kept, st.block_size) else n_valid  # full pre-drafting: always k-1
  return jax.vmap(functools.partial(sampling.verify, greedy=greedy))(keys[:, 0], logp, q, drafts, n_valid=n)


def own_block(accepted: jax.Array, data: Any = None) -> jax.Array:
  """The acceptance count whose drafts the next step takes: the realised one, [batch] (its block,
  or the pruned step's fallback for it)."""
  return accepted


class StepHooks(NamedTuple):
  """The parts of a step that tests and benchmarks replace, never users: tests plant broken variants
  (negative controls the exactness tests must catch), benchmarks force an acceptance law. Each gets
  `hook_data` (a [batch, ...] array, traced: one compilation for all its values) as `data`."""

  verify: Callable[..., tuple[jax.Array, jax.Array]]  # `verify`'s signature
  draft_block: Callable[[jax.Array, Any], jax.Array]  # `own_block`'s signature


HOOKS = StepHooks(verify, own_block)


def _step(w: DecodeWeights, st: _Static, key_table: jax.Array, forced: jax.Array | None,
          hook_data: jax.Array | None, eos_id: jax.Array, mask_id: jax.Array, s: _State) -> _State:
  k, cfg, m = st.block_size, st.cfg, len(st.kept)
  B = s.t0.shape[0]
  p = s.cache.lengths  # [batch]
  # Drafts past a row's n_valid are fed too (fixed shapes) but never accepted, and their slots lie
  # past the committed length.
  tokens = jnp.concatenate([s.t0[:, None], s.drafts, jnp.full((B, m * k), mask_id, jnp.int32)], axis=1)  # [B, T]
  positions = p[:, None] + jnp.asarray(masks.decode_step_offsets(k, st.kept))[None, :]  # [B, T]
  # All T tokens' K/V land at slots p .. p+T-1; the cache part of the mask is slot < p per row.
  hidden, written = engine.forward(w, cfg, s.cache, tokens, positions, masks.decode_step_intervals(k, st.kept))
  blocks = hidden[:, k:].reshape(B, m, k, cfg.d_model)  # [batch, kept block, offset, d_model]
  diffusion0 = engine.logits(w, blocks[:, :, 0]) if st.verify_beta < 1 else None  # [batch, k, vocab]
  target = _target_logits(engine.logits(w, hidden[:, :k]), diffusion0, st.verify_beta)  # [batch, k, vocab]

  keys = loop.keys_at(key_table, s.step + 1)  # [batch, _KEY_USES]
  accepted, nxt = st.hooks.verify(st, keys, target, s.q, s.drafts, s.n_valid, hook_data)

  # Commit t_0, d_1 .. d_a; emit d_1 .. d_a and the next token t_0' (cut at EOS / max_new_tokens).
  active = ~s.done
  j = jnp.arange(k)[None, :]
  drafts_ext = jnp.concatenate([s.drafts, jnp.zeros((B, 1), jnp.int32)], axis=1)  # [batch, k]
  cand = jnp.where(j < accepted[:, None], drafts_ext, nxt[:, None])  # [batch, k]: d_1..d_a, t_0', (ignored)
  count = jnp.where(active, accepted + 1, 0)
  out, emitted, hit_eos = loop.emit(s.out, s.generated, cand, count, eos_id, st.max_new_tokens)
  generated = s.generated + emitted
  p_new = p + emitted  # = p + a + 1 unless the row ended inside this step
  # The verification K/V at p .. p_new-1 are exact for their prefix; slots past p_new are ignored
  # and overwritten next step.
  cache = cache_lib.with_lengths(written, p_new)

  drafting = st.hooks.draft_block(accepted, hook_data)  # [batch] the count whose drafts come next
  rows, n_valid = _draft_rows(st, blocks, drafting)  # [batch, k-1, d_model], [batch]
  drafts, q = _sample_rows(keys[:, 2], engine.logits(w, rows), st.sampling)
  drafts, q = _force_drafts(st, forced, p_new, drafts, q)
  new = _State(cache, nxt, drafts, n_valid, q, out, generated,
               s.done | hit_eos | (generated >= st.max_new_tokens), s.forward_passes + active,
               s.accepted_hist + (active[:, None] & (j == accepted[:, None])), s.step + 1)
  # Finished rows keep their state (their cache K/V past p is ignored; lengths did not move).
  carried = (new.t0, new.drafts, new.n_valid, new.q)
  frozen = loop.freeze_done(s.done, carried, (s.t0, s.drafts, s.n_valid, s.q))
  return new._replace(t0=frozen[0], drafts=frozen[1], n_valid=frozen[2], q=frozen[3])


def _draft_rows(st: _Static, blocks: jax.Array, count: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The hidden rows the next drafts come from, for the realised count a [batch]: (rows [batch, k-1,
  d_model], valid drafts [batch]). blocks [batch, kept block, offset, d_model].

  Block a's offset 0 predicts t_0' (already chosen); its offsets 1 .. k-1 draft positions
  p_new+1 .. (k-1 valid drafts). Pruned (a has no block): the kept block of the largest count a' < a
  sits a - a' positions earlier, so its offsets a-a'+1 .. k-1 draft those positions (k-1-(a-a') valid;
  the rest repeat its last offset, never accepted); no kept count below a: no valid draft."""
  k = st.block_size
  if predraft_lib.is_full(st.kept, k):  # every count has its block: no fallback gathers in the step
    chosen = jnp.take_along_axis(blocks, count[:, None, None, None], axis=1)[:, 0]  # [batch, k, d_model]
    return chosen[:, 1:], jnp.full(count.shape, k - 1, jnp.int32)
  source, n_valid = (jnp.asarray(a) for a in predraft_lib.fallback(st.kept, k))  # [k] each, by count
  block = source[count]  # [batch]; -1: none
  shift = count - jnp.asarray(st.kept, jnp.int32)[jnp.maximum(block, 0)]  # [batch] a - a'
  chosen = jnp.take_along_axis(blocks, jnp.maximum(block, 0)[:, None, None, None], axis=1)[:, 0]
  offsets = jnp.minimum(shift[:, None] + jnp.arange(1, k)[None, :], k - 1)  # [batch, k-1]
  return jnp.take_along_axis(chosen, offsets[:, :, None], axis=1), n_valid[count]


def _start(params, prompts, lengths, keys, forced, hook_data, eos_id, mask_id, st: _Static
           ) -> tuple[_State, Callable[[_State], _State]]:
  """The prefill up to the loop invariant (docs/method.md §2, p = n) and the step function of the loop."""
  B, k, cfg = prompts.shape[0], st.block_size, st.cfg
  keys = loop.key_table(keys, st.max_new_tokens, _KEY_USES)  # [batch, steps, uses]; step 0 = prefill
  w = prepare_weights(params, cfg)  # once, outside the loop
  cache, last_h, block_h = prefill(params, cfg, prompts, lengths, max_len=st.max_len, block_size=k,
                                   mask_id=mask_id)
  diffusion0 = engine.logits(w, block_h[:, 0]) if st.verify_beta < 1 else None  # predicts position n
  target = _target_logits(engine.logits(w, last_h), diffusion0, st.verify_beta)  # [batch, vocab]
  # t_0 (position n) and the drafts (block offsets 1 .. k-1: positions n+1 .. n+k-1) in one draw.
  logits = jnp.concatenate([target[:, None], engine.logits(w, block_h[:, 1:])], axis=1)  # [batch, k, vocab]
  tokens, logprobs = _sample_rows(keys[:, 0, 2], logits, st.sampling)
  t0 = tokens[:, 0]
  drafts, q = _force_drafts(st, forced, lengths, tokens[:, 1:], logprobs[:, 1:])

  out = jnp.full((B, st.max_new_tokens + k), loop.PAD_TOKEN, jnp.int32)
  out, generated, hit_eos = loop.emit(out, jnp.zeros((B,), jnp.int32), t0[:, None], jnp.ones((B,), jnp.int32),
                                      eos_id, st.max_new_tokens)
  state = _State(cache, t0, drafts, jnp.full((B,), k - 1, jnp.int32), q, out, generated,
                 hit_eos | (generated >= st.max_new_tokens),
                 jnp.ones((B,), jnp.int32), jnp.zeros((B, k), jnp.int32), jnp.int32(0))
  return state, functools.partial(_step, w, st, keys, forced, hook_data, eos_id, mask_id)


def _generate_tidar(params, prompts, lengths, keys, forced, hook_data, eos_id, mask_id, *, st: _Static
                    ) -> loop.DecodeOutput:
  state, step = _start(params, prompts, lengths, keys, forced, hook_data, eos_id, mask_id, st)
  # Every active step emits at least one token, so max_new_tokens - 1 steps finish every row.
  state = jax.lax.while_loop(lambda s: ~jnp.all(s.done) & (s.step < st.max_new_tokens - 1), step, state)
  stats = loop.DecodeStats(state.forward_passes, state.accepted_hist)
  return loop.DecodeOutput(state.out[:, : st.max_new_tokens], state.generated, stats, state.cache)


def _trace_tidar(params, prompts, lengths, keys, forced, hook_data, eos_id, mask_id, *, st: _Static, steps: int
                 ) -> _State:
  state, step = _start(params, prompts, lengths, keys, forced, hook_data, eos_id, mask_id, st)
  _, later = jax.lax.scan(lambda s, _: (step(s),) * 2, state, length=steps)  # each leaf [steps, ...]
  return jax.tree.map(lambda first, rest: jnp.concatenate([first[None], rest]), state, later)


_generate_tidar = loop.decode_jit(_generate_tidar, static_argnames=("st",))
_trace_tidar = loop.decode_jit(_trace_tidar, static_argnames=("st", "steps"))


def generate_tidar(params: Any, config: Any, prompts: Any, prompt_lengths: Any, *, max_new_tokens: int,
                   sampling: SamplingParams, key: Any, eos_id: int | Sequence[int] | None, mask_id: int,
                   max_len: int | None = None, block_size: int | None = None, verify_beta: float | None = None,
                   forced_drafts: Any = None, predraft: Any = None, hooks: StepHooks = HOOKS,
                   hook_data: Any = None) -> loop.DecodeOutput:
  """Decodes right-padded prompts [batch, N] (row b has prompt_lengths[b] tokens) with TiDAR steps.

  config: the checkpoint's ConfigDict (block_size, verify_beta and predraft default to its `tidar`
  section, and a different block_size is an error) or a bare ModelConfig (then block_size is
  required). predraft: the acceptance counts whose draft blocks a step feeds (`predraft.counts`:
  "all", the default, or e.g. (0, 1, 2, 7)); pruned sets need verify_beta = 1.
  key: one PRNG key, or [batch] keys (row i then equals the batch-of-1 run with key i). eos_id: the
  id, or ids, that end a row (None: rows run to max_new_tokens).
  mask_id: the tokenizer's mask token. max_len: cache slots (default: prompt bucket +
  max_new_tokens + the tokens one step writes, k + k² with every block; allocated as
  `dispatch.cache_slots`: on a GPU rounded up to a multiple of 128).
  forced_drafts: optional [batch, positions] int32; the draft for
  position x becomes forced_drafts[row, x] with a one-hot q where that entry is >= 0 (-1, or past
  the table's width: the model's own draft); with a pruned predraft only a row's valid drafts are
  verified, forced or not. Tests force an oracle continuation, benchmarks force acceptance.
  hooks, hook_data: tests and benchmarks only (`StepHooks`).

  One compilation per (batch, prompt bucket, max_new_tokens, max_len, block_size, sampling,
  verify_beta, predraft, hooks). Returns tokens [batch, max_new_tokens], lengths, stats and the final cache.
  """
  args, st = _request(params, config, prompts, prompt_lengths, max_new_tokens=max_new_tokens, sampling=sampling,
                      key=key, eos_id=eos_id, mask_id=mask_id, max_len=max_len, block_size=block_size,
                      verify_beta=verify_beta, forced_drafts=forced_drafts, predraft=predraft, hooks=hooks,
                      hook_data=hook_data)
  with loop.matmul_precision(st.cfg):
    return _generate_tidar(*args, st=st)


def trace_tidar(params: Any, config: Any, prompts: Any, prompt_lengths: Any, *, steps: int, **kwargs) -> _State:
  """Test only: the decoder's state after the prefill and after each of the first `steps` steps,
  stacked on a leading axis [steps + 1, ...] (kwargs: `generate_tidar`'s). The steps are the loop's
  own, run unconditionally (finished rows keep their state), so tests can read what the loop keeps
  between steps and does not return: t_0, the drafts and their q (the invariant of docs/method.md §2).
  """
  args, st = _request(params, config, prompts, prompt_lengths, **kwargs)
  if not isinstance(steps, int) or not 1 <= steps < st.max_new_tokens:
    raise ValueError(f"steps={steps!r}: must lie in [1, max_new_tokens={st.max_new_tokens}) (the keys of "
                     "max_new_tokens - 1 steps)")
  with loop.matmul_precision(st.cfg):
    return _trace_tidar(*args, st=st, steps=steps)


def _request(params: Any, config: Any, prompts: Any, prompt_lengths: Any, *, max_new_tokens: int,
             sampling: SamplingParams, key: Any, eos_id: int | Sequence[int] | None, mask_id: int,
             max_len: int | None = None, block_size: int | None = None, verify_beta: float | None = None,
             forced_drafts: Any = None, predraft: Any = None, hooks: StepHooks = HOOKS,
             hook_data: Any = None) -> tuple[tuple, _Static]:
  """Checks a `generate_tidar` request on the host: (the jitted decoder's arguments, its static config)."""
  cfg, tidar_cfg = loop.resolve_config(config)
  trained_k = None if tidar_cfg is None else tidar_cfg.get("block_size")
  if block_size is None:
    if trained_k is None:
      raise ValueError("block_size is required when config is a bare ModelConfig (pass the "
                       "checkpoint's tidar.block_size)")
    block_size = trained_k
  if not isinstance(block_size, int) or block_size < 1:
    raise ValueError(f"block_size={block_size!r}: must be a positive integer")
  if trained_k is not None and block_size != trained_k:
    raise ValueError(f"block_size={block_size} does not match the checkpoint's tidar.block_size={trained_k}: "
                     f"its diffusion head drafts blocks of {trained_k}; pass block_size={trained_k} (or omit it)")
  if verify_beta is None:
    verify_beta = 1.0 if tidar_cfg is None else float(tidar_cfg.get("verify_beta", 1.0))
  if not 0.0 <= verify_beta <= 1.0:
    raise ValueError(f"verify_beta={verify_beta!r}: must lie in [0, 1] (1 = exact AR verification)")
  predraft = predraft_lib.configured(predraft, tidar_cfg)
  kept = predraft_lib.counts(predraft, block_size)
  if verify_beta < 1 and not predraft_lib.is_full(kept, block_size):
    raise ValueError(f"predraft={predraft!r} with verify_beta={verify_beta}: mixing diffusion logits into "
                     "verification needs every block; use predraft='all' or verify_beta=1")
  req = loop.check_request(cfg, prompts, prompt_lengths, max_new_tokens=max_new_tokens, sampling=sampling,
                           key=key, max_len=max_len, lookahead=predraft_lib.step_tokens(block_size, kept),
                           token_ids={"eos_id": eos_id, "mask_id": mask_id})
  if forced_drafts is not None:
    forced_drafts = np.asarray(forced_drafts)
    if forced_drafts.ndim != 2 or forced_drafts.shape[0] != req.prompts.shape[0]:
      raise ValueError(f"forced_drafts must be [batch={req.prompts.shape[0]}, positions], got {forced_drafts.shape}")
    if np.any(forced_drafts >= cfg.vocab_size):
      raise ValueError(f"forced_drafts holds ids >= vocab_size={cfg.vocab_size}; use ids of this model, "
                       "or -1 to keep the model's own draft")
    width = min(forced_drafts.shape[1], req.max_len)  # positions past the table keep the model's drafts
    table = np.full((req.prompts.shape[0], req.max_len), -1, np.int32)
    table[:, :width] = forced_drafts[:, :width]
    forced_drafts = table
  if not isinstance(hooks, StepHooks):
    raise ValueError(f"hooks must be a tidar.StepHooks, got {type(hooks).__name__}")
  if hook_data is not None:
    hook_data = np.asarray(hook_data)
    if hook_data.ndim < 1 or hook_data.shape[0] != req.prompts.shape[0]:
      raise ValueError(f"hook_data must be [batch={req.prompts.shape[0]}, ...], got shape {hook_data.shape}")
  st = _Static(cfg, block_size, int(max_new_tokens), req.max_len, sampling, float(verify_beta), kept, hooks)
  args = (params, req.prompts, req.lengths, req.keys, forced_drafts, hook_data, loop.eos_array(eos_id),
          jnp.asarray(mask_id, jnp.int32))
  return args, st
