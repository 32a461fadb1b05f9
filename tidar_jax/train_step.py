"""The train state and the pure train/eval steps (used by the trainer, the dry run and benchmarks).

A step takes the global batch `[batch_size, seq_len]` and runs it as `grad_accum` micro-batches
in a `lax.scan`: activation memory of one micro-batch, the same update as the full batch.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from tidar_jax import losses
from tidar_jax.config import DEFAULT_LOSS_CHUNK, ModelConfig
from tidar_jax.model import init_variables

TrainState = dict  # {"step": int32 [], "params": pytree, "opt_state": pytree}


def _init_state(model_cfg: ModelConfig, tx, key: jax.Array) -> TrainState:
  params = init_variables(model_cfg, key)
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def abstract_train_state(model_cfg: ModelConfig, tx, seed: int) -> Any:
  """Boxed abstract state (carries logical axis names for every param and optimizer slot)."""
  return jax.eval_shape(functools.partial(_init_state, model_cfg, tx), jax.random.key(seed))


def create_train_state(model_cfg: ModelConfig, tx, seed: int, shardings: Any) -> TrainState:
  """Initialises directly into the target shardings: no full replica on any one device."""
  init = lambda key: nn.unbox(_init_state(model_cfg, tx, key))  # noqa: E731
  return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))


def loss_chunk(config: ml_collections.ConfigDict) -> int:
  """`train.loss_chunk`; configs written before it existed get the default."""
  train = config.get("train")
  return train.get("loss_chunk", DEFAULT_LOSS_CHUNK) if train is not None else DEFAULT_LOSS_CHUNK


def loss_fn(params, tokens, *, model_cfg: ModelConfig, config: ml_collections.ConfigDict, mask_id: int):
  t = config.tidar
  return losses.compute_loss(model_cfg, params, tokens, None, mask_id=mask_id, objective=t.objective,
                             block_size=t.block_size, alpha=t.loss_alpha, loss_chunk=loss_chunk(config))


def micro_batches(tokens: jax.Array, accum: int) -> jax.Array:
  """[batch, L] -> [accum, batch / accum, L], micro-batch m = rows m, m + accum, m + 2 accum, ...

  Interleaved rather than contiguous: a device holding a contiguous slice of the batch holds the
  same share of every micro-batch, so no micro-batch waits on a few devices.
  """
  B, L = tokens.shape
  micro = jnp.swapaxes(tokens.reshape(B // accum, accum, L), 0, 1)
  return nn.with_logical_constraint(micro, (None, "batch", "length"))


def make_train_step(model_cfg: ModelConfig, config: ml_collections.ConfigDict, tx, mask_id: int,
                    grad_accum: int | None = None) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict]]:
  """grad_accum: micro-batches per step (default: `train.grad_accum`, 0 meaning 1); the trainer
  passes its `batch_plan.BatchPlan.grad_accum`."""
  grad_fn = jax.value_and_grad(functools.partial(loss_fn, model_cfg=model_cfg, config=config, mask_id=mask_id),
                               has_aux=True)
  accum = grad_accum or config.train.get("grad_accum", 0) or 1

  def train_step(state: TrainState, tokens: jax.Array) -> tuple[TrainState, dict]:  # tokens [batch, L]
    if accum == 1:
      (_, metrics), grads = grad_fn(state["params"], tokens)
    else:
      micro = micro_batches(tokens, accum)  # [accum, batch / accum, L]

      def body(carry, mb):
        (_, m), g = grad_fn(state["params"], mb)
        return jax.tree.map(jnp.add, carry, (g, m)), None

      zeros = jax.tree.map(jnp.zeros_like, (state["params"], jax.eval_shape(grad_fn, state["params"], micro[0])[0][1]))
      (grads, metrics), _ = jax.lax.scan(body, zeros, micro)
      grads = jax.tree.map(lambda g: g / accum, grads)
      metrics = jax.tree.map(lambda m: m / accum, metrics)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = jax.tree.map(jnp.add, state["params"], updates)
    metrics["grad_norm"] = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  return train_step


def make_eval_step(model_cfg: ModelConfig, config: ml_collections.ConfigDict, mask_id: int, grad_accum: int = 1):
  """Validation AR loss (and diffusion loss for TiDAR) of one batch, as sums for exact averaging; in
  `grad_accum` micro-batches like the train step, so evaluating fits wherever training does."""
  objective = config.tidar.objective

  def sums(params, tokens):
    _, m = loss_fn(params, tokens, model_cfg=model_cfg, config=config, mask_id=mask_id)
    out = {"ar_sum": m["ar_loss"] * m["ar_tokens"], "ar_n": m["ar_tokens"]}
    if objective == "tidar":
      out |= {"diff_sum": m["diffusion_loss"] * m["diffusion_tokens"], "diff_n": m["diffusion_tokens"]}
    return out

  def eval_step(params, tokens):  # tokens [batch, L]
    if grad_accum == 1:
      return sums(params, tokens)
    per_micro = jax.lax.map(functools.partial(sums, params), micro_batches(tokens, grad_accum))
    return jax.tree.map(functools.partial(jnp.sum, axis=0), per_micro)

  return eval_step
