"""cuDNN's flash attention as its two halves, forward and backward, called separately.

`jax.nn.dot_product_attention` hides the backward: its gradient is that of one attention alone, and
the log-sum-exp it can return carries no gradient. A query whose keys are split over two attentions
(the TiDAR mask half: the clean prefix here, its own block elsewhere) needs the backward run with
the *merged* output and log-sum-exp, which is the flash backward of the joint softmax (the ring
attention identity). These two functions expose exactly that, in cuDNN's causal mode (tiles above
the diagonal are skipped) with an additive bias that masks further inside it.

They bind jax's own cuDNN primitives (`jax._src.cudnn.fused_attention_stablehlo`), the ones
`jax.nn.dot_product_attention(implementation="cudnn")` lowers to, so sharding and the cuDNN version
checks are jax's. GPU only, 16-bit q/k/v in [batch, seq, heads, head_dim] (kv heads may be fewer).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.cudnn import fused_attention_stablehlo as _fa

_STATIC = dict(seed=0, dropout_rate=0.0, variadic_args=(True, False),  # a bias; no bias gradient
               mask_type=_fa.MaskType.CAUSAL, layout=_fa.AttentionLayout.BTNH.value,
               sliding_window_length=None)


def _bias(allowed: np.ndarray, dtype) -> jax.Array:  # [1, 1, q_len, k_len]
  """`allowed` (True = may attend) as cuDNN's additive bias, with jax's own large negative value
  (cuDNN mishandles the difference of two of the dtype's extremes)."""
  return jnp.where(jnp.asarray(allowed), jnp.zeros((), dtype), _fa.get_large_negative_number(dtype))[None, None]


def _unused(dtype) -> jax.Array:
  return jnp.zeros(0, dtype)


def forward(q: jax.Array, k: jax.Array, v: jax.Array, allowed: np.ndarray,
            scale: float) -> tuple[jax.Array, jax.Array]:
  """softmax(scale · q kᵀ + bias) v over the keys `allowed` [q_len, k_len] lets each query see (a
  subset of the causal triangle: the kernel skips the tiles above it).
  q [batch, q_len, heads, D], k/v [batch, k_len, kv_heads, D] -> (out [batch, q_len, heads, D],
  lse [batch, heads, q_len] fp32, natural log)."""
  u = _unused(q.dtype)
  out, lse = _fa._dot_product_attention_fwd_p_wrapper.bind(
      q, k, v, _bias(allowed, q.dtype), u, u, u, u, u, u, scale=scale, is_training=True, **_STATIC)
  return out, lse


def backward(q: jax.Array, k: jax.Array, v: jax.Array, allowed: np.ndarray, scale: float,
             out: jax.Array, lse: jax.Array, dout: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Gradients of q/k/v given the output `out` [batch, q_len, heads, D] and log-sum-exp `lse`
  [batch, heads, q_len] of the softmax these keys are part of (their own, or one merged with other
  keys), and the output's cotangent `dout`: the kernel recomputes p = exp(scores - lse) and uses
  rowsum(dout · out), so passing the merged pair gives this part's share of the joint gradient."""
  u = _unused(q.dtype)
  dq, dk, dv = _fa._dot_product_attention_bwd_p_wrapper.bind(
      q, k, v, _bias(allowed, q.dtype), u, u, u, u, u, u, lse, out.astype(q.dtype), dout.astype(q.dtype),
      scale=scale, **_STATIC)
  return dq, dk, dv
