"""TiDAR sampling emits exactly the AR law: end-to-end through the decoder, on a tiny-vocab model.

A random 8-token model whose AR and diffusion distributions both depend on the context decodes
2^17 rows (one key per row) with k = 3 for three steps: `trace_tidar` runs the loop's own steps and
returns the state after each, which is how the accepted count of each step is read. Two laws are
checked against exact values computed by enumeration with uncached forwards over every prefix,
processed by `stats.decoding_law` (numpy, independent of `sampling.process_logits`):
- the joint law of the first 4 generated tokens == the AR law. Three steps emit at least 4
  tokens; when the first step accepts both drafts, token 4 is its bonus token;
- the joint law of (a1, a2), the drafts accepted by the first and the second step. The second
  step's drafts come from block a1 of the first, so drafting from another block changes this law
  while the token law stays exact (any proposal with its own q is exact).
Broken decoders (`decode_faults`) must fail the same check: that is what shows 2^17 samples suffice.

Pruned pre-drafting (`predraft=(1,)`: only block 1 is fed) takes every path of the fallback rule:
a1 = 0 has no draft (the second step is a plain AR step: its token is the bonus sample from p, token
3), a1 = 1 drafts from its own block, a1 = 2 from block 1 shifted by one (one valid draft); the same
two laws hold, and judging the fallback drafts with a wrong q (`fallback_q`) breaks them.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stats
from decode_faults import faulty
from test_decode_ar import random_params
from tidar_jax import masks, predraft
from tidar_jax.config import ModelConfig
from tidar_jax.decode.sampling import SamplingParams
from tidar_jax.decode.tidar import trace_tidar
from tidar_jax.model import Transformer

V = 8
CFG = ModelConfig(vocab_size=V, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32)
MASK_ID = V - 1
K = 3
STEPS = 3  # decoder steps per row: each emits 1 .. K tokens, so three emit at least TOKENS
TOKENS = 4  # generated tokens whose joint law is checked (token 4 is the bonus when a1 = K - 1)
NEW = 1 + STEPS * K  # max_new_tokens: no row ends within STEPS steps (a finished row stops counting a)
PROMPT = np.array([2, 5])
CONTEXT = 5  # AR tokens after the prompt the laws need: a1 = 2 verifies e_2 after t_0 d_1 d_2 x e_1
N_SAMPLES = 2**17
TOP_K = SamplingParams(temperature=1.0, top_k=5)
TOP_P = SamplingParams(temperature=1.0, top_p=0.8)
OUTCOMES = tuple(f"a1={a1},a2={a2}" for a1 in range(K) for a2 in range(K))
PARAMS = dict(seed=3, std=0.3)
CONTROLS = ("always_accept", "residual_from_p", "wrong_q", "wrong_block")
CONTROL_SAMPLES = 2**15  # per broken decoder: failing with fewer samples than N_SAMPLES is the stronger result
CHUNK = 2**14  # rows per decoder call (see `decode`)


@pytest.fixture(scope="module")
def params():
  return random_params(CFG, **PARAMS)


def decode(params, sampling: SamplingParams, faults: list[str], kept=None):
  """(first TOKENS tokens [rows, TOKENS], outcome index a1 * K + a2 [rows]) of one batched TiDAR run,
  one row per entry of `faults` ("" = the correct decoder), one key per row. The rows are decoded
  CHUNK at a time by one compiled program (the fault-knob one for every chunk if any row is broken):
  one call over all 2^17-2^18 rows peaks near 20 GB of host memory (cache slots are padded to 128),
  a chunk under 2 GB, at the same rows per second."""
  rows, n = len(faults), len(PROMPT)
  assert rows % CHUNK == 0, rows
  keys = jax.random.split(jax.random.key(11), rows)
  knob = any(faults)
  chunks = []
  for a in range(0, rows, CHUNK):
    trace = trace_tidar(params, CFG, np.broadcast_to(PROMPT, (CHUNK, n)), np.full(CHUNK, n), steps=STEPS,
                        max_new_tokens=NEW, sampling=sampling, key=keys[a:a + CHUNK], eos_id=None, mask_id=MASK_ID,
                        block_size=K, max_len=n + NEW + K + K * K, predraft=kept or "all",
                        **(faulty(faults[a:a + CHUNK]) if knob else {}))
    per_step = np.diff(np.asarray(trace.accepted_hist), axis=0)  # [STEPS, CHUNK, K]: one-hot at each step's a
    assert np.all(per_step.sum(-1) == 1) and np.all(np.asarray(trace.generated[-1]) >= TOKENS)
    chunks.append((np.asarray(trace.out[-1, :, :TOKENS]), per_step[0].argmax(-1) * K + per_step[1].argmax(-1)))
  tokens, outcome = (np.concatenate(x) for x in zip(*chunks))
  return tokens, outcome


@jax.jit
def model_logits(params):
  """Uncached forwards for the enumeration: (ar [V^CONTEXT, CONTEXT + 1, V]: index j of every
  continuation s gives the AR logits after prompt + s_1..s_j; blocks: for j = 0 .. K, [V^j, K-1, V],
  the drafting offsets 1 .. K-1 of K masks after prompt + j tokens, every prefix of j tokens in
  lexicographic order: j = 0 is the prefill's block, j = a + 1 block a of the first step)."""
  model = Transformer(CFG)
  n = len(PROMPT)
  seqs = jnp.asarray(list(itertools.product(range(V), repeat=CONTEXT)))  # [V^CONTEXT, CONTEXT]
  tokens = jnp.concatenate([jnp.broadcast_to(jnp.asarray(PROMPT), (len(seqs), n)), seqs], axis=1)
  pos = jnp.broadcast_to(jnp.arange(n + CONTEXT)[None, :], tokens.shape)
  logits, _ = model.apply(params, tokens, pos, jnp.asarray(masks.causal_mask(n + CONTEXT))[None])

  def block_logits(j):  # K masks after prompt + every prefix of j tokens, which they see -> [V^j, K-1, V]
    prefix = jnp.asarray(list(itertools.product(range(V), repeat=j)), jnp.int32).reshape(V**j, j)
    toks = jnp.concatenate([jnp.broadcast_to(jnp.asarray(PROMPT), (V**j, n)), prefix,
                            jnp.full((V**j, K), MASK_ID)], axis=1)
    pos = jnp.broadcast_to(jnp.arange(n + j + K)[None, :], toks.shape)
    return model.apply(params, toks, pos, jnp.asarray(masks.prefill_mask(n + j, K))[None])[0][:, n + j + 1:]

  return logits[:, n - 1:], [block_logits(j) for j in range(K + 1)]


def first_step(p, q, a: int) -> np.ndarray:
  """P(a1 = a, t_0, d_1 .. d_a, next token x) as [V]^(a+2): t_0 ~ p(0); draft d_i ~ q[i-1] passes with
  min(1, p/q), so (draw and pass) has mass min(q, p); a rejection then draws x ~ max(0, p - q), whose
  mass is also the rejection's probability; after all K-1 drafts x is the bonus ~ p."""
  w = p(0)
  for i in range(1, a + 1):
    w = w[..., None] * np.minimum(q[i - 1], p(i))
  return w[..., None] * (p(a + 1) if a == K - 1 else np.maximum(p(a + 1) - q[a], 0.0))


def second_step_at_least(p, q, drafters, a: int, kept: tuple[int, ...]) -> np.ndarray:
  """[P(a1 = a, a2 >= b) for b = 0 .. K-1]: the second step verifies t_0' = x, then its valid drafts
  e_i: from block a of the first step (it saw t_0 d_1 .. d_a), or, when a's block was pruned, from the
  kept block of the largest count a' < a at offsets shifted by a - a' (it saw t_0 .. d_a'), k-1-(a-a')
  of them; none when no kept count is <= a. drafters[j] is [V]^j + [K-1, V]."""
  w = first_step(p, q, a)  # [V]^(a+2): t_0 d_1 .. d_a, x
  source, n_valid = predraft.fallback(kept, K)
  at_least = [w.sum()]
  for i in range(1, K):
    if i > n_valid[a]:  # acceptance stops at the valid drafts
      at_least.append(0.0)
      continue
    a_src = kept[source[a]]
    block = drafters[a_src + 1]
    # e_i's law; d_{a'+1} .. d_a, x and e_1 .. e_{i-1} broadcast
    e = block[..., a - a_src + i - 1, :].reshape(block.shape[:a_src + 1] + (1,) * (a - a_src + i) + (V,))
    w = w[..., None] * np.minimum(e, p(a + 1 + i))
    at_least.append(w.sum())
  return np.array(at_least)


@functools.cache  # per sampling setting and kept blocks
def exact_laws(sampling: SamplingParams, kept: tuple[int, ...] = tuple(range(K))) -> tuple[np.ndarray, np.ndarray]:
  """(joint law of the first TOKENS tokens [V^TOKENS], (a1, a2) law [K * K]) by enumeration."""
  ar, blocks = model_logits(random_params(CFG, **PARAMS))
  ar = stats.decoding_law(ar, sampling).reshape((V,) * CONTEXT + (CONTEXT + 1, V))  # [s_1..s_5, j, next]
  drafters = [stats.decoding_law(b, sampling).reshape((V,) * j + (K - 1, V)) for j, b in enumerate(blocks)]

  def p(j):  # p(. | prompt, s_1..s_j) as [V]*j + [V]
    return ar[(slice(None),) * j + (0,) * (CONTEXT - j) + (j,)]

  tokens_law = p(0)
  for j in range(1, TOKENS):
    tokens_law = tokens_law[..., None] * p(j)
  q = drafters[0]  # the prefill's drafts, independent of t_0
  outcome_law = np.concatenate([-np.diff(np.append(second_step_at_least(p, q, drafters, a, kept), 0.0))
                                for a in range(K)])
  return tokens_law.ravel(), outcome_law


def check(tokens, outcome, sampling, kept=tuple(range(K))) -> tuple[stats.CountCheck, stats.CountCheck]:
  """(first-tokens check, acceptance-outcome check) of decoded rows against the exact laws."""
  tokens_law, outcome_law = exact_laws(sampling, kept)
  joint = np.ravel_multi_index(tuple(tokens.T), (V,) * TOKENS)
  return (stats.check_counts(np.bincount(joint, minlength=V**TOKENS), tokens_law),
          stats.check_counts(np.bincount(outcome, minlength=len(OUTCOMES)), outcome_law))


@pytest.fixture(scope="module")
def top_k_rows(params):
  """One batched run: N_SAMPLES correct rows, then CONTROL_SAMPLES rows per broken decoder (rows are
  independent: batch invariance is tested in test_decode_tidar.py). {fault: (tokens, outcomes)}."""
  groups = [("", N_SAMPLES)] + [(fault, CONTROL_SAMPLES) for fault in CONTROLS]
  tokens, outcome = decode(params, TOP_K, [fault for fault, rows in groups for _ in range(rows)])
  bounds = np.cumsum([0] + [rows for _, rows in groups])
  return {fault: (tokens[a:b], outcome[a:b]) for (fault, _), a, b in zip(groups, bounds[:-1], bounds[1:])}


def assert_exact(tokens, outcome, sampling):
  tokens_check, outcome_check = check(tokens, outcome, sampling)
  assert tokens_check, f"first {TOKENS} tokens: {tokens_check.message}"
  assert outcome_check, f"acceptance outcomes {OUTCOMES}: {outcome_check.message}"
  assert exact_laws(sampling)[1].min() > 0.05  # every (a1, a2) is exercised, the bonus path (a1 = K-1) too


def test_top_k_sampling_has_the_exact_ar_law(top_k_rows):
  assert_exact(*top_k_rows[""], TOP_K)


def test_top_p_sampling_has_the_exact_ar_law(params):
  """The program without the fault knob compiled in."""
  assert_exact(*decode(params, TOP_P, [""] * N_SAMPLES), TOP_P)


@pytest.mark.parametrize("fault,broken", [
    ("always_accept", "tokens"),
    ("residual_from_p", "tokens"),
    ("wrong_q", "tokens"),
    ("wrong_block", "acceptance"),  # any proposal with its own q keeps the token law; its acceptance law differs
])
def test_broken_decoders_fail_the_same_check(top_k_rows, fault, broken):
  """Each control fails with a quarter of the samples; the check only gets stricter with more."""
  tokens_check, outcome_check = check(*top_k_rows[fault], TOP_K)
  assert not (tokens_check and outcome_check)
  assert not {"tokens": tokens_check, "acceptance": outcome_check}[broken], (tokens_check.message,
                                                                             outcome_check.message)


PRUNED = (1,)  # one kept block: every fallback path at K = 3


@pytest.fixture(scope="module")
def pruned_rows(params):
  """N_SAMPLES correct rows and CONTROL_SAMPLES fallback_q rows, decoded with only block 1 kept."""
  faults = [""] * N_SAMPLES + ["fallback_q"] * CONTROL_SAMPLES
  tokens, outcome = decode(params, TOP_K, faults, kept=PRUNED)
  return {"": (tokens[:N_SAMPLES], outcome[:N_SAMPLES]), "fallback_q": (tokens[N_SAMPLES:], outcome[N_SAMPLES:])}


def test_pruned_predrafting_has_the_exact_ar_law(pruned_rows):
  tokens, outcome = pruned_rows[""]
  tokens_check, outcome_check = check(tokens, outcome, TOP_K, PRUNED)
  assert tokens_check, f"first {TOKENS} tokens: {tokens_check.message}"
  assert outcome_check, f"acceptance outcomes {OUTCOMES}: {outcome_check.message}"
  law = exact_laws(TOP_K, PRUNED)[1].reshape(K, K)  # the fallback paths are exercised:
  assert law[0, 0] > 0.05 and law[0, 1:].sum() == 0  # a1 = 0: no draft, a plain AR step
  assert law[2, 1] > 0.05 and law[2, 2] == 0  # a1 = 2: one valid draft, accepted or not, never two
  assert not np.allclose(law, exact_laws(TOP_K)[1].reshape(K, K), atol=0.01)  # pruning changes acceptance


def test_pruned_fallback_judged_with_a_wrong_q_fails_the_check(pruned_rows):
  tokens_check, outcome_check = check(*pruned_rows["fallback_q"], TOP_K, PRUNED)
  assert not (tokens_check and outcome_check)
