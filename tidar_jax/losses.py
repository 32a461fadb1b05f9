"""TiDAR dual objective (docs/method.md §1): AR next-token loss on the clean half, same-position
diffusion loss on the fully masked half, combined as (alpha * L_AR + L_diff) / (1 + alpha).

`objective="ar"` runs the same code path without the mask half: the AR-only baseline.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tidar_jax import head_loss, masks
from tidar_jax.config import ModelConfig
from tidar_jax.model import Transformer, head_table


def tidar_inputs(tokens: jax.Array, mask_id: int) -> tuple[jax.Array, jax.Array]:
  """[batch, L] clean tokens -> doubled input `[x ; M..M]` and positions `0..L-1, 0..L-1`, both [batch, 2L]."""
  B, L = tokens.shape
  inputs = jnp.concatenate([tokens, jnp.full((B, L), mask_id, tokens.dtype)], axis=1)
  pos = jnp.arange(L, dtype=jnp.int32)
  positions = jnp.broadcast_to(jnp.concatenate([pos, pos])[None, :], (B, 2 * L))
  return inputs, positions


def targets(tokens: jax.Array, objective: str) -> jax.Array:
  """[batch, L] clean tokens -> [batch, L or 2L] the id each model position is scored against.

  Clean position i predicts x_{i+1} (the last one has no target: id 0, weight 0); the mask token at
  position i (TiDAR's second half) predicts x_i.
  """
  ar = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
  return ar if objective == "ar" else jnp.concatenate([ar, tokens], axis=1)


def combine(ar_sum, ar_count, diff_sum, diff_count, alpha: float) -> jax.Array:
  """(alpha * mean_AR + mean_diff) / (1 + alpha), each mean over its own valid targets."""
  l_ar = ar_sum / jnp.maximum(ar_count, 1.0)
  l_diff = diff_sum / jnp.maximum(diff_count, 1.0)
  return (alpha * l_ar + l_diff) / (1.0 + alpha)


def model_inputs(tokens: jax.Array, mask_id: int, objective: str, block_size: int
                 ) -> tuple[jax.Array, jax.Array, np.ndarray]:
  """Inputs, positions and the static mask for one training forward."""
  B, L = tokens.shape
  if objective == "ar":
    positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32)[None, :], (B, L))
    return tokens, positions, masks.causal_mask(L)
  inputs, positions = tidar_inputs(tokens, mask_id)
  return inputs, positions, masks.training_mask(L, block_size)


def loss_from_nll(nll: jax.Array, tokens: jax.Array, weights: jax.Array, objective: str,
                  alpha: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Training loss and per-term metrics from each position's NLL against `targets(tokens)`.

  nll: [batch, L] (objective "ar") or [batch, 2L] (objective "tidar") fp32; weights: [batch, L]
  per clean token (0 = padding, excluded from both means).
  """
  L = tokens.shape[1]
  w = weights.astype(jnp.float32)
  w_ar = w[:, 1:]  # clean position i is weighted by its target x_{i+1}
  ar_sum, ar_n = jnp.sum(nll[:, :L - 1] * w_ar), jnp.sum(w_ar)
  metrics = {"ar_loss": ar_sum / jnp.maximum(ar_n, 1.0), "ar_tokens": ar_n}
  if objective == "ar":
    return metrics["ar_loss"], metrics
  diff_sum, diff_n = jnp.sum(nll[:, L:] * w), jnp.sum(w)
  metrics |= {"diffusion_loss": diff_sum / jnp.maximum(diff_n, 1.0), "diffusion_tokens": diff_n}
  return combine(ar_sum, ar_n, diff_sum, diff_n, alpha), metrics


def compute_loss(model_cfg: ModelConfig, params: Any, tokens: jax.Array, weights: jax.Array | None,
                 *, mask_id: int, objective: str, block_size: int, alpha: float, loss_chunk: int,
                 structured_attention: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
  """One training forward: doubled input (or plain for "ar"), static mask, model, loss.

  loss_chunk: sequence positions whose logits exist at once (`head_loss.token_nll`): the
  `[batch, 2L, vocab]` fp32 logits are never materialised, in the forward or the backward.
  structured_attention: attend by the mask's structure, not a mask array: for "tidar" block by
  block (`Transformer(tidar_block=k)`, about half the score entries of the dense [2L, 2L] mask), for
  "ar" in the attention kernel's causal mode (mask=None); False applies the dense mask (the reference).
  """
  if weights is None:
    weights = jnp.ones(tokens.shape, jnp.float32)
  inputs, positions, mask = model_inputs(tokens, mask_id, objective, block_size)
  if structured_attention:
    model, mask = Transformer(model_cfg, tidar_block=block_size if objective == "tidar" else 0), None
  else:
    model, mask = Transformer(model_cfg), jnp.asarray(mask)
  hidden, _ = model.apply(params, inputs, positions, mask, return_hidden=True)  # [batch, L or 2L, d_model]
  table, vocab_major = head_table(model_cfg, params)
  nll = head_loss.token_nll(hidden, table, targets(tokens, objective), vocab_major=vocab_major,
                            chunk=loss_chunk)
  loss, metrics = loss_from_nll(nll, tokens, weights, objective, alpha)
  metrics["loss"] = loss
  return loss, metrics
