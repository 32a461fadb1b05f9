"""TiDAR decoder: greedy == AR token for token, oracle drafts (full acceptance), batch invariance,
exact cache, the drafts kept after a step (from the accepted outcome's block), beta mixing, one
compile per shape, and input errors.

Cases are batched: one call per (block size, EOS) decodes four prompts of different lengths with
the model's drafts and the same four with oracle drafts, so the ~50 greedy cases cost one
compilation per block size. M = 15 new tokens: not a multiple of 2, 4 or 8, and 15 - 1 is not a
multiple of 4 or 8, so the last step of a fully accepted run is cut at max_new_tokens.
"""

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import stats
from test_decode_ar import (CFG, GREEDY, M_AR, MASK_ID, PROMPT_LENGTHS, full_forward, params,  # noqa: F401
                            prompts, random_prompts)  # params, prompts: the module fixtures
from tidar_jax import masks
from tidar_jax.decode import cache as cache_lib
from tidar_jax.decode import loop
from tidar_jax.decode.ar import generate_ar
from tidar_jax.decode.sampling import SamplingParams
from tidar_jax.decode.tidar import generate_tidar, trace_tidar
from tidar_jax.model import Transformer

M = 15  # max_new_tokens of the TiDAR runs; the AR reference runs M_AR = M + 8 (oracle drafts past M)
SAMPLED = SamplingParams(temperature=1.0, top_k=12)
# Sampling at which this model's AR argmax has probability ~1 (its smallest top-2 logit gap on the
# greedy path is ~0.09): a forced draft d passes with probability p(d), so only here can a sampled
# first step be forced to accept exactly a; q is still a full top-k law, compared entry by entry.
SHARP = SamplingParams(temperature=0.01, top_k=12)
# Compilation is most of this module's time, the decoders then run for milliseconds: compiled without
# XLA's expensive backend optimisations (conftest.fast_compile), which change no program.
pytestmark = pytest.mark.usefixtures("fast_compile")


def tidar(params, prompts, lengths, k, *, eos=None, sampling=GREEDY, key=None, **kwargs):
  key = jax.random.key(0) if key is None else key
  return generate_tidar(params, CFG, prompts, lengths, max_new_tokens=M, sampling=sampling, key=key,
                        eos_id=eos, mask_id=MASK_ID, block_size=k, **kwargs)


@pytest.fixture(scope="module")
def ar(params, prompts):
  """AR greedy reference of M_AR tokens, without and with an EOS that appears mid-sequence: {eos: output}."""
  def run(eos):
    return generate_ar(params, CFG, prompts, PROMPT_LENGTHS, max_new_tokens=M_AR, sampling=GREEDY,
                       key=jax.random.key(0), eos_id=eos)

  plain = run(None)
  # Token 6 of row 0: for k = 4 a draft in the middle of the second step, for k = 8 of the first.
  eos = int(plain.tokens[0, 6])
  with_eos = run(eos)
  assert with_eos.lengths[0] <= 7 and np.asarray(with_eos.lengths).min() < M
  return {None: plain, eos: with_eos}


def eos_values(ar):
  return list(ar)


def assert_same_as_ar(out, ar_out):
  """TiDAR's M tokens == the first M tokens of the (longer) AR run, padding and lengths included."""
  lengths = np.minimum(np.asarray(ar_out.lengths), M)
  expected = np.where(np.arange(M)[None, :] < lengths[:, None], np.asarray(ar_out.tokens)[:, :M], loop.PAD_TOKEN)
  np.testing.assert_array_equal(out.tokens, expected)
  np.testing.assert_array_equal(out.lengths, lengths)


def oracle_table(ar_out, prompts, lengths) -> np.ndarray:
  """[batch, positions]: prompt then the AR greedy continuation (M_AR tokens), at their positions."""
  table = np.full((len(lengths), prompts.shape[1] + M_AR), -1, np.int32)
  for row, n in enumerate(lengths):
    table[row, :n] = prompts[row, :n]
    table[row, n:n + M_AR] = ar_out.tokens[row]
  return table


def rows(out, index):
  """The given rows of a decode output (tokens, lengths, stats, cache)."""
  cache = out.cache._replace(k=tuple(x[index] for x in out.cache.k), v=tuple(x[index] for x in out.cache.v),
                             lengths=out.cache.lengths[index])
  return out._replace(tokens=out.tokens[index], lengths=out.lengths[index],
                      stats=jax.tree.map(lambda x: x[index], out.stats), cache=cache)


@pytest.fixture(scope="module")
def greedy8(params, prompts, ar):
  """Greedy TiDAR over 8 rows per call, memoised per (k, eos): rows 0-3 use the model's drafts, rows
  4-7 are the same prompts with oracle drafts (the AR continuation; -1 elsewhere keeps the model's)."""
  prompts8 = np.concatenate([prompts, prompts])
  lengths8 = np.concatenate([PROMPT_LENGTHS, PROMPT_LENGTHS])
  table = np.concatenate([np.full((4, prompts.shape[1] + M_AR), -1, np.int32),
                          oracle_table(ar[None], prompts, PROMPT_LENGTHS)])
  runs = {}

  def run(k, eos):
    if (k, eos) not in runs:
      runs[k, eos] = tidar(params, prompts8, lengths8, k, eos=eos, forced_drafts=table)
    return runs[k, eos]

  return run


@pytest.mark.parametrize("with_eos", [False, True])
@pytest.mark.parametrize("k", [2, 4, 8])
def test_greedy_equals_ar_batch_of_four(greedy8, ar, k, with_eos):
  eos = eos_values(ar)[with_eos]
  out = rows(greedy8(k, eos), slice(0, 4))
  assert_same_as_ar(out, ar[eos])
  fp = np.asarray(out.stats.forward_passes)
  np.testing.assert_array_equal(np.asarray(out.stats.accepted_hist).sum(1), fp - 1)
  assert np.all(fp <= np.asarray(out.lengths))  # every step commits at least one token


@pytest.mark.parametrize("with_eos", [False, True])
@pytest.mark.parametrize("k", [2, 4, 8])
def test_oracle_drafts_are_all_accepted(greedy8, ar, k, with_eos):
  """Drafts = the AR greedy continuation: every step accepts all k-1 drafts and takes the bonus
  token, so each step emits k tokens (the last one cut at EOS or max_new_tokens)."""
  eos = eos_values(ar)[with_eos]
  out = rows(greedy8(k, eos), slice(4, 8))
  assert_same_as_ar(out, ar[eos])
  steps = np.asarray(out.stats.forward_passes) - 1
  hist = np.asarray(out.stats.accepted_hist)
  np.testing.assert_array_equal(hist[:, k - 1], steps)  # all drafts accepted: the bonus path, every step
  np.testing.assert_array_equal(hist[:, : k - 1], 0)
  np.testing.assert_array_equal(steps, -(-(np.asarray(out.lengths) - 1) // k))  # the prefill emits 1
  if not with_eos:
    np.testing.assert_array_equal(steps, -(-(M - 1) // k))


@pytest.mark.parametrize("with_eos", [False, True])
def test_greedy_batch_of_one_equals_ar_and_its_batched_row(params, prompts, ar, greedy8, with_eos):
  eos = eos_values(ar)[with_eos]
  batched = greedy8(4, eos)
  for i in range(len(PROMPT_LENGTHS)):
    alone = tidar(params, prompts[i:i + 1], PROMPT_LENGTHS[i:i + 1], 4, eos=eos)
    assert_same_as_ar(alone, rows(ar[eos], slice(i, i + 1)))
    for got, want in zip(alone.stats, batched.stats):
      np.testing.assert_array_equal(got[0], want[i])


def test_greedy_with_several_stop_ids_equals_ar(params, prompts, ar):
  """A stop set (two ids met mid-draft in different rows) ends TiDAR's rows where it ends AR's."""
  plain = np.asarray(ar[None].tokens)
  stops = (int(plain[0, 6]), int(plain[3, 2]))
  want = generate_ar(params, CFG, prompts, PROMPT_LENGTHS, max_new_tokens=M_AR, sampling=GREEDY,
                     key=jax.random.key(0), eos_id=stops)
  assert np.asarray(want.lengths)[[0, 3]].max() <= 7
  assert_same_as_ar(tidar(params, prompts, PROMPT_LENGTHS, 4, eos=stops), want)


@pytest.fixture(scope="module")
def sampled(params, prompts):
  keys = jax.random.split(jax.random.key(7), len(PROMPT_LENGTHS))
  return keys, tidar(params, prompts, PROMPT_LENGTHS, 4, sampling=SAMPLED, key=keys)


def test_sampled_batch_invariance(params, prompts, sampled):
  keys, batched = sampled
  assert np.asarray(batched.stats.accepted_hist)[:, 1:].sum() > 0  # some drafts were accepted
  for i in range(len(PROMPT_LENGTHS)):
    alone = tidar(params, prompts[i:i + 1], PROMPT_LENGTHS[i:i + 1], 4, sampling=SAMPLED, key=keys[i:i + 1])
    np.testing.assert_array_equal(alone.tokens[0], batched.tokens[i])
    for got, want in zip(alone.stats, batched.stats):
      np.testing.assert_array_equal(got[0], want[i])


def fresh_kv(params, prompts, lengths, out):
  """K/V of an uncached causal forward over prompt + generated tokens: [layers, batch, width, h, d]."""
  seq = np.zeros((len(lengths), prompts.shape[1] + M_AR), np.int32)  # the AR reference's compiled width
  for row, n in enumerate(lengths):
    seq[row, :n] = prompts[row, :n]
    seq[row, n:n + int(out.lengths[row])] = out.tokens[row, : int(out.lengths[row])]
  chunks = [full_forward(params, seq[i:i + 4])[1] for i in range(0, len(seq), 4)]  # one compiled shape
  return jax.tree.map(lambda *x: jnp.concatenate(x, axis=1), *chunks)


@pytest.mark.parametrize("run", ["sampled", "greedy_and_oracle"])
def test_cache_holds_exactly_the_committed_tokens(params, prompts, sampled, greedy8, run):
  """After generating (rejections leave stale K/V past each row's length), the committed slots equal
  a fresh forward over the final sequence."""
  if run == "sampled":
    out, prompts, lengths = sampled[1], prompts, PROMPT_LENGTHS
  else:
    out = greedy8(4, None)
    prompts, lengths = np.concatenate([prompts, prompts]), np.concatenate([PROMPT_LENGTHS, PROMPT_LENGTHS])
  committed = lengths + np.asarray(out.lengths) - 1  # the newest token is not yet in the cache
  np.testing.assert_array_equal(out.cache.lengths, committed)
  kv = fresh_kv(params, prompts, lengths, out)
  cache = cache_lib.stacked(out.cache)  # [layers, batch, max_len, kv_heads, head_dim]
  for row, n in enumerate(committed):
    np.testing.assert_allclose(cache.k[:, row, :n], kv.k[:, row, :n], atol=1e-5)
    np.testing.assert_allclose(cache.v[:, row, :n], kv.v[:, row, :n], atol=1e-5)


def greedy_mixed_reference(params, prompts, lengths, beta: float, k: int) -> np.ndarray:
  """Iterated argmax of beta * AR + (1 - beta) * diffusion logits from uncached forwards: the
  prefix, then one block of k mask tokens at the next positions that sees the whole prefix; its
  slot 0 gives the diffusion logits of the next position."""
  width = prompts.shape[1] + M
  model = Transformer(CFG)
  mask_static = jnp.asarray(masks.prefill_mask(width, k))[None]

  @jax.jit
  def next_token(seq, n):  # seq [batch, width], n [batch] -> [batch]
    tokens = jnp.concatenate([seq, jnp.full((seq.shape[0], k), MASK_ID)], axis=1)
    pos = jnp.concatenate([jnp.broadcast_to(jnp.arange(width)[None, :], seq.shape),
                           n[:, None] + jnp.arange(k)[None, :]], axis=1)
    cols = jnp.arange(width + k)[None, :]
    mask = mask_static & ((cols < n[:, None]) | (cols >= width))[:, None, :]
    logits, _ = model.apply(params, tokens, pos, mask)
    ar_logits = jnp.take_along_axis(logits, (n - 1)[:, None, None], axis=1)[:, 0]
    return jnp.argmax(beta * ar_logits + (1 - beta) * logits[:, width], axis=-1)

  seq = np.zeros((len(lengths), width), np.int32)
  seq[:, : prompts.shape[1]] = prompts
  n, out = lengths.copy(), []
  for _ in range(M):
    tok = np.asarray(next_token(seq, n))
    seq[np.arange(len(n)), n] = tok
    n = n + 1
    out.append(tok)
  return np.stack(out, axis=1)


def test_verify_beta_decodes_the_mixed_distribution(params, prompts, ar):
  """beta < 1 greedy == iterated argmax of the mixture of AR and same-position diffusion logits."""
  out = tidar(params, prompts, PROMPT_LENGTHS, 4, verify_beta=0.5)
  np.testing.assert_array_equal(out.tokens, greedy_mixed_reference(params, prompts, PROMPT_LENGTHS, 0.5, 4))
  assert not np.array_equal(out.tokens, np.asarray(ar[None].tokens)[:, :M])  # the mixture changes the output


@functools.partial(jax.jit, static_argnames="k")
def reference_block(params, committed, m, k: int):
  """Uncached forward over committed tokens [R, W] (row r: its first m[r]) and k mask tokens at
  positions m .. m+k-1 that see every committed token and each other, with the mask written here
  (not taken from masks.py): (AR logits after the last committed token [R, vocab], the block's
  diffusion logits [R, k, vocab])."""
  R, W = committed.shape
  tokens = jnp.concatenate([committed, jnp.full((R, k), MASK_ID, jnp.int32)], axis=1)  # [R, W+k]
  pos = jnp.concatenate([jnp.broadcast_to(jnp.arange(W)[None, :], (R, W)), m[:, None] + jnp.arange(k)[None, :]], axis=1)
  query = jnp.arange(W + k)[None, :, None]  # [1, W+k, 1]
  key = jnp.arange(W + k)[None, None, :]  # [1, 1, W+k]
  seen = key < m[:, None, None]  # [R, 1, W+k]: the committed tokens
  mask = jnp.where(query < W, seen & (key <= query), seen | (key >= W))  # [R, W+k, W+k]
  logits, _ = Transformer(CFG).apply(params, tokens, pos, mask)
  return jnp.take_along_axis(logits, (m - 1)[:, None, None], axis=1)[:, 0], logits[:, W:]


def first_step_rows(prompts, lengths, oracle, k: int):
  """Per prompt, one row left to the model, then one per outcome a = 0 .. k-1 that the first step must
  reach: the prefill's drafts d_1 .. d_a forced to the AR greedy continuation `oracle` [batch, >= k]
  and d_{a+1} to another token. Returns (prompts [R, N], lengths [R], forced drafts [R, N + k] with
  -1 where the model drafts, the forced a [R] with -1 on the free rows)."""
  N = prompts.shape[1]
  rows, forced_a, tables = [], [], []
  for r, n in enumerate(lengths):
    for a in range(-1, k):
      table = np.full(N + k, -1, np.int32)
      if a >= 0:
        table[n + 1:n + a + 1] = oracle[r, 1:a + 1]  # the token at position n + j is oracle[r, j]
        if a < k - 1:
          table[n + a + 1] = (oracle[r, a + 1] + 1) % MASK_ID
      rows.append(r)
      forced_a.append(a)
      tables.append(table)
  rows = np.array(rows)
  return prompts[rows], lengths[rows], np.stack(tables), np.array(forced_a)


def committed_rows(prompts, lengths, new_tokens, counts, width: int) -> tuple[np.ndarray, np.ndarray]:
  """Each prompt followed by its first counts[r] new tokens, right-padded to `width`: (tokens [R, width],
  committed lengths [R])."""
  tokens = np.zeros((len(lengths), width), np.int32)
  for r, (n, count) in enumerate(zip(lengths, counts)):
    tokens[r, :n] = prompts[r, :n]
    tokens[r, n:n + count] = new_tokens[r, :count]
  return tokens, lengths + counts


def assert_drafted_by(state, block_logits, where, sampling):
  """The state's drafts (and q) where `where` [R, k-1] is True equal the block's predictions at offsets
  1 .. k-1 (offset 0 predicts the position of t_0, already chosen): their argmax, or their law."""
  logits = np.asarray(block_logits)[:, 1:]  # [R, k-1, vocab]
  if sampling.greedy:
    np.testing.assert_array_equal(np.where(where, state.drafts, -1), np.where(where, logits.argmax(-1), -1))
    return
  law = stats.decoding_law(logits, sampling)  # [R, k-1, vocab]
  log_law = np.log(law, out=np.full_like(law, -np.inf), where=law > 0)
  np.testing.assert_allclose(state.q[where], log_law[where], rtol=1e-4, atol=1e-2)
  drawn = np.take_along_axis(law, state.drafts[:, :, None], axis=-1)[:, :, 0]  # [R, k-1]
  assert np.all(drawn[where] > 0), "a draft lies outside its block's top-k"


@pytest.mark.parametrize("sampling", [GREEDY, SHARP], ids=["greedy", "sampled"])
def test_drafts_after_a_step_come_from_the_accepted_block(params, prompts, ar, sampling):
  """The drafts (and q) that the loop keeps after the prefill equal the prefill block's predictions,
  and after a first step that accepted a drafts, block a's: for every a = 0 .. k-1 (forced), against
  an uncached forward over the committed tokens. The output cannot show this (rejection sampling is
  exact for any proposal with its own q); a wrong block only costs acceptance."""
  k = 4
  rows, lengths, table, forced_a = first_step_rows(prompts, PROMPT_LENGTHS, np.asarray(ar[None].tokens), k)
  trace = trace_tidar(params, CFG, rows, lengths, steps=1, max_new_tokens=M, sampling=sampling, key=jax.random.key(0),
                      eos_id=None, mask_id=MASK_ID, block_size=k, forced_drafts=table)
  before, after = (jax.tree.map(lambda x: np.asarray(x[i]), trace) for i in range(2))
  accepted = after.accepted_hist.argmax(-1)  # [R]
  forced = forced_a >= 0
  np.testing.assert_array_equal(accepted[forced], forced_a[forced])
  np.testing.assert_array_equal(after.cache.lengths, lengths + accepted + 1)

  verified = np.concatenate([before.t0[:, None], before.drafts], axis=1)  # [R, k]: t_0 d_1 .. d_{k-1}
  unforced = table[np.arange(len(rows))[:, None], lengths[:, None] + np.arange(1, k)[None, :]] < 0  # [R, k-1]
  # The prefill's block saw the prompt; block a of the first step the prompt and t_0 d_1 .. d_a.
  for state, counts, where in [(before, 0 * accepted, unforced), (after, accepted + 1, np.ones_like(unforced))]:
    committed, m = committed_rows(rows, lengths, verified, counts, rows.shape[1] + k)
    ar_next, block = reference_block(params, committed, m, k)
    assert_drafted_by(state, block, where, sampling)
    if sampling.greedy:  # and t_0 is the AR argmax after the committed tokens (the bonus token when a = k-1)
      np.testing.assert_array_equal(state.t0, np.argmax(ar_next, axis=-1))


def lm_head_rows(jaxpr, depth=0) -> list[tuple[int, int]]:
  """(nesting depth, rows) of every matmul producing [..., vocab] logits: the LM head's uses."""
  found = []
  for eqn in jaxpr.eqns:
    shape = eqn.outvars[0].aval.shape if eqn.outvars else ()
    if eqn.primitive.name == "dot_general" and shape and shape[-1] == CFG.vocab_size:
      found.append((depth, int(np.prod(shape[:-1]))))
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          found += lm_head_rows(sub.jaxpr, depth + 1)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          found += lm_head_rows(sub, depth + 1)
  return sorted(found)


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_lm_head_runs_only_on_the_rows_it_needs(params, prompts, beta):
  """Prefill: c_{n-1} and the block's drafting offsets; each step (inside the loop, one level
  deeper): the k verification rows and the chosen block's k-1 offsets; beta < 1 adds slot 0 of the
  prefill block / of every step block. Never all k + k*k step rows (that [batch, T, vocab] buffer is
  what the design avoids)."""
  B, k = len(PROMPT_LENGTHS), 4
  jaxpr = jax.make_jaxpr(lambda: tidar(params, prompts, PROMPT_LENGTHS, k, sampling=SAMPLED, verify_beta=beta))()
  extra = [] if beta == 1.0 else [(1, B), (2, B * k)]
  assert lm_head_rows(jaxpr.jaxpr) == sorted([(1, B), (1, B * (k - 1)), (2, B * k), (2, B * (k - 1))] + extra)


class _CompileCounter(logging.Handler):
  def __init__(self, name: str):
    super().__init__()
    self.name, self.count = name, 0

  def emit(self, record):
    if f"XLA compilation of jit({self.name})" in record.getMessage():
      self.count += 1


def test_one_compile_per_batch_bucket_and_length(params, prompts):
  """Calls with new prompts of the same bucket (16) reuse one compilation (shared with the batch-of-one
  test when the whole file runs, so the first call may find it compiled already)."""
  counter = _CompileCounter("_generate_tidar")
  logger = logging.getLogger("jax")
  logger.addHandler(counter)
  counts = []
  try:
    with jax.log_compiles():
      for seed, n in [(3, 5), (4, 12), (5, 1)]:
        lengths = np.array([n])
        tidar(params, random_prompts(seed, lengths, CFG.vocab_size, width=n), lengths, 4)
        counts.append(counter.count)
  finally:
    logger.removeHandler(counter)
  assert counts[0] <= 1 and counts[-1] == counts[0], counts


def checkpoint_config(block_size: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"model": {f: getattr(CFG, f) for f in CFG.__dataclass_fields__},
                                    "tidar": {"block_size": block_size, "verify_beta": 1.0}})


def test_config_dict_supplies_block_size(params, prompts, ar):
  out = generate_tidar(params, checkpoint_config(4), prompts[1:2], PROMPT_LENGTHS[1:2], max_new_tokens=M,
                       sampling=GREEDY, key=jax.random.key(0), eos_id=None, mask_id=MASK_ID)
  assert_same_as_ar(out, rows(ar[None], slice(1, 2)))


@pytest.mark.parametrize("kwargs,match", [
    (dict(config=checkpoint_config(8), block_size=4),
     r"block_size=4 does not match the checkpoint's tidar.block_size=8.*pass block_size=8"),
    (dict(block_size=None), r"block_size is required"),
    (dict(prompt_lengths=np.array([3, 9, 0, 14])), r"prompt\(s\) \[2\] are empty"),
    # 14 + 15 + (8 + 64) = 101 slots: the k + k² tokens a step writes count against max_len.
    (dict(block_size=8, max_len=100), r"max_len=100 is too small.*raise max_len to >= 101"),
    (dict(verify_beta=1.5), r"verify_beta=1.5: must lie in \[0, 1\]"),
    (dict(mask_id=-1), r"mask_id=-1 lies outside the vocabulary"),
    (dict(forced_drafts=np.zeros((2, 40), np.int32)), r"forced_drafts must be \[batch=4, positions\]"),
    (dict(hook_data=np.zeros(3, np.int32)), r"hook_data must be \[batch=4, \.\.\.\], got shape \(3,\)"),
    (dict(hooks=(None, None)), r"hooks must be a tidar.StepHooks"),
])
def test_bad_input_is_rejected_before_compiling(params, prompts, kwargs, match):
  args = dict(config=CFG, prompt_lengths=PROMPT_LENGTHS, max_new_tokens=M, sampling=GREEDY, key=jax.random.key(0),
              eos_id=None, mask_id=MASK_ID, block_size=4) | kwargs
  with pytest.raises(ValueError, match=match):
    generate_tidar(params, prompts=prompts, **args)


def test_trace_takes_only_the_steps_it_has_keys_for(params, prompts):
  """The key table holds max_new_tokens - 1 steps; a longer trace would reuse the last step's keys."""
  with pytest.raises(ValueError, match=r"steps=15: must lie in \[1, max_new_tokens=15\)"):
    trace_tidar(params, CFG, prompts, PROMPT_LENGTHS, steps=M, max_new_tokens=M, sampling=GREEDY, key=jax.random.key(0),
                eos_id=None, mask_id=MASK_ID, block_size=4)


@pytest.mark.parametrize("sampling_kwargs,match", [
    (dict(top_p=0.0), r"SamplingParams.top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"SamplingParams.top_p must be in \(0, 1\]"),
    (dict(temperature=-1.0), r"SamplingParams.temperature must be a finite number >= 0"),
])
def test_bad_sampling_settings_are_rejected(params, prompts, sampling_kwargs, match):
  with pytest.raises(ValueError, match=match):
    tidar(params, prompts, PROMPT_LENGTHS, 4, sampling=SamplingParams(**sampling_kwargs))


def test_int8_decode_weights_keep_tidar_greedy_equal_to_ar(params, prompts, ar):
  """model.decode_quant = "int8": both decoders read the same int8 layer matrices, so TiDAR greedy is
  still token for token the AR greedy of that (quantized) model."""
  import dataclasses
  cfg8 = dataclasses.replace(CFG, decode_quant="int8")
  ar8 = generate_ar(params, cfg8, prompts, PROMPT_LENGTHS, max_new_tokens=M_AR, sampling=GREEDY,
                    key=jax.random.key(0), eos_id=None)
  out = generate_tidar(params, cfg8, prompts, PROMPT_LENGTHS, max_new_tokens=M, sampling=GREEDY,
                       key=jax.random.key(0), eos_id=None, mask_id=MASK_ID, block_size=4)
  assert (np.asarray(ar8.tokens) != np.asarray(ar[None].tokens)).any()  # int8 did change the model
  assert_same_as_ar(out, ar8)


@pytest.fixture
def jax_default_precision():
  """JAX's own default matmul precision for one test (conftest sets "highest" for the whole suite)."""
  previous = jax.config.jax_default_matmul_precision
  jax.config.update("jax_default_matmul_precision", None)
  yield
  jax.config.update("jax_default_matmul_precision", previous)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_float32_decode_traces_its_matmuls_in_float32(params, prompts, monkeypatch, jax_default_precision, dtype):
  """On a GPU, JAX computes float32 dots in TF32 by default, which splits greedy TiDAR from greedy AR
  where the top two logits nearly tie: both decoders trace a float32 model under "highest" matmul
  precision (16-bit models under the default). Read at trace time: the CPU computes float32 exactly
  either way."""
  seen = []
  real_emit = loop.emit

  def emit(*args, **kwargs):  # traced once per decoder, inside its jitted loop
    seen.append(jax.config.jax_default_matmul_precision)
    return real_emit(*args, **kwargs)

  monkeypatch.setattr(loop, "emit", emit)
  cfg = dataclasses.replace(CFG, dtype=dtype, param_dtype=dtype)
  cast = jax.tree.map(lambda x: x.astype(dtype), params)
  lengths = jnp.asarray(PROMPT_LENGTHS)
  # max_new_tokens=5: a shape no other test compiles, so both decoders are traced here
  generate_ar(cast, cfg, prompts, lengths, max_new_tokens=5, sampling=GREEDY, key=jax.random.key(0), eos_id=None)
  generate_tidar(cast, cfg, prompts, lengths, max_new_tokens=5, sampling=GREEDY, key=jax.random.key(0),
                 eos_id=None, mask_id=MASK_ID, block_size=4)
  assert len(seen) >= 2 and set(seen) == {"highest" if dtype == "float32" else None}
