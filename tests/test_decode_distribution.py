"""TiDAR sampling emits exactly the AR law: end-to-end through the decoder, on a tiny-vocab model.

A random 8-token model whose AR and diffusion distributions both depend on the context decodes
2^17 rows (one compiled program, one key per row) with k = 3 and max_new_tokens = 3. Two laws are
checked against exact values computed by enumeration with uncached forwards over every prefix:
- the joint law of the first 3 generated tokens == the AR law with the same logits processing;
- the acceptance outcome: a1 (accepted drafts in the first step) when a1 >= 1 (the row is then
  done), else (a1 = 0, a2) from the second step, whose drafts come from block 0 of the first.
Broken decoders (`_fault`) must fail the same check: that is what shows 2^17 samples suffice.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stats
from test_decode_ar import random_params
from tidar_jax import masks
from tidar_jax.config import ModelConfig
from tidar_jax.decode.sampling import SamplingParams, process_logits
from tidar_jax.decode.tidar import generate_tidar
from tidar_jax.model import Transformer

V = 8
CFG = ModelConfig(vocab_size=V, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32)
MASK_ID = V - 1
K = 3
NEW = 3
PROMPT = np.array([2, 5])
N_SAMPLES = 2**17
TOP_K = SamplingParams(temperature=1.0, top_k=5)
TOP_P = SamplingParams(temperature=1.0, top_p=0.8)
OUTCOMES = ("a1=1", "a1=2", "a1=0,a2=0", "a1=0,a2=1", "a1=0,a2=2")
PARAMS = dict(seed=3, std=0.3)
CONTROLS = ("always_accept", "residual_from_p", "wrong_q", "wrong_block")
CONTROL_SAMPLES = 2**15  # per broken decoder: failing with fewer samples than N_SAMPLES is the stronger result
CHUNK = 2**14  # rows per decoder call (see `decode`)


@pytest.fixture(scope="module")
def params():
  return random_params(CFG, **PARAMS)


def decode(params, sampling: SamplingParams, faults: list[str]):
  """(first 3 tokens [rows, 3], acceptance outcome index [rows]) of one batched TiDAR run, one row
  per entry of `faults` ("" = the correct decoder), one key per row. The rows are decoded CHUNK at a
  time by one compiled program (the fault-knob one for every chunk if any row is broken): one call
  over all 2^17-2^18 rows peaks near 20 GB of host memory (cache slots are padded to 128), a chunk
  under 2 GB, at the same rows per second."""
  rows, n = len(faults), len(PROMPT)
  assert rows % CHUNK == 0, rows
  keys = jax.random.split(jax.random.key(11), rows)
  knob = any(faults)
  chunks = []
  for a in range(0, rows, CHUNK):
    out = generate_tidar(params, CFG, np.broadcast_to(PROMPT, (CHUNK, n)), np.full(CHUNK, n), max_new_tokens=NEW,
                         sampling=sampling, key=keys[a:a + CHUNK], eos_id=None, mask_id=MASK_ID, block_size=K,
                         max_len=n + NEW + K + K * K, _faults=faults[a:a + CHUNK] if knob else None)
    chunks.append([np.asarray(x) for x in (out.tokens, out.lengths, out.stats.accepted_hist)])
  tokens, lengths, hist = (np.concatenate(x) for x in zip(*chunks))  # hist [rows, K]
  steps = hist.sum(1)
  assert np.all(lengths == NEW) and set(np.unique(steps)) <= {1, 2}
  assert np.all(hist[steps == 1, 0] == 0)  # a1 = 0 leaves 2 < 3 tokens: a second step always follows
  a2 = np.where(hist[:, 0] == 2, 0, np.argmax(hist[:, 1:], axis=1) + 1)
  outcome = np.where(steps == 1, np.argmax(hist, axis=1) - 1, 2 + a2)
  return tokens, outcome


@jax.jit
def model_logits(params):
  """Uncached forwards for the enumeration: (ar [V^4, 5, V]: position n-1+j of every 4-token
  continuation s predicts after prompt + s_1..s_j; q [K-1, V]: the prefill block's drafting offsets;
  Q [V, K-1, V]: the same for block 0 of step 1, after prompt + t0, which drafts step 2)."""
  model = Transformer(CFG)
  n = len(PROMPT)
  seqs = jnp.asarray(list(itertools.product(range(V), repeat=4)))  # [V^4, 4], lexicographic
  tokens = jnp.concatenate([jnp.broadcast_to(jnp.asarray(PROMPT), (len(seqs), n)), seqs], axis=1)
  pos = jnp.broadcast_to(jnp.arange(n + 4)[None, :], tokens.shape)
  logits, _ = model.apply(params, tokens, pos, jnp.asarray(masks.causal_mask(n + 4))[None])

  def block_logits(prefix):  # K masks after prompt + prefix [rows, j], which they see -> [rows, K-1, V]
    rows, j = prefix.shape
    toks = jnp.concatenate([jnp.broadcast_to(jnp.asarray(PROMPT), (rows, n)), prefix,
                            jnp.full((rows, K), MASK_ID)], axis=1)
    pos = jnp.broadcast_to(jnp.arange(n + j + K)[None, :], toks.shape)
    return model.apply(params, toks, pos, jnp.asarray(masks.prefill_mask(n + j, K))[None])[0][:, n + j + 1:]

  return logits[:, n - 1:], block_logits(jnp.zeros((1, 0), jnp.int32))[0], block_logits(jnp.arange(V)[:, None])


@functools.cache  # per sampling setting
def exact_laws(sampling: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
  """(joint law of the first 3 tokens [V^3], acceptance outcome law [5]) by enumeration."""
  logits = model_logits(random_params(CFG, **PARAMS))
  ar, q, Q = (np.exp(np.asarray(process_logits(x, sampling), np.float64)) for x in logits)
  ar = ar.reshape((V,) * 4 + (5, V))  # [s1..s4, j, next]

  def p(j):  # p(. | prompt, s_1..s_j) as [V]*j + [V]
    return ar[(slice(None),) * j + (0,) * (4 - j) + (j,)]

  p0, p1, p2, p3 = p(0), p(1), p(2), p(3)
  tokens_law = p0[:, None, None] * p1[:, :, None] * p2
  # Step 1: t0 ~ p0; drafts d1, d2 ~ q independently; each accepted w.p. min(1, p/q) in turn.
  ok1 = np.minimum(q[0][None, :], p1)  # [t0, d1]
  ok2 = np.minimum(q[1][None, None, :], p2)  # [t0, d1, d2]
  ge1 = np.einsum("t,td->", p0, ok1)
  ge2 = np.einsum("t,td,tde->", p0, ok1, ok2)
  # a1 = 0 with next token x: p0(t0) * max(0, p1(x) - q1(x)); then step 2 with drafts from Q[t0].
  reject = p0[:, None] * np.maximum(p1 - q[0][None, :], 0.0)  # [t0, x]
  ok1b = np.minimum(Q[:, None, 0, :], p2)  # [t0, x, e1]
  ok2b = np.minimum(Q[:, None, None, 1, :], p3)  # [t0, x, e1, e2]
  ge1b = np.einsum("tx,txe->", reject, ok1b)
  ge2b = np.einsum("tx,txe,txef->", reject, ok1b, ok2b)
  outcome_law = np.array([ge1 - ge2, ge2, reject.sum() - ge1b, ge1b - ge2b, ge2b])
  return tokens_law.ravel(), outcome_law


def check(tokens, outcome, sampling) -> tuple[stats.CountCheck, stats.CountCheck]:
  """(first-3-tokens check, acceptance-outcome check) of decoded rows against the exact laws."""
  tokens_law, outcome_law = exact_laws(sampling)
  joint = tokens[:, 0] * V * V + tokens[:, 1] * V + tokens[:, 2]
  return (stats.check_counts(np.bincount(joint, minlength=V**3), tokens_law),
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
  assert tokens_check, f"first 3 tokens: {tokens_check.message}"
  assert outcome_check, f"acceptance outcomes {OUTCOMES}: {outcome_check.message}"
  assert exact_laws(sampling)[1].min() > 0.02  # every acceptance path is exercised


def test_top_k_sampling_has_the_exact_ar_law(top_k_rows):
  assert_exact(*top_k_rows[""], TOP_K)


def test_top_p_sampling_has_the_exact_ar_law(params):
  """Through the production program (no fault knob compiled in)."""
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
