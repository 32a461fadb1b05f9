"""Logits processing, greedy verification by hand, and the exactness of the acceptance rule.

The distribution test runs the acceptance rule alone (no model) on fixed small-vocab
distributions p (AR) and q (drafter) that do not depend on context, and checks the emitted
tokens against AR sampling from p; three broken rules (negative controls) must fail that check.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stats
from tidar_jax.decode import sampling
from tidar_jax.decode.sampling import SamplingParams

_verify = jax.jit(sampling.verify, static_argnames="greedy")


def _log(probs) -> jax.Array:
  return jnp.log(jnp.asarray(probs, jnp.float32))


def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  z = x - x.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _kept(logprobs) -> list[list[int]]:
  """Indices of the tokens left with finite log-prob, per row."""
  return [np.flatnonzero(np.isfinite(row)).tolist() for row in np.asarray(logprobs).reshape(-1, logprobs.shape[-1])]


# --- SamplingParams and process_logits ---------------------------------------------------------

@pytest.mark.parametrize("field,kwargs", [
    ("temperature", dict(temperature=-0.5)),
    ("temperature", dict(temperature=float("nan"))),
    ("top_k", dict(top_k=-1)),
    ("top_k", dict(top_k=2.5)),
    ("top_p", dict(top_p=0.0)),
    ("top_p", dict(top_p=1.5)),
])
def test_invalid_params_name_the_field(field, kwargs):
  with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
    SamplingParams(**kwargs)


def test_params_are_a_static_jit_argument():
  params = SamplingParams(temperature=0.7, top_k=3, top_p=0.9)
  assert hash(params) == hash(SamplingParams(temperature=0.7, top_k=3, top_p=0.9))
  fn = jax.jit(sampling.process_logits, static_argnums=1)
  x = jnp.arange(6.0)
  np.testing.assert_array_equal(fn(x, params), sampling.process_logits(x, params))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
def test_temperature_matches_softmax_of_scaled_logits(temperature):
  x = np.random.default_rng(0).normal(size=(2, 3, 7)) * 3
  out = sampling.process_logits(jnp.asarray(x, jnp.bfloat16), SamplingParams(temperature=temperature))
  assert out.dtype == jnp.float32 and out.shape == (2, 3, 7)
  x_bf16 = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
  np.testing.assert_allclose(out, _np_log_softmax(x_bf16 / temperature), rtol=1e-5, atol=1e-5)


def test_top_k_keeps_exactly_k_and_renormalises():
  x = np.random.default_rng(1).normal(size=(4, 10))
  out = np.asarray(sampling.process_logits(jnp.asarray(x, jnp.float32), SamplingParams(top_k=3)))
  top3 = np.sort(np.argsort(-x, axis=-1)[:, :3], axis=-1)
  assert _kept(out) == top3.tolist()
  kept_x = np.where(np.isfinite(out), x, -np.inf)
  np.testing.assert_allclose(np.exp(out), np.exp(_np_log_softmax(kept_x)), atol=1e-6)
  # top_k >= vocab is a no-op
  full = sampling.process_logits(jnp.asarray(x, jnp.float32), SamplingParams(top_k=10))
  np.testing.assert_allclose(full, _np_log_softmax(x), atol=1e-5)


@pytest.mark.parametrize("top_p,kept", [
    (1e-6, [1]),  # never empty: the most likely token always stays
    (0.4, [1]),
    (0.6, [1, 3]),  # 0.5 < 0.6 <= 0.5 + 0.2
    (0.75, [1, 3, 4]),
    (0.9, [0, 1, 3, 4]),
    (1.0, [0, 1, 2, 3, 4]),
])
def test_top_p_keeps_the_minimal_nucleus(top_p, kept):
  probs = np.array([0.1, 0.5, 0.05, 0.2, 0.15])  # unsorted, so the mapping back is tested too
  out = np.asarray(sampling.process_logits(_log(probs), SamplingParams(top_p=top_p)))
  assert _kept(out) == [kept]
  np.testing.assert_allclose(np.exp(out[kept]), probs[kept] / probs[kept].sum(), rtol=1e-5)


def test_top_p_applies_to_the_top_k_renormalised_distribution():
  probs = np.array([0.1, 0.5, 0.05, 0.2, 0.15])
  # top-3 renormalised: 0.59, 0.24, 0.18 -> 0.8 is reached after two tokens (three without
  # renormalising: 0.5 + 0.2 < 0.8).
  out = sampling.process_logits(_log(probs), SamplingParams(top_k=3, top_p=0.8))
  assert _kept(out) == [[1, 3]]


def test_greedy_is_one_hot_at_argmax():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 8)), jnp.float32)
  params = SamplingParams(temperature=0.0, top_k=2, top_p=0.5)
  out = sampling.process_logits(x, params)
  expected = np.where(np.arange(8)[None, :] == np.argmax(x, -1)[:, None], 0.0, -np.inf)
  np.testing.assert_array_equal(out, expected)
  np.testing.assert_array_equal(sampling.sample_logits(jax.random.key(0), x, params), np.argmax(x, -1))
  np.testing.assert_array_equal(sampling.sample(jax.random.key(0), out), np.argmax(x, -1))


# --- verify: hand-made cases -------------------------------------------------------------------

def _peaked(argmaxes, vocab: int) -> jax.Array:
  """Log-probs [..., V] with the given argmax per row (not one-hot, so argmax is really used)."""
  argmaxes = np.asarray(argmaxes)
  logits = np.where(np.arange(vocab) == argmaxes[..., None], 2.0, 0.0) + 0.1 * np.arange(vocab)
  return jnp.asarray(_np_log_softmax(logits), jnp.float32)


def test_greedy_verify_hand_cases():
  V = 5
  p = _peaked([[2, 0, 3, 1]] * 3, V)  # [3 rows, k=4, V]
  q = _peaked([[0, 0, 0]] * 3, V)  # unused by greedy
  drafts = jnp.array([[2, 0, 3],  # all accepted -> bonus argmax p[3]
                      [2, 4, 3],  # first mismatch at index 1 -> argmax p[1]
                      [1, 0, 3]], jnp.int32)  # first draft wrong -> argmax p[0]; later matches don't count
  accepted, next_token = _verify(jax.random.key(0), p, q, drafts, greedy=True)
  assert accepted.dtype == jnp.int32 and next_token.dtype == jnp.int32
  np.testing.assert_array_equal(accepted, [3, 1, 0])
  np.testing.assert_array_equal(next_token, [1, 0, 2])
  # Per row under vmap (how a decoder with per-row keys calls it) gives the same answer.
  keys = jax.random.split(jax.random.key(1), 3)
  a_rows, n_rows = jax.vmap(lambda key, pr, qr, dr: sampling.verify(key, pr, qr, dr, True))(keys, p, q, drafts)
  np.testing.assert_array_equal(a_rows, [3, 1, 0])
  np.testing.assert_array_equal(n_rows, [1, 0, 2])


@pytest.mark.parametrize("greedy", [True, False])
def test_verify_without_drafts(greedy):
  probs = np.array([0.0, 0.1, 0.0, 0.6, 0.3])
  p = jnp.broadcast_to(_log(probs), (4096, 1, 5))  # k = 1
  q = jnp.zeros((4096, 0, 5), jnp.float32)
  drafts = jnp.zeros((4096, 0), jnp.int32)
  accepted, next_token = _verify(jax.random.key(3), p, q, drafts, greedy=greedy)
  np.testing.assert_array_equal(accepted, 0)
  if greedy:
    np.testing.assert_array_equal(next_token, 3)
  else:
    stats.assert_counts_match(np.bincount(next_token, minlength=5), probs, "k=1 next token")


def test_sampling_verify_forced_outcomes():
  n, V = 2048, 4
  key = jax.random.key(4)
  # Row type 1: p puts all mass on each draft, so every draft passes and the bonus is p[2]'s token.
  p_sure = _log([[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
  q_any = _log([[0.25] * 4] * 2)
  a, nxt = _verify(key, jnp.broadcast_to(p_sure, (n, 3, V)), jnp.broadcast_to(q_any, (n, 2, V)),
                           jnp.broadcast_to(jnp.array([1, 2], jnp.int32), (n, 2)), greedy=False)
  np.testing.assert_array_equal(a, 2)
  np.testing.assert_array_equal(nxt, 3)
  # Row type 2: p(d_1) = 0 always rejects, and max(0, p - q) leaves only token 2.
  p_rej = _log([[0, 0.5, 0.5, 0], [0.25] * 4, [0.25] * 4])
  q_rej = _log([[0.5, 0.5, 0, 0], [0.25] * 4])
  a, nxt = _verify(key, jnp.broadcast_to(p_rej, (n, 3, V)), jnp.broadcast_to(q_rej, (n, 2, V)),
                           jnp.broadcast_to(jnp.array([0, 1], jnp.int32), (n, 2)), greedy=False)
  np.testing.assert_array_equal(a, 0)
  np.testing.assert_array_equal(nxt, 2)


def test_zero_residual_falls_back_to_p():
  # p == q, and the draft lies outside both supports: rejected, with no residual mass left.
  n = 2048
  probs = _log([0, 0, 0.3, 0.7])
  p = jnp.broadcast_to(probs, (n, 2, 4))
  q = jnp.broadcast_to(probs, (n, 1, 4))
  a, nxt = _verify(jax.random.key(5), p, q, jnp.zeros((n, 1), jnp.int32), greedy=False)
  np.testing.assert_array_equal(a, 0)
  assert set(np.unique(nxt).tolist()) == {2, 3}


# --- verify: the emitted tokens follow AR sampling from p --------------------------------------

V, K, N = 6, 4, 2**17


def _distributions(params: SamplingParams, seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """p [K, V] with distinct rows; q [K-1, V] a noisy drafter of p; q_other [K-1, V] unrelated."""
  rng = np.random.default_rng(seed)
  p_logits = rng.normal(size=(K, V)) * 1.5
  q_logits = p_logits[:-1] + rng.normal(size=(K - 1, V))
  other_logits = rng.normal(size=(K - 1, V)) * 1.5
  process = lambda x: sampling.process_logits(jnp.asarray(x, jnp.float32), params)
  return process(p_logits), process(q_logits), process(other_logits)


def _simulate(key, p, q_verify, q_draw):
  """N independent steps: drafts ~ q_draw, then verify against (p, q_verify)."""
  key_draft, key_verify = jax.random.split(key)
  drafts = sampling.sample(key_draft, jnp.broadcast_to(q_draw, (N, K - 1, V)))  # [N, K-1]
  # Eager on purpose: the controls monkeypatch sampling's helpers, which a cached jit trace would
  # not see (and the op-by-op kernels are shared by all five simulations).
  accepted, next_token = sampling.verify(key_verify, jnp.broadcast_to(p, (N, K, V)),
                                         jnp.broadcast_to(q_verify, (N, K - 1, V)), drafts, greedy=False)
  return np.asarray(drafts), np.asarray(accepted), np.asarray(next_token)


def _probs(logprobs) -> np.ndarray:
  probs = np.exp(np.asarray(logprobs, np.float64))
  return probs / probs.sum(-1, keepdims=True)


def _law_checks(drafts, accepted, next_token, p, q) -> dict[str, stats.CountCheck]:
  """Every law AR sampling from context-independent p implies, checked on one simulation."""
  p, q = _probs(p), _probs(q)
  # P(a >= j) = prod_{i<j} sum_x min(p_i, q_i): each draft passes independently of the others.
  alpha = np.minimum(p[:-1], q).sum(-1)  # [K-1]
  at_least = np.append(np.cumprod(np.append(1.0, alpha)), 0.0)  # P(a >= j), j = 0..K
  checks = {"accepted count": stats.check_counts(np.bincount(accepted, minlength=K),
                                                 at_least[:-1] - at_least[1:])}
  # Emitted token j+1 (emitted iff a >= j): draft d_{j+1} if j < a, else the residual/bonus draw.
  j = np.arange(K)[None, :]
  padded = np.concatenate([drafts, np.full((len(drafts), 1), -1)], axis=1)  # [N, K]
  emitted = np.where(j < accepted[:, None], padded, next_token[:, None])  # valid where j <= a
  for i in range(K):
    rows = accepted >= i
    checks[f"token {i + 1}"] = stats.check_counts(np.bincount(emitted[rows, i], minlength=V), p[i])
  # Token 2 must follow p_1 whatever token 1 was: given a >= 1, token 1 is an accepted draft
  # (law min(p_0, q_0) / alpha_0) and token 2 is independent of it.
  rows = accepted >= 1
  checks["tokens 1,2 joint"] = stats.check_counts(
      np.bincount(emitted[rows, 0] * V + emitted[rows, 1], minlength=V * V),
      np.outer(np.minimum(p[0], q[0]) / alpha[0], p[1]))
  return checks


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.8, top_k=4, top_p=0.9)],
                         ids=["plain", "processed"])
def test_acceptance_rule_reproduces_ar_sampling(params):
  p, q, _ = _distributions(params)
  checks = _law_checks(*_simulate(jax.random.key(10), p, q, q), p, q)
  failed = {name: c.message for name, c in checks.items() if not c}
  assert not failed, failed


def _controls(monkeypatch):
  """p, q and the three broken rules, each a thunk that runs `_simulate` with that one bug."""
  p, q, q_other = _distributions(SamplingParams())
  key = jax.random.key(11)

  def always_accept():
    monkeypatch.setattr(sampling, "_accept", lambda log_u, logp_d, logq_d: jnp.ones(log_u.shape, bool))
    return _simulate(key, p, q, q)

  def residual_from_p():
    monkeypatch.setattr(sampling, "_residual_logprobs", lambda logp, logq: logp)
    return _simulate(key, p, q, q)

  def wrong_q():  # drafts come from q_other, verify is told q
    return _simulate(key, p, q, q_other)

  return p, q, {"always accept": always_accept, "residual from p": residual_from_p, "wrong q": wrong_q}


@pytest.mark.parametrize("control", ["always accept", "residual from p", "wrong q"])
def test_broken_acceptance_rules_fail_the_check(monkeypatch, control):
  p, q, controls = _controls(monkeypatch)
  checks = _law_checks(*controls[control](), p, q)
  # The first emitted token is the law every broken rule gets wrong (the accepted-count law
  # stays right when only the residual is broken).
  assert not checks["token 1"], checks["token 1"].message


# --- the statistics helper itself --------------------------------------------------------------

def test_stats_helper():
  np.testing.assert_allclose(stats.chi2_sf(3.841, 1), 0.05, rtol=1e-3)
  np.testing.assert_allclose(stats.chi2_sf(11.07, 5), 0.05, rtol=1e-3)
  probs = np.array([0.5, 0.3, 0.2, 0.0])
  counts = np.bincount(np.random.default_rng(0).choice(4, size=100_000, p=probs), minlength=4)
  assert stats.check_counts(counts, probs)
  assert not stats.check_counts(counts, [0.48, 0.32, 0.2, 0.0])  # 2% off is far outside noise
  assert not stats.check_counts(counts + np.array([0, 0, 0, 1]), probs)  # an impossible outcome
  with pytest.raises(AssertionError, match="toy"):
    stats.assert_counts_match(counts, [0.2, 0.3, 0.5, 0.0], "toy")
