"""TiDAR dual objective (docs/method.md §1): AR next-token loss on the clean half, same-position
diffusion loss on the fully masked half, combined as (alpha * L_AR + L_diff) / (1 + alpha).

`objective="ar"` runs the same code path without the mask half: the AR-only baseline.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tidar_jax import masks
from tidar_jax.config import ModelConfig
from tidar_jax.model import Transformer


def tidar_inputs(tokens: jax.Array, mask_id: int) -> tuple[jax.Array, jax.Array]:
  """[batch, L] clean tokens -> doubled input `[x ; M..M]` and positions `0..L-1, 0..L-1`, both [batch, 2L]."""
  B, L = tokens.shape
  inputs = jnp.concatenate([tokens, jnp.full((B, L), mask_id, tokens.dtype)], axis=1)
  pos = jnp.arange(L, dtype=jnp.int32)
  positions = jnp.broadcast_to(jnp.concatenate([pos, pos])[None, :], (B, 2 * L))
  return inputs, positions


def _token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """[..., V] fp32 logits, [...] int targets -> [...] negative log-likelihood."""
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return logz - picked


def ar_loss_terms(logits: jax.Array, tokens: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Sum and count of next-token NLL: logits at i [batch, L, V] predict tokens[:, i+1] (i < L-1)."""
  nll = _token_nll(logits[:, :-1].astype(jnp.float32), tokens[:, 1:])  # [batch, L-1]
  w = weights[:, 1:].astype(jnp.float32)
  return jnp.sum(nll * w), jnp.sum(w)


def diffusion_loss_terms(logits: jax.Array, tokens: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Sum and count of same-position NLL: the mask token at position i predicts tokens[:, i]."""
  nll = _token_nll(logits.astype(jnp.float32), tokens)  # [batch, L]
  w = weights.astype(jnp.float32)
  return jnp.sum(nll * w), jnp.sum(w)


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


def loss_from_logits(logits: jax.Array, tokens: jax.Array, weights: jax.Array, objective: str,
                     alpha: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Training loss and per-term metrics from the model's logits on `model_inputs`.

  logits: [batch, L, V] (objective "ar") or [batch, 2L, V] (objective "tidar").
  """
  L = tokens.shape[1]
  ar_sum, ar_n = ar_loss_terms(logits[:, :L], tokens, weights)
  metrics = {"ar_loss": ar_sum / jnp.maximum(ar_n, 1.0), "ar_tokens": ar_n}
  if objective == "ar":
    return metrics["ar_loss"], metrics
  diff_sum, diff_n = diffusion_loss_terms(logits[:, L:], tokens, weights)
  metrics |= {"diffusion_loss": diff_sum / jnp.maximum(diff_n, 1.0), "diffusion_tokens": diff_n}
  return combine(ar_sum, ar_n, diff_sum, diff_n, alpha), metrics


def compute_loss(model_cfg: ModelConfig, params: Any, tokens: jax.Array, weights: jax.Array | None,
                 *, mask_id: int, objective: str, block_size: int, alpha: float,
                 structured_attention: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
  """One training forward: doubled input (or plain for "ar"), static mask, model, loss.

  structured_attention: for "tidar", attend block by block (`Transformer(tidar_block=k)`, about
  half the score entries of the dense [2L, 2L] mask); False applies the dense mask (the reference).
  """
  if weights is None:
    weights = jnp.ones(tokens.shape, jnp.float32)
  inputs, positions, mask = model_inputs(tokens, mask_id, objective, block_size)
  if objective == "tidar" and structured_attention:
    model, mask = Transformer(model_cfg, tidar_block=block_size), None
  else:
    model, mask = Transformer(model_cfg), jnp.asarray(mask)
  logits, _ = model.apply(params, inputs, positions, mask)
  loss, metrics = loss_from_logits(logits, tokens, weights, objective, alpha)
  metrics["loss"] = loss
  return loss, metrics
