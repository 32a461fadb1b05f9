"""What finishes the q/k/v projection inside the fused attention kernels (`one_token_attention`,
`multi_token_attention`): the folded norm's scale, the bias, qk-norm and RoPE, rounded to the compute
dtype wherever the unfused step (`engine.unfused_attention`) stores an intermediate, so the kernels
give the unfused step's numbers."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Projection(NamedTuple):
  """What finishes the q/k/v projection inside the kernel (each None when the model has none)."""

  x: jax.Array | None  # [batch, d_model]: scale q/k/v by 1 / rms(x) (the folded norm); None: already normed
  bias: jax.Array | None  # [(heads + 2 kv_heads) * head_dim]
  q_norm: jax.Array | None  # [head_dim] qk-norm gains (Qwen3)
  k_norm: jax.Array | None  # [head_dim]


def rounded(a: jax.Array, dtype) -> jax.Array:
  """fp32 -> rounded to the compute dtype, back in fp32: the unfused step stores every intermediate
  in the compute dtype."""
  return a.astype(dtype).astype(jnp.float32)


def finish_projection(raw: tuple[jax.Array, jax.Array | None], inv_rms: jax.Array | None, dtype) -> jax.Array:
  """(raw q/k/v values, bias or None), fp32 [n, width] -> the projection as the unfused step has it:
  the folded norm's scale (inv_rms None: already normed), then the bias."""
  a, bias = raw
  if inv_rms is not None:
    a = rounded(a * inv_rms, dtype)
  return a if bias is None else rounded(a + bias, dtype)


def rope_halves(a: jax.Array, c: jax.Array, gain: tuple[jax.Array, jax.Array] | None, cos: jax.Array,
                sin: jax.Array, dtype, eps: float) -> tuple[jax.Array, jax.Array]:
  """A head's halves a, c [n, half] fp32 -> RoPE'd halves (`model.rope`'s rotate-half), after qk-norm
  when gain (its halves, [1, half] each) is given. cos, sin broadcast against [n, half]."""
  if gain is not None:  # qk-norm: RMS over the whole head_dim, both halves
    sq = jnp.sum(a * a, axis=-1, keepdims=True) + jnp.sum(c * c, axis=-1, keepdims=True)
    r = jax.lax.rsqrt(sq / (2 * a.shape[-1]) + eps)
    a, c = rounded(a * r * gain[0], dtype), rounded(c * r * gain[1], dtype)
  return rounded(a * cos - c * sin, dtype), rounded(c * cos + a * sin, dtype)
