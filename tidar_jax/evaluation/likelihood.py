"""Likelihood of a model on held-out batches with the trainer's own eval step (same masks, same
loss code), in AR mode for every model so AR-only and TiDAR runs compare on one computation.

A validation batch is `train.batch_size` rows, and one loss chunk's fp32 logits alone are
[rows, train.loss_chunk, vocab] (12 GiB for SmolLM2's 64 x 1024 x 49152), so the batch goes through
in the fewest micro-batches whose compiled eval step fits the device (`memory_fit.MARGIN` of what
its allocator may hand out): an evaluation sharing a GPU with others, or on a smaller one than
training, still runs."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tidar_jax import data, memory_fit, sharding, train, train_step
from tidar_jax.config import validate


def eval_batches(config, tokenizer, eval_source, num_batches: int) -> list[np.ndarray]:
  batches = data.make_eval_batches(eval_source, tokenizer, seq_len=config.train.seq_len,
                                   batch_size=config.train.batch_size, num_batches=num_batches,
                                   process_index=jax.process_index(), process_count=jax.process_count(),
                                   row_multiple=jax.device_count())  # a short split: one batch over the devices
  return [b["tokens"] for b in batches]


@functools.lru_cache(maxsize=None)
def _eval_step(model_cfg, objective: str, block_size: int, loss_alpha: float, loss_chunk: int, mask_id: int,
               grad_accum: int):
  """The trainer's eval step, jitted once per key, so that every run of one process (same model
  shape) shares the compilation of its AR-mode evaluation."""
  tidar = ml_collections.ConfigDict(dict(objective=objective, block_size=block_size, loss_alpha=loss_alpha))
  cfg = ml_collections.ConfigDict({"tidar": tidar, "train": {"loss_chunk": loss_chunk}})
  return jax.jit(train_step.make_eval_step(model_cfg, cfg, mask_id, grad_accum))


def _compile(make_step, params, tokens: jax.ShapeDtypeStruct, grad_accum: int) -> tuple[Any, int]:
  """The eval step in `grad_accum` micro-batches, compiled, and its bytes per device (0: unknown;
  (None, memory_fit.NO_FIT) where compiling ran out of device memory: `memory_fit.fitting_compile`)."""
  result = memory_fit.fitting_compile(
      lambda: memory_fit.measured_compile(lambda: make_step(grad_accum).lower(params, tokens).compile()))
  if result is None:
    return None, memory_fit.NO_FIT
  compiled, mem = result
  return compiled, mem.total if mem else 0


def fitting_eval_step(make_step, params, tokens: jax.ShapeDtypeStruct, batch_devices: int) -> tuple[Any, int]:
  """The eval step compiled for the fewest micro-batches that fit the device, and that count.

  make_step(grad_accum): the jitted eval step; tokens: the batch's abstract [rows, L] int32 with its
  sharding. The whole batch is tried first (one compile where it fits, as it mostly does), then
  `memory_fit.choose_micro_batch`. Raises ValueError with the remedy when one row per device does
  not fit.
  """
  limit = memory_fit.device_memory_bytes()
  whole, need = _compile(make_step, params, tokens, 1)
  if limit is None:  # no allocator statistics: the whole batch, as training without "auto"
    if whole is None:
      raise ValueError("evaluation: compiling the eval step ran out of memory on a device without allocator "
                       "statistics: lower train.batch_size, train.loss_chunk or train.seq_len")
    return whole, 1
  budget = int(memory_fit.MARGIN * limit)
  if need <= budget:
    return whole, 1
  per_device = tokens.shape[0] // batch_devices
  compiled: dict[int, Any] = {per_device: whole}

  def measure(micro: int) -> int:  # bytes per device of the step at `micro` rows per device
    if micro == per_device:
      return need
    compiled[micro], used = _compile(make_step, params, tokens, per_device // micro)
    return used

  try:
    micro, _ = memory_fit.choose_micro_batch(per_device, measure, budget)
  except ValueError as e:
    raise ValueError(f"evaluation: one validation row per device does not fit {budget / 2**30:.2f} GiB "
                     f"({memory_fit.MARGIN:.0%} of this device's allocator): free the device (or raise "
                     "XLA_PYTHON_CLIENT_MEM_FRACTION), lower train.loss_chunk or train.seq_len") from e
  return compiled[micro], per_device // micro


def likelihood(params, config, tokenizer, batches: list[np.ndarray]) -> dict[str, Any]:
  """AR NLL of the model in AR mode (clean tokens, causal: the same computation for every run) and,
  for TiDAR, the diffusion loss of the doubled input, on the same validation batches."""
  model_cfg = validate(config)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.mesh)
  out: dict[str, Any] = {"batches": len(batches), "tokens": int(sum(b.size for b in batches))}
  batch_sharding = sharding.batch_sharding(mesh)
  tokens = jax.ShapeDtypeStruct(batches[0].shape, jnp.int32, sharding=batch_sharding)
  devices = mesh.shape["data"] * mesh.shape["fsdp"]  # the batch's rows are split over these
  chunk = train_step.loss_chunk(config)
  with sharding.activate(mesh, rules):
    to_device = functools.partial(data.to_global_array, sharding=batch_sharding)
    # block size and alpha: unused by "ar"
    ar_step, out["ar_micro_batches"] = fitting_eval_step(
        lambda accum: _eval_step(model_cfg, "ar", 1, 1.0, chunk, tokenizer.mask_id, accum), params, tokens, devices)
    ev = train.evaluate(ar_step, params, batches, to_device)
    out["ar_nll"], out["ar_ppl"] = ev["eval_ar_loss"], ev["eval_ar_perplexity"]
    if config.tidar.objective == "tidar":
      tidar_step, out["tidar_micro_batches"] = fitting_eval_step(
          lambda accum: _eval_step(model_cfg, "tidar", config.tidar.block_size, config.tidar.loss_alpha, chunk,
                                   tokenizer.mask_id, accum), params, tokens, devices)
      ev = train.evaluate(tidar_step, params, batches, to_device)
      out["diffusion_loss"] = ev["eval_diffusion_loss"]
      out["ar_nll_doubled_input"] = ev["eval_ar_loss"]  # the same AR logits computed beside the mask half
  return out

