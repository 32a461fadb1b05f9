"""Does a train step fit a device? XLA's own accounting of the compiled step, and the auto micro-batch.

A step's per-device memory is what its compiled program needs: arguments (params, optimizer state,
the token batch) + temporaries (activations kept for the backward, gradients, scratch) + outputs
that do not reuse a donated argument. `compile_train_step` lowers and compiles the real sharded
step against abstract arguments (nothing is allocated) and reads `memory_analysis()`; the trainer
runs the very program it measured, so measuring costs no extra compile for the chosen micro-batch.

`choose_micro_batch` ("auto"): compile at micro-batch 1 and at the next divisor, fit a line
(activations grow with the micro-batch, the rest does not), compile at the largest divisor the line
puts under the budget, and step down until a compiled step really fits. Three compiles, typically.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from tidar_jax import batch_plan, sharding, train_step
from tidar_jax.config import ModelConfig

GiB = 2**30
# Share of the device's memory a step may plan to use: the rest absorbs allocator fragmentation
# and what XLA's estimate does not see (cuDNN workspaces, NCCL buffers).
MARGIN = 0.9
NO_FIT = 1 << 62  # bytes: what a measure reports for a step whose compile ran out of device memory


@dataclasses.dataclass(frozen=True)
class StepMemory:
  """Per-device bytes of one compiled train step."""

  argument: int
  output: int
  alias: int  # outputs written into donated arguments (the state): counted once
  temp: int

  @property
  def total(self) -> int:
    return self.argument + self.output - self.alias + self.temp

  @classmethod
  def of(cls, compiled: Any) -> "StepMemory | None":
    try:
      ma = compiled.memory_analysis()
    except jax.errors.JaxRuntimeError:  # e.g. an executable without its buffer assignment
      return None
    if ma is None or not hasattr(ma, "temp_size_in_bytes"):
      return None
    return cls(int(ma.argument_size_in_bytes), int(ma.output_size_in_bytes), int(ma.alias_size_in_bytes),
               int(ma.temp_size_in_bytes))


def gpu_pool_fraction() -> float:
  """The share of a GPU's memory JAX's allocator may hand out: `XLA_PYTHON_CLIENT_MEM_FRACTION`
  (JAX's default 0.75), or all of it with `XLA_PYTHON_CLIENT_ALLOCATOR=platform`."""
  if os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR", "").lower() == "platform":
    return 1.0
  value = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75")
  try:
    fraction = float(value)
  except ValueError:
    fraction = -1.0
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"XLA_PYTHON_CLIENT_MEM_FRACTION={value!r}: use a fraction in (0, 1], e.g. 0.9")
  return fraction


def device_memory_bytes(device: jax.Device | None = None) -> int | None:
  """What the allocator of `device` may hand out (GPU/TPU: `bytes_limit`; CPU: host RAM per device)."""
  device = device or jax.local_devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001  (backends without allocator statistics)
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  if device.platform == "cpu":
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(jax.local_device_count(), 1)
  return None


def compile_train_step(config: Any, model_cfg: ModelConfig, tx: Any, abstract_state: Any, mesh: Any,
                       rules: Any, grad_accum: int, mask_id: int,
                       compiler_options: dict[str, Any] | None = None) -> tuple[Any, StepMemory | None]:
  """The sharded train step for the global batch `config.train.batch_size`, compiled (not run).

  abstract_state: boxed, from `train_step.abstract_train_state`. Returns (compiled step taking
  (state, tokens) and returning (state, metrics), its per-device memory or None if the backend
  reports none: `measured_compile`).
  """
  return measured_compile(functools.partial(_compile_train_step, config, model_cfg, tx, abstract_state, mesh,
                                            rules, grad_accum, mask_id, compiler_options))


def measured_compile(compile_fn: Callable[[], Any]) -> tuple[Any, StepMemory | None]:
  """(compile_fn(), its per-device memory or None if the backend reports none). compile_fn lowers and
  compiles afresh on each call: an executable the persistent compilation cache gave back without a
  memory analysis is compiled once more with the cache off, so that a fit can be measured."""
  compiled = compile_fn()
  memory = StepMemory.of(compiled)
  if memory is None and jax.config.jax_compilation_cache_dir and jax.config.jax_enable_compilation_cache:
    jax.config.update("jax_enable_compilation_cache", False)
    try:
      compiled = compile_fn()
    finally:
      jax.config.update("jax_enable_compilation_cache", True)
    memory = StepMemory.of(compiled)
  return compiled, memory


def _compile_train_step(config, model_cfg, tx, abstract_state, mesh, rules, grad_accum, mask_id, compiler_options):
  state_shardings = sharding.param_shardings(abstract_state, mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh)
  args = (jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       nn.unbox(abstract_state), state_shardings),
          jax.ShapeDtypeStruct((config.train.batch_size, config.train.seq_len), jnp.int32, sharding=batch_sharding))
  with sharding.activate(mesh, rules):
    step = jax.jit(train_step.make_train_step(model_cfg, config, tx, mask_id, grad_accum),
                   in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, None),
                   donate_argnums=(0,))
    lowered = step.lower(*args)
  return lowered.compile(compiler_options=compiler_options)


def fitting_compile(compile_fn: Callable[[], Any]) -> Any | None:
  """compile_fn()'s result, or None where compiling itself ran out of device memory: XLA's GPU
  autotuner allocates a kernel's operands to time it, so a step far past the pool (SmolLM2's 12 GiB
  logits chunk in a 10 GiB pool, on an H100) fails to compile before any memory analysis exists.
  A measure for `choose_micro_batch` reports such a step as NO_FIT; other errors raise."""
  try:
    return compile_fn()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return None


def choose_micro_batch(per_device_batch: int, measure: Callable[[int], int], budget: int,
                       describe: Callable[[int], str] = str) -> tuple[int, dict[int, int]]:
  """The largest divisor m of `per_device_batch` with measure(m) <= budget.

  measure(m): per-device bytes of the step at micro-batch m (a compile; NO_FIT where it ran out of
  memory compiling). Returns (m, every measurement made). Raises ValueError with the remedy when even
  m = 1 does not fit.
  """
  divisors = sorted(batch_plan.divisors_desc(per_device_batch))
  seen: dict[int, int] = {}

  def at(m: int) -> int:
    if m not in seen:
      seen[m] = measure(m)
    return seen[m]

  if at(1) > budget:
    raise ValueError(
        f"train.micro_batch_per_device=auto: even 1 sequence per device needs "
        f"{'more than the device (compiling ran out of memory)' if at(1) >= NO_FIT else describe(at(1))}, over the "
        f"{describe(budget)} budget ({MARGIN:.0%} of the device): shard the params and optimizer state over more "
        "devices (mesh.fsdp), split the model (mesh.tensor), recompute more in the backward (model.remat=full), "
        "or shorten train.seq_len")
  if len(divisors) == 1:
    return 1, seen
  m2 = divisors[1]
  slope = max((at(m2) - at(1)) / (m2 - 1), 1.0)
  line_pick = max(m for m in divisors if at(1) + slope * (m - 1) <= budget)  # 1 always qualifies
  # the line's pick first; step down while the compiled step is over (1 fits: checked above)
  return next(m for m in reversed(divisors) if m <= line_pick and at(m) <= budget), seen
