"""AdamW with linear warmup + cosine decay, global-norm clipping, decay on matrices only."""

from __future__ import annotations

from typing import Any

import jax
import optax

from tidar_jax.config import steps_of


def learning_rate_schedule(train_cfg: Any) -> optax.Schedule:
  warmup = steps_of(train_cfg.warmup_steps, train_cfg.steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train_cfg.learning_rate, warmup_steps=warmup,
      decay_steps=max(train_cfg.steps, warmup + 1), end_value=train_cfg.min_learning_rate)


def _decay_mask(params: Any) -> Any:
  # Norm scales and biases are not decayed: shrinking them toward 0 only fights the normalisation.
  def is_matrix(path, _):
    name = jax.tree_util.keystr(path)
    return "kernel" in name or "embedding" in name

  return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(train_cfg: Any) -> optax.GradientTransformation:
  chain = []
  if train_cfg.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(train_cfg.grad_clip))
  chain.append(optax.adamw(learning_rate_schedule(train_cfg), b1=train_cfg.adam_b1, b2=train_cfg.adam_b2,
                           weight_decay=train_cfg.weight_decay, mask=_decay_mask))
  return optax.chain(*chain)
