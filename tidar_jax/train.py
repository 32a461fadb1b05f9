"""Train a TiDAR (or AR-only) model: `python -m tidar_jax.train --config=configs/tiny.py --workdir=DIR`.

One code path for one CPU and for a pod: the train step is a single `jax.jit` with explicit
in/out shardings over a ("data", "fsdp", "tensor") mesh (a 1x1x1 mesh on one device). The run
resumes from the latest checkpoint in --workdir, data position included, and saves on SIGTERM.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from tqdm import tqdm

from tidar_jax import checkpoint, losses, sharding
from tidar_jax.config import ModelConfig, steps_of, validate
from tidar_jax.metrics import MetricsWriter
from tidar_jax.model import Transformer
from tidar_jax.optimizer import make_optimizer

TrainState = dict  # {"step": int32 [], "params": pytree, "opt_state": pytree}


def check_workdir(workdir: str) -> str:
  path = os.path.abspath(os.path.expanduser(workdir))
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".write_test_{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ValueError(f"--workdir={workdir}: not writable ({e.strerror}); pass a directory you can write to") from e
  return path


def abstract_train_state(model_cfg: ModelConfig, tx, seed: int) -> Any:
  """Boxed abstract state (carries logical axis names for every param and optimizer slot)."""

  def init(key):
    tokens = jnp.zeros((1, 2), jnp.int32)
    params = Transformer(model_cfg).init(key, tokens, tokens, jnp.ones((1, 2, 2), bool))
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

  return jax.eval_shape(init, jax.random.key(seed))


def create_train_state(model_cfg: ModelConfig, tx, seed: int, shardings: Any) -> TrainState:
  """Initialises directly into the target shardings: no full replica on any one device."""

  def init(key):
    tokens = jnp.zeros((1, 2), jnp.int32)
    params = nn.unbox(Transformer(model_cfg).init(key, tokens, tokens, jnp.ones((1, 2, 2), bool)))
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

  return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))


def loss_fn(params, tokens, *, model_cfg: ModelConfig, tidar_cfg: Any, mask_id: int, objective: str):
  return losses.compute_loss(model_cfg, params, tokens, None, mask_id=mask_id,
                             objective=objective, block_size=tidar_cfg.block_size, alpha=tidar_cfg.loss_alpha)


def make_train_step(model_cfg: ModelConfig, config: ml_collections.ConfigDict, tx, mask_id: int
                    ) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict]]:
  grad_fn = jax.value_and_grad(
      functools.partial(loss_fn, model_cfg=model_cfg, tidar_cfg=config.tidar, mask_id=mask_id,
                        objective=config.tidar.objective), has_aux=True)
  accum = config.train.grad_accum

  def train_step(state: TrainState, tokens: jax.Array) -> tuple[TrainState, dict]:  # tokens [batch, L]
    if accum == 1:
      (_, metrics), grads = grad_fn(state["params"], tokens)
    else:
      # Micro-batches in a scan: activation memory of one micro-batch, same update as the full batch.
      micro = tokens.reshape(accum, tokens.shape[0] // accum, tokens.shape[1])

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


def make_eval_step(model_cfg: ModelConfig, config: ml_collections.ConfigDict, mask_id: int):
  """Validation AR loss (and diffusion loss for TiDAR) of one batch, as sums for exact averaging."""
  objective = config.tidar.objective

  def eval_step(params, tokens):
    _, m = loss_fn(params, tokens, model_cfg=model_cfg, tidar_cfg=config.tidar, mask_id=mask_id,
                   objective=objective)
    out = {"ar_sum": m["ar_loss"] * m["ar_tokens"], "ar_n": m["ar_tokens"]}
    if objective == "tidar":
      out |= {"diff_sum": m["diffusion_loss"] * m["diffusion_tokens"], "diff_n": m["diffusion_tokens"]}
    return out

  return eval_step


def evaluate(eval_step, params, batches: list[np.ndarray], to_device: Callable) -> dict[str, float]:
  totals: dict[str, float] = {}
  for tokens in batches:
    for k, v in eval_step(params, to_device(tokens)).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  out = {"eval_ar_loss": totals["ar_sum"] / max(totals["ar_n"], 1.0)}
  out["eval_ar_perplexity"] = float(np.exp(out["eval_ar_loss"]))
  if "diff_sum" in totals:
    out["eval_diffusion_loss"] = totals["diff_sum"] / max(totals["diff_n"], 1.0)
  return out


class _StopFlag:
  """Set by SIGTERM (preemption): the loop saves a checkpoint at the next step boundary and exits."""

  def __init__(self):
    self.requested = False

  def __call__(self, signum, frame):
    del frame
    # Beside the progress bar, not in it (an absl warning would land mid-bar on stderr).
    tqdm.write(f"received signal {signum}: saving a checkpoint and stopping")
    self.requested = True


def _stop_everywhere(flag: _StopFlag, step: int, every: int) -> bool:
  if jax.process_count() == 1:
    return flag.requested
  if step % every:  # agreeing across hosts costs a sync: only at logging boundaries
    return False
  from jax.experimental import multihost_utils  # all hosts must stop at the same step

  return bool(np.any(multihost_utils.process_allgather(np.array([flag.requested]))))


def _wall_clock_due(since: float, every_s: float, step: int, sync_every: int) -> bool:
  """Whether `every_s` seconds passed since the last save (`since`, time.monotonic). Every process must
  save at the same step: with several, process 0's clock decides, at logging boundaries only (agreeing
  costs a sync), as for the stop flag."""
  if every_s <= 0:
    return False
  due = time.monotonic() - since >= every_s
  if jax.process_count() == 1:
    return due
  if step % sync_every:
    return False
  from jax.experimental import multihost_utils

  return bool(multihost_utils.broadcast_one_to_all(np.array(due)))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) training; returns {'first_eval', 'last_eval', 'step', 'params'}."""
  from tidar_jax import data

  model_cfg = validate(config)
  workdir = check_workdir(workdir)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.mesh)
  sharding.check_divisibility(model_cfg, mesh, config.train.batch_size, rules)
  is_main = jax.process_index() == 0

  if jax.process_count() > 1:  # one process prepares the corpus and tokenizer; the rest reuse the cache
    from jax.experimental import multihost_utils

    if is_main:
      data.get_tokenizer(config)
    multihost_utils.sync_global_devices("tidar_jax: data prepared")
  tokenizer = data.get_tokenizer(config)  # also checks the vocab fits model.vocab_size
  if is_main:
    tokenizer.save(workdir)
  train_source, eval_source = data.load_splits(config.data)
  train_iter = data.make_train_iterator(
      train_source, tokenizer, seq_len=config.train.seq_len, global_batch_size=config.train.batch_size,
      seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count(),
      num_workers=config.data.num_workers, window_shuffle=config.data.window_shuffle)
  eval_batches = list(data.make_eval_batches(
      eval_source, tokenizer, seq_len=config.train.seq_len,
      batch_size=config.train.batch_size, num_batches=config.train.eval_batches,
      process_index=jax.process_index(), process_count=jax.process_count()))
  eval_batches = [b["tokens"] for b in eval_batches]

  tx = make_optimizer(config.train)
  batch_sharding = sharding.batch_sharding(mesh)
  # Traced outside the mesh context: flax would otherwise attach sharding constraints while boxing.
  abstract = abstract_train_state(model_cfg, tx, config.seed)
  state_shardings = sharding.param_shardings(abstract, mesh, rules)
  abstract_unboxed = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  nn.unbox(abstract), state_shardings)
  # On CPU the async "device-to-host" copy can alias the buffers that the next (donating) step
  # overwrites, corrupting the checkpoint; accelerators copy for real, so only they save async.
  manager = checkpoint.make_manager(workdir, max_to_keep=config.train.keep_checkpoints,
                                    async_save=jax.default_backend() != "cpu")
  restored = checkpoint.restore_latest(manager, abstract_unboxed, train_iter)
  if is_main:  # one line either way: a rerun that silently started over was a trap
    print(f"resumed from step {restored[0]} in {manager.directory}" if restored is not None
          else f"starting fresh: no checkpoint in {manager.directory}", flush=True)
  if restored is not None:
    start_step, state = restored
  else:
    start_step = 0
    state = create_train_state(model_cfg, tx, config.seed, state_shardings)
    if config.get("init_from"):
      params = checkpoint.load_params(config.init_from, abstract_unboxed["params"])
      state = {**state, "params": params, "opt_state": jax.jit(tx.init, out_shardings=state_shardings["opt_state"])(params)}
  with sharding.activate(mesh, rules):
    train_step = jax.jit(make_train_step(model_cfg, config, tx, tokenizer.mask_id),
                         in_shardings=(state_shardings, batch_sharding),
                         out_shardings=(state_shardings, None), donate_argnums=(0,))
    eval_step = jax.jit(make_eval_step(model_cfg, config, tokenizer.mask_id),
                        in_shardings=(state_shardings["params"], batch_sharding))
    to_device = functools.partial(data.to_global_array, sharding=batch_sharding)

    writer = MetricsWriter(workdir, enabled=is_main, keep_through=start_step if restored is not None else -1)
    stop = _StopFlag()
    previous_handler = signal.signal(signal.SIGTERM, stop)
    first_eval = evaluate(eval_step, state["params"], eval_batches, to_device) if start_step == 0 else None
    if first_eval is not None:
      writer.write(0, first_eval)
      _print_eval("initial", 0, first_eval, is_main)
    tokens_per_step = config.train.batch_size * config.train.seq_len
    bar = tqdm(total=config.train.steps, initial=start_step, disable=not is_main, desc="train", unit="step")
    last_eval, last_loss, step, t0 = None, None, start_step, time.perf_counter()
    checkpoint_every = steps_of(config.train.checkpoint_every, config.train.steps)
    saved_step, last_save = None, time.monotonic()
    try:
      for step in range(start_step + 1, config.train.steps + 1):
        tokens = to_device(next(train_iter)["tokens"])
        state, metrics = train_step(state, tokens)
        if step % config.train.log_every == 0 or step == config.train.steps:
          metrics = jax.device_get(metrics)
          last_loss = float(metrics["loss"])
          dt = time.perf_counter() - t0
          rate = tokens_per_step * config.train.log_every / max(dt, 1e-9)
          writer.write(step, {**metrics, "tokens_per_s": rate})
          bar.set_postfix(loss=f"{float(metrics['loss']):.3f}", tok_s=f"{rate:,.0f}")
          t0 = time.perf_counter()
        bar.update(1)
        if step % config.train.eval_every == 0 or step == config.train.steps:
          last_eval = evaluate(eval_step, state["params"], eval_batches, to_device)
          writer.write(step, last_eval)
        if ((step % checkpoint_every == 0 or step == config.train.steps
             or _wall_clock_due(last_save, config.train.checkpoint_every_s, step, config.train.log_every))
            and checkpoint.save(manager, step, state, train_iter, config)):
          saved_step, last_save = step, time.monotonic()
          if is_main:
            bar.write(f"saved checkpoint at step {step}")
        if _stop_everywhere(stop, step, config.train.log_every):
          if saved_step != step:  # orbax refuses a second save of one step
            checkpoint.save(manager, step, state, train_iter, config, force=True)
          manager.wait_until_finished()
          print(f"Stopped by signal at step {step}; checkpoint saved in {workdir}")
          break
    finally:
      bar.close()
      manager.wait_until_finished()
      signal.signal(signal.SIGTERM, previous_handler)
      writer.close()
  if last_eval is not None:
    _print_eval("final", step, last_eval, is_main)
  if last_loss is not None and jax.process_count() > 1:  # every process: they must agree
    print(f"process {jax.process_index()}/{jax.process_count()}: step {step} train loss {last_loss:.9g}", flush=True)
  return {"first_eval": first_eval, "last_eval": last_eval, "step": step, "state": state}


def _print_eval(label: str, step: int, ev: dict[str, float], is_main: bool) -> None:
  if not is_main:
    return
  line = f"{label} validation (step {step}): AR loss {ev['eval_ar_loss']:.4f} (ppl {ev['eval_ar_perplexity']:.1f})"
  if "eval_diffusion_loss" in ev:
    line += f", diffusion loss {ev['eval_diffusion_loss']:.4f}"
  print(line, flush=True)


def define_flags() -> None:
  """The CLI's flags, defined when run as a program: not at import, because benchmarks.reproduce and
  the tests import this module, and ml_collections reads --config.* overrides from sys.argv as soon
  as the flag is defined."""
  from tidar_jax import cli

  cli.define_config_file("config", "configs/tiny.py", "Training config (a Python file with get_config()).")
  flags.DEFINE_string("workdir", "runs/tiny", "Checkpoints, metrics.jsonl, TensorBoard events and the tokenizer.")
  flags.DEFINE_bool("dry_run", False, "Print params, per-device memory and shardings; allocate nothing.")
  flags.DEFINE_string("dry_run_mesh", "", "With --dry_run: data,fsdp,tensor sizes of a mesh to size (e.g. "
                      "1,64,1), which may exceed the current devices.")
  flags.DEFINE_string("coordinator_address", "", "host:port of process 0 for multi-process runs.")
  flags.DEFINE_integer("num_processes", 0, "Number of processes in a multi-process run.")
  flags.DEFINE_integer("process_id", -1, "This process's index in a multi-process run.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; config fields go in --config.SECTION.FIELD=VALUE")
  from tidar_jax import distributed

  f = flags.FLAGS
  distributed.maybe_initialize(f.coordinator_address, f.num_processes, f.process_id)
  if f.dry_run:
    from tidar_jax import dry_run

    dry_run.report(f.config, dry_run.parse_mesh(f.dry_run_mesh))
    return
  train_and_evaluate(f.config, f.workdir)


if __name__ == "__main__":
  from tidar_jax import cli

  define_flags()
  cli.run(main)
