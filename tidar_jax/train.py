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
import ml_collections
import numpy as np
from absl import app, flags
from tqdm import tqdm

from tidar_jax import accelerators, batch_plan, checkpoint, flops, memory_fit, sharding, train_step
from tidar_jax.config import DEFAULT_CHECKPOINT_EVERY_S, ModelConfig, steps_of, validate
from tidar_jax.metrics import MetricsWriter
from tidar_jax.optimizer import make_optimizer


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

  tx = make_optimizer(config.train)
  batch_sharding = sharding.batch_sharding(mesh)
  # Traced outside the mesh context: flax would otherwise attach sharding constraints while boxing.
  abstract = train_step.abstract_train_state(model_cfg, tx, config.seed)
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
    state = train_step.create_train_state(model_cfg, tx, config.seed, state_shardings)
    if config.get("init_from"):
      params = checkpoint.load_params(config.init_from, abstract_unboxed["params"])
      state = {**state, "params": params,
               "opt_state": jax.jit(tx.init, out_shardings=state_shardings["opt_state"])(params)}
  plan, step_fn, memory = plan_and_compile(config, model_cfg, tx, abstract, mesh, rules, tokenizer.mask_id)
  if is_main:
    print(f"batch plan: {plan.describe()}" + (f"; compiled step {memory.total / 2**30:.2f} GiB per device "
                                              "(XLA's estimate)" if memory else ""), flush=True)
  # A validation split shorter than one batch gives one batch of a multiple of devices x micro rows.
  eval_batches = [] if config.train.eval_batches == 0 else [b["tokens"] for b in data.make_eval_batches(
      eval_source, tokenizer, seq_len=config.train.seq_len,
      batch_size=config.train.batch_size, num_batches=config.train.eval_batches,
      process_index=jax.process_index(), process_count=jax.process_count(),
      row_multiple=plan.batch_devices * plan.micro_batch)]
  # each eval batch in micro-batches of the train step's size: evaluating fits wherever training does
  eval_accum = (len(eval_batches[0]) * jax.process_count() // (plan.batch_devices * plan.micro_batch)
                if eval_batches else plan.grad_accum)
  with sharding.activate(mesh, rules):
    eval_step = jax.jit(train_step.make_eval_step(model_cfg, config, tokenizer.mask_id, eval_accum),
                        in_shardings=(state_shardings["params"], batch_sharding))
    to_device = functools.partial(data.to_global_array, sharding=batch_sharding)

    writer = MetricsWriter(workdir, enabled=is_main, keep_through=start_step if restored is not None else -1)
    stop = _StopFlag()
    previous_handler = signal.signal(signal.SIGTERM, stop)
    first_eval = (evaluate(eval_step, state["params"], eval_batches, to_device)
                  if start_step == 0 and eval_batches else None)
    if first_eval is not None:
      writer.write(0, first_eval)
      _print_eval("initial", 0, first_eval, is_main)
    tokens_per_step = config.train.batch_size * config.train.seq_len
    speed = _Speedometer(model_cfg, config, jax.device_count())
    bar = tqdm(total=config.train.steps, initial=start_step, disable=not is_main, desc="train", unit="step")
    last_eval, last_loss, step, t0 = None, None, start_step, time.perf_counter()
    checkpoint_every = steps_of(config.train.checkpoint_every, config.train.steps)
    saved_step, last_save = None, time.monotonic()
    try:
      for step in range(start_step + 1, config.train.steps + 1):
        tokens = to_device(next(train_iter)["tokens"])
        state, metrics = step_fn(state, tokens)
        if step % config.train.log_every == 0 or step == config.train.steps:
          metrics = jax.device_get(metrics)
          last_loss = float(metrics["loss"])
          dt = time.perf_counter() - t0
          steps_done = step - max(start_step, step - config.train.log_every)
          rate = tokens_per_step * steps_done / max(dt, 1e-9)
          writer.write(step, {**metrics, "tokens_per_s": rate, **speed(dt / steps_done)})
          bar.set_postfix(loss=f"{float(metrics['loss']):.3f}", tok_s=f"{rate:,.0f}")
          t0 = time.perf_counter()
        bar.update(1)
        if eval_batches and (step % config.train.eval_every == 0 or step == config.train.steps):
          last_eval = evaluate(eval_step, state["params"], eval_batches, to_device)
          writer.write(step, last_eval)
        if ((step % checkpoint_every == 0 or step == config.train.steps
             or _wall_clock_due(last_save, config.train.get("checkpoint_every_s", DEFAULT_CHECKPOINT_EVERY_S), step,
                               config.train.log_every))
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
      train_iter.close()  # stops the input pipeline's prefetch thread
      manager.wait_until_finished()
      signal.signal(signal.SIGTERM, previous_handler)
      writer.close()
  if last_eval is not None:
    _print_eval("final", step, last_eval, is_main)
  if last_loss is not None and jax.process_count() > 1:  # every process: they must agree
    print(f"process {jax.process_index()}/{jax.process_count()}: step {step} train loss {last_loss:.9g}", flush=True)
  return {"first_eval": first_eval, "last_eval": last_eval, "step": step, "state": state}


def plan_and_compile(config: ml_collections.ConfigDict, model_cfg: ModelConfig, tx: Any, abstract: Any, mesh: Any,
                     rules: Any, mask_id: int) -> tuple[batch_plan.BatchPlan, Any, memory_fit.StepMemory | None]:
  """The batch plan (micro-batch chosen by compiling when "auto") and the compiled step it runs."""
  devices = mesh.shape["data"] * mesh.shape["fsdp"]
  compile_at = functools.partial(memory_fit.compile_train_step, config, model_cfg, tx, abstract, mesh, rules,
                                 mask_id=mask_id)
  if batch_plan.requested_micro_batch(config.train) != batch_plan.AUTO:
    plan = batch_plan.plan(config.train, devices)
    return (plan, *compile_at(grad_accum=plan.grad_accum))
  per_device = config.train.batch_size // devices
  limit = memory_fit.device_memory_bytes()
  if limit is None:
    raise ValueError("train.micro_batch_per_device=auto: this device reports no memory size; give the "
                     "micro-batch as a number")
  budget = int(memory_fit.MARGIN * limit)
  compiled: dict[int, tuple[Any, memory_fit.StepMemory | None]] = {}

  def measure(m: int) -> int:
    result = memory_fit.fitting_compile(lambda: compile_at(grad_accum=per_device // m))
    if result is None:
      return memory_fit.NO_FIT
    compiled[m] = result
    mem = result[1]
    if mem is None:
      raise ValueError("train.micro_batch_per_device=auto: this backend reports no memory analysis; give the "
                       "micro-batch as a number")
    return mem.total

  micro, tried = memory_fit.choose_micro_batch(per_device, measure, budget, lambda b: f"{b / 2**30:.2f} GiB")
  source = (f"auto: the largest that fits {memory_fit.MARGIN:.0%} of {limit / 2**30:.1f} GiB; compiled at "
            + ", ".join(f"{m}: " + ("out of memory" if b >= memory_fit.NO_FIT else f"{b / 2**30:.1f} GiB")
                        for m, b in sorted(tried.items())))
  return (batch_plan.plan(config.train, devices, micro, source), *compiled[micro])


class _Speedometer:
  """Step time, MFU against the device's bf16 datasheet peak (when known) and peak device memory."""

  def __init__(self, model_cfg: ModelConfig, config: ml_collections.ConfigDict, num_devices: int):
    t = config.train
    self.flops = flops.train_step_flops(model_cfg, t.batch_size, t.seq_len, config.tidar.objective,
                                        config.tidar.block_size)["total"]
    peak = accelerators.bf16_peak_tflops(jax.devices()[0].device_kind)
    self.peak = None if peak is None else peak * 1e12 * num_devices

  def __call__(self, step_s: float) -> dict[str, float]:
    out = {"step_s": step_s, "model_tflops_per_device": self.flops / step_s / 1e12 / jax.device_count()}
    if self.peak:
      out["mfu"] = self.flops / step_s / self.peak
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    if all(p is not None for p in peaks):
      out["peak_memory_gib"] = max(peaks) / 2**30
    return out


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
  flags.DEFINE_bool("dry_run", False, "Print params, per-device memory, the batch plan, shardings and a verdict; "
                    "allocate nothing.")
  flags.DEFINE_string("dry_run_mesh", "", "With --dry_run: data,fsdp,tensor sizes of a mesh to size (e.g. "
                      "1,64,1), which may exceed the current devices.")
  flags.DEFINE_string("dry_run_device", None, "With --dry_run: the accelerator to size for (h100, h200, a100, b200, "
                      "tpu-v4, tpu-v5e, tpu-v5p, tpu-v6e): its attention kernel and memory; default: this "
                      "accelerator, else h100.")
  flags.DEFINE_float("dry_run_device_gb", None, "With --dry_run: memory per device in GiB (default: the device's; "
                     "for a named GPU, JAX's pool of it: XLA_PYTHON_CLIENT_MEM_FRACTION, 75% unless set).")
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

    dry_run.report(f.config, dry_run.parse_mesh(f.dry_run_mesh), device=f.dry_run_device,
                   device_gb=f.dry_run_device_gb)
    return
  train_and_evaluate(f.config, f.workdir)


if __name__ == "__main__":
  from tidar_jax import cli

  define_flags()
  cli.run(main)
