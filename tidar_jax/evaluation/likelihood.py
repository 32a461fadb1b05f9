"""Likelihood of a model on held-out batches with the trainer's own eval step (same masks, same
loss code), in AR mode for every model so AR-only and TiDAR runs compare on one computation."""

from __future__ import annotations

import functools
from typing import Any

import jax
import ml_collections
import numpy as np

from tidar_jax import data, sharding, train, train_step
from tidar_jax.config import validate


def eval_batches(config, tokenizer, eval_source, num_batches: int) -> list[np.ndarray]:
  batches = data.make_eval_batches(eval_source, tokenizer, seq_len=config.train.seq_len,
                                   batch_size=config.train.batch_size, num_batches=num_batches,
                                   process_index=jax.process_index(), process_count=jax.process_count(),
                                   row_multiple=jax.device_count())  # a short split: one batch over the devices
  return [b["tokens"] for b in batches]


@functools.lru_cache(maxsize=None)
def _eval_step(model_cfg, objective: str, block_size: int, loss_alpha: float, mask_id: int):
  """The trainer's eval step, jitted once per key, so that every run of one process (same model
  shape) shares the compilation of its AR-mode evaluation."""
  tidar = ml_collections.ConfigDict(dict(objective=objective, block_size=block_size, loss_alpha=loss_alpha))
  return jax.jit(train_step.make_eval_step(model_cfg, ml_collections.ConfigDict({"tidar": tidar}), mask_id))


def likelihood(params, config, tokenizer, batches: list[np.ndarray]) -> dict[str, Any]:
  """AR NLL of the model in AR mode (clean tokens, causal: the same computation for every run) and,
  for TiDAR, the diffusion loss of the doubled input, on the same validation batches."""
  model_cfg = validate(config)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.mesh)
  out: dict[str, Any] = {"batches": len(batches), "tokens": int(sum(b.size for b in batches))}
  with sharding.activate(mesh, rules):
    to_device = functools.partial(data.to_global_array, sharding=sharding.batch_sharding(mesh))
    ar_step = _eval_step(model_cfg, "ar", 1, 1.0, tokenizer.mask_id)  # block size and alpha: unused by "ar"
    ev = train.evaluate(ar_step, params, batches, to_device)
    out["ar_nll"], out["ar_ppl"] = ev["eval_ar_loss"], ev["eval_ar_perplexity"]
    if config.tidar.objective == "tidar":
      tidar_step = _eval_step(model_cfg, "tidar", config.tidar.block_size, config.tidar.loss_alpha, tokenizer.mask_id)
      ev = train.evaluate(tidar_step, params, batches, to_device)
      out["diffusion_loss"] = ev["eval_diffusion_loss"]
      out["ar_nll_doubled_input"] = ev["eval_ar_loss"]  # the same AR logits computed beside the mask half
  return out

