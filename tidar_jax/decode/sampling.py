"""Logits processing and the draft acceptance rule (docs/method.md §2).

`process_logits` turns raw logits into the distribution a decoder samples from (temperature,
then top-k, then top-p). The verifier's `p` (AR) and the drafter's `q` (diffusion) must both go
through it with the same `SamplingParams`: the rejection rule in `verify` then emits tokens with
exactly the law of AR sampling under those settings.

Everything works on leading batch dimensions `[...]`, so a decoder can call these batched or
`vmap` them per row with per-row keys.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """Decoding distribution settings; frozen and hashable so it can be a static jit argument."""

  temperature: float = 1.0  # 0 = greedy (argmax; top_k and top_p then change nothing)
  top_k: int = 0  # keep the k most likely tokens; 0 = off
  top_p: float = 1.0  # nucleus mass in (0, 1]; 1 = off

  def __post_init__(self) -> None:
    self.validate()

  def validate(self) -> None:
    if not (isinstance(self.temperature, numbers.Real) and math.isfinite(self.temperature)
            and self.temperature >= 0):
      raise ValueError(f"SamplingParams.temperature must be a finite number >= 0 (0 = greedy), "
                       f"got {self.temperature!r}; pass e.g. temperature=1.0, or 0 for greedy.")
    if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral) or self.top_k < 0:
      raise ValueError(f"SamplingParams.top_k must be an int >= 0 (0 = off), got {self.top_k!r}; "
                       f"pass e.g. top_k=50, or 0 to disable.")
    if not (isinstance(self.top_p, numbers.Real) and 0.0 < self.top_p <= 1.0):
      raise ValueError(f"SamplingParams.top_p must be in (0, 1] (1 = off), got {self.top_p!r}; "
                       f"pass e.g. top_p=0.9, or 1.0 to disable.")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def process_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
  """Raw logits [..., V] -> fp32 log-probs [..., V] of the decoding distribution.

  Order: temperature, top-k, top-p on the top-k-renormalised distribution (the usual
  HF/vLLM order). Removed tokens get -inf. Ties at a top-k/top-p boundary are all kept, so the
  kept set depends only on the logit values (not on sort order), as the p/q symmetry needs.
  Greedy (temperature 0) gives a one-hot distribution at the argmax (first index on ties).
  """
  x = logits.astype(jnp.float32)  # [..., V]
  vocab = x.shape[-1]
  if params.greedy:
    top = jnp.argmax(x, axis=-1)  # [...]
    one_hot = jax.lax.broadcasted_iota(top.dtype, x.shape, x.ndim - 1) == top[..., None]  # [..., V]
    return jnp.where(one_hot, 0.0, -jnp.inf)
  if params.temperature != 1.0:
    x = x / params.temperature
  if 0 < params.top_k < vocab:
    kth = jax.lax.top_k(x, params.top_k)[0][..., -1:]  # [..., 1] smallest kept logit
    x = jnp.where(x >= kth, x, -jnp.inf)
  if params.top_p < 1.0:
    x = _top_p(x, params.top_p)
  return jax.nn.log_softmax(x, axis=-1)


def _top_p(x: jax.Array, top_p: float) -> jax.Array:
  """Keep the smallest set of most likely tokens whose probability reaches top_p (>= 1 token)."""
  sorted_x = jnp.flip(jnp.sort(x, axis=-1), axis=-1)  # [..., V] descending
  sorted_probs = jax.nn.softmax(sorted_x, axis=-1)
  # A token is needed iff the mass strictly before it is still short of top_p; the first token
  # always is (0 < top_p), so the nucleus is never empty.
  mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # [..., V]
  n_keep = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # [..., 1], >= 1
  threshold = jnp.take_along_axis(sorted_x, n_keep - 1, axis=-1)  # [..., 1]
  return jnp.where(x >= threshold, x, -jnp.inf)


def sample(key: jax.Array, logprobs: jax.Array) -> jax.Array:
  """One categorical draw per row: log-probs [..., V] (unnormalised is fine) -> int32 [...]."""
  return jax.random.categorical(key, logprobs, axis=-1).astype(jnp.int32)


def sample_logits(key: jax.Array, logits: jax.Array, params: SamplingParams) -> jax.Array:
  """Raw logits [..., V] -> int32 [...] under `params`; greedy skips the softmax entirely."""
  if params.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return sample(key, process_logits(logits, params))


def verify(key: jax.Array, p_logprobs: jax.Array, q_logprobs: jax.Array, drafts: jax.Array,
           greedy: bool, n_valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Accept a prefix of the drafts and pick the next committed token, for every row at once.

  Verification index i (0..k-1) holds `[t_0, d_1 .. d_{k-1}]`; `p_logprobs[..., i, :]` is the
  target distribution of the position after index i, so draft `drafts[..., i]` (= d_{i+1}) is
  judged against `p[..., i]` and was drawn from `q[..., i]`.

  Args:
    key: one PRNG key; split here for the acceptance uniforms and the residual/bonus draw (all
      rows get independent draws). Unused when greedy.
    p_logprobs: [..., k, V] target (AR) log-probs, after `process_logits`.
    q_logprobs: [..., k-1, V] draft (diffusion) log-probs the drafts were drawn from, after the
      same `process_logits`.
    drafts: [..., k-1] int32.
    greedy: accept while the draft equals argmax p; otherwise the exact rejection rule
      (accept with prob min(1, p/q), resample from normalize(max(0, p - q)) at the first
      rejection, bonus sample from p[..., k-1] if all drafts pass).
    n_valid: [...] int32, how many leading drafts are proposals (None: all k-1). Acceptance stops
      there: if the first n_valid drafts all pass, the next token is a plain sample from
      p[..., n_valid] (the bonus), exactly as if the drafts after them did not exist.

  Returns:
    accepted: [...] int32 in 0..k-1, the number of leading drafts accepted (a).
    next_token: [...] int32, the token committed after d_a (position p+a+1).
  """
  k = p_logprobs.shape[-2]
  if q_logprobs.shape[-2] != k - 1 or drafts.shape[-1] != k - 1:
    raise ValueError(f"verify needs p [..., k, V], q [..., k-1, V], drafts [..., k-1]; got p "
                     f"{p_logprobs.shape}, q {q_logprobs.shape}, drafts {drafts.shape}.")
  logp = p_logprobs.astype(jnp.float32)  # [..., k, V]
  logq = q_logprobs.astype(jnp.float32)  # [..., k-1, V]
  drafts = drafts.astype(jnp.int32)

  valid = True if n_valid is None else jnp.arange(k - 1) < n_valid[..., None]  # [..., k-1]

  if greedy:
    target = jnp.argmax(logp, axis=-1).astype(jnp.int32)  # [..., k]
    accepted = _leading_true((drafts == target[..., :-1]) & valid)  # [...]
    next_token = jnp.take_along_axis(target, accepted[..., None], axis=-1)[..., 0]
    return accepted, next_token

  key_accept, key_next = jax.random.split(key)
  logp_d = jnp.take_along_axis(logp[..., :-1, :], drafts[..., None], axis=-1)[..., 0]  # [..., k-1]
  logq_d = jnp.take_along_axis(logq, drafts[..., None], axis=-1)[..., 0]  # [..., k-1]
  log_u = jnp.log(jax.random.uniform(key_accept, drafts.shape, jnp.float32))  # [..., k-1]
  accepted = _leading_true(_accept(log_u, logp_d, logq_d) & valid)  # [...]

  # Row a of p and q; q gets a zero-mass row at k-1, so when all drafts pass the residual is
  # p[..., k-1] itself: the bonus sample needs no separate branch.
  logq_ext = jnp.concatenate([logq, jnp.full_like(logp[..., :1, :], -jnp.inf)], axis=-2)  # [..., k, V]
  index = accepted[..., None, None]  # [..., 1, 1]
  logp_a = jnp.take_along_axis(logp, index, axis=-2)[..., 0, :]  # [..., V]
  logq_a = jnp.take_along_axis(logq_ext, index, axis=-2)[..., 0, :]  # [..., V]
  if n_valid is not None:  # stopped at the last valid draft: no proposal there, the bonus is p itself
    logq_a = jnp.where((accepted >= n_valid)[..., None], -jnp.inf, logq_a)
  residual = _residual_logprobs(logp_a, logq_a)  # [..., V]
  # p == q leaves no residual mass (a rejection there has probability zero, but a draft outside
  # both supports gets there); fall back to p rather than sampling from all -inf.
  has_mass = jnp.any(residual > -jnp.inf, axis=-1, keepdims=True)  # [..., 1]
  next_token = sample(key_next, jnp.where(has_mass, residual, logp_a))
  return accepted, next_token


def _leading_true(flags: jax.Array) -> jax.Array:
  """bool [..., n] -> int32 [...]: length of the all-True prefix (the first False stops it)."""
  return jnp.sum(jnp.cumprod(flags.astype(jnp.int32), axis=-1), axis=-1).astype(jnp.int32)


def _accept(log_u: jax.Array, logp_d: jax.Array, logq_d: jax.Array) -> jax.Array:
  """u < p(d)/q(d) in log space: probability min(1, p/q), no overflow for tiny q.

  p(d) = 0 rejects (-inf < -inf is False); p(d) = q(d) = 0 gives NaN, which also rejects.
  """
  return log_u < logp_d - logq_d


def _residual_logprobs(logp: jax.Array, logq: jax.Array) -> jax.Array:
  """log max(0, p - q), unnormalised, [..., V]: log p + log1p(-q/p) where p > q, else -inf."""
  above = logq < logp  # [..., V]
  log_ratio = jnp.where(above, logq - logp, -1.0)  # safe value where masked out
  return jnp.where(above, logp + jnp.log1p(-jnp.exp(log_ratio)), -jnp.inf)
