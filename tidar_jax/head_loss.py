"""The LM head's per-token negative log-likelihood, computed chunk by chunk over the sequence.

The full fp32 logits of a training batch are the largest array of a step: `[batch, 2L, vocab]`
is 296 GiB for 64 sequences of the 1p5b config (2L = 8192, vocab 151936). Here the logits exist
one chunk of positions at a time: the forward keeps only each token's log-sum-exp, and the
backward recomputes the chunk's logits from the hidden states to form `softmax - one_hot`. Peak
memory is one chunk's logits (`[batch, chunk, vocab]` fp32) plus a few of its size, for one
extra LM-head matmul per chunk (the recompute; about 2% of a 1p5b TiDAR step's FLOPs).

Matmuls take the compute dtype (bf16 in training) with fp32 accumulation; log-sum-exp, softmax
and the cotangent are fp32, cast to the compute dtype before the two backward matmuls, as the
unchunked `model.lm_head_logits` does.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_F32 = jnp.float32


def _logits(hidden: jax.Array, table: jax.Array, vocab_major: bool) -> jax.Array:
  """[batch, chunk, d_model] x head table -> [batch, chunk, vocab] fp32 logits."""
  spec = "bcd,vd->bcv" if vocab_major else "bcd,dv->bcv"
  logits = jnp.einsum(spec, hidden, table, preferred_element_type=_F32)
  # Keep the batch split over (data, fsdp) and the vocab over tensor inside the loop.
  return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


def _chunks(x: jax.Array, chunk: int) -> jax.Array:
  """[batch, seq, ...] -> [n_chunks, batch, chunk, ...], the sequence padded to a multiple of chunk."""
  B, T = x.shape[:2]
  n = -(-T // chunk)
  x = jnp.pad(x, [(0, 0), (0, n * chunk - T)] + [(0, 0)] * (x.ndim - 2))
  return jnp.swapaxes(x.reshape((B, n, chunk) + x.shape[2:]), 0, 1)


def _unchunk(x: jax.Array, seq: int) -> jax.Array:
  """[n_chunks, batch, chunk, ...] -> [batch, seq, ...] (drops the padding)."""
  n, B, c = x.shape[:3]
  return jnp.swapaxes(x, 0, 1).reshape((B, n * c) + x.shape[3:])[:, :seq]


def _forward(hidden, table, targets, vocab_major, chunk):
  T = hidden.shape[1]

  def body(_, xs):
    h_c, t_c = xs  # [batch, chunk, d_model], [batch, chunk]
    logits = _logits(h_c, table, vocab_major)
    lse = jax.nn.logsumexp(logits, axis=-1)  # [batch, chunk]
    picked = jnp.take_along_axis(logits, t_c[..., None], axis=-1)[..., 0]
    return None, (lse - picked, lse)

  _, (nll, lse) = jax.lax.scan(body, None, (_chunks(hidden, chunk), _chunks(targets, chunk)))
  return _unchunk(nll, T), _unchunk(lse, T)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _token_nll(hidden, table, targets, vocab_major, chunk):
  return _forward(hidden, table, targets, vocab_major, chunk)[0]


def _token_nll_fwd(hidden, table, targets, vocab_major, chunk):
  nll, lse = _forward(hidden, table, targets, vocab_major, chunk)
  return nll, (hidden, table, targets, lse)


def _token_nll_bwd(vocab_major, chunk, res, g):  # g [batch, seq] fp32
  hidden, table, targets, lse = res
  T = hidden.shape[1]

  def body(d_table, xs):
    h_c, t_c, lse_c, g_c = xs
    logits = _logits(h_c, table, vocab_major)  # recomputed: the forward kept only lse
    vocab_ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2)
    d_logits = jnp.exp(logits - lse_c[..., None]) - (vocab_ids == t_c[..., None]).astype(_F32)
    d_logits = (d_logits * g_c[..., None]).astype(hidden.dtype)  # [batch, chunk, vocab]
    if vocab_major:
      d_h = jnp.einsum("bcv,vd->bcd", d_logits, table, preferred_element_type=_F32)
      d_table = d_table + jnp.einsum("bcv,bcd->vd", d_logits, h_c, preferred_element_type=_F32)
    else:
      d_h = jnp.einsum("bcv,dv->bcd", d_logits, table, preferred_element_type=_F32)
      d_table = d_table + jnp.einsum("bcd,bcv->dv", h_c, d_logits, preferred_element_type=_F32)
    return d_table, d_h.astype(hidden.dtype)

  xs = (_chunks(hidden, chunk), _chunks(targets, chunk), _chunks(lse, chunk), _chunks(g.astype(_F32), chunk))
  d_table, d_hidden = jax.lax.scan(body, jnp.zeros(table.shape, _F32), xs)
  return _unchunk(d_hidden, T), d_table.astype(table.dtype), np.zeros(targets.shape, jax.dtypes.float0)


_token_nll.defvjp(_token_nll_fwd, _token_nll_bwd)


def token_nll(hidden: jax.Array, table: jax.Array, targets: jax.Array, *, vocab_major: bool,
              chunk: int) -> jax.Array:
  """-log softmax(hidden @ table)[target] per token, never holding more than one chunk of logits.

  hidden: [batch, seq, d_model] (the final-normed hidden states, compute dtype)
  table: [vocab, d_model] if vocab_major (a tied embedding) else [d_model, vocab], compute dtype
  targets: [batch, seq] int32 token ids
  chunk: sequence positions per chunk (>= seq: one chunk)
  returns: [batch, seq] fp32
  """
  if not isinstance(chunk, int) or chunk < 1:
    raise ValueError(f"chunk={chunk!r}: must be a positive integer (sequence positions per chunk)")
  chunk = min(chunk, hidden.shape[1])
  return _token_nll(hidden, table, targets.astype(jnp.int32), vocab_major, chunk)

