"""How one optimizer step's global batch is split: devices x micro-batch x accumulation steps.

The config states the recipe (`train.batch_size`, the global batch) and how much of it one device
runs at once (`train.micro_batch_per_device`); the accumulation count follows:

    grad_accum = batch_size / (data x fsdp devices) / micro_batch_per_device

`micro_batch_per_device="auto"` takes the largest divisor of the per-device batch whose compiled
train step fits the device's memory (`memory_fit.choose_micro_batch`). An explicit `grad_accum`
still works when the micro-batch is left unset (None); when both are given they must agree.
"""

from __future__ import annotations

import dataclasses
from typing import Any

AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class BatchPlan:
  global_batch: int  # sequences per optimizer step
  seq_len: int  # clean tokens per sequence
  batch_devices: int  # data x fsdp: the devices the batch is split over
  micro_batch: int  # sequences per device per forward/backward
  grad_accum: int  # forward/backward passes per optimizer step
  source: str  # how the micro-batch was chosen (for the log line)

  @property
  def per_device_batch(self) -> int:
    return self.global_batch // self.batch_devices

  def describe(self) -> str:
    """'global 512 x 4096 = 8 devices x micro 2 x accum 32 (train.micro_batch_per_device=auto ...)'"""
    devices = f"{self.batch_devices} device{'s' if self.batch_devices != 1 else ''}"
    return (f"global {self.global_batch} x {self.seq_len} = {devices} x micro {self.micro_batch} x accum "
            f"{self.grad_accum} ({self.source})")


def divisors_desc(n: int) -> list[int]:
  """Every divisor of n, largest first: the micro-batches that split a per-device batch evenly."""
  return [d for d in range(n, 0, -1) if n % d == 0]


def requested_micro_batch(train_cfg: Any) -> int | str | None:
  """`train.micro_batch_per_device` as given: a positive int, "auto" or None (checked)."""
  value = train_cfg.get("micro_batch_per_device")
  if isinstance(value, str) and value.strip().lower() == AUTO:
    return AUTO
  if isinstance(value, str) and value.strip().isdigit():  # a CLI override of a string field
    value = int(value)
  if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
    return value
  raise ValueError(f"train.micro_batch_per_device={value!r}: use a positive integer, \"auto\" (the largest "
                   "that fits the device's memory) or None (per-device batch / train.grad_accum)")


def plan(train_cfg: Any, batch_devices: int, micro_batch: int | None = None, source: str = "") -> BatchPlan:
  """The split of `train.batch_size` over `batch_devices` (data x fsdp) devices.

  micro_batch: the micro-batch to use when the config says "auto" (chosen by the caller, which can
  compile and measure); ignored otherwise. Raises ValueError naming the fields on any contradiction.
  """
  batch, accum = train_cfg.batch_size, train_cfg.get("grad_accum", 0) or 0
  if batch % batch_devices:
    raise ValueError(f"train.batch_size={batch} is not divisible by the {batch_devices} data x fsdp devices: "
                     f"use a multiple of {batch_devices}")
  per_device = batch // batch_devices
  requested = requested_micro_batch(train_cfg)
  where = f"train.batch_size={batch} over {batch_devices} data x fsdp device(s) = {per_device} per device"
  if requested == AUTO:
    if accum:
      raise ValueError(f"train.grad_accum={accum} and train.micro_batch_per_device=auto contradict each other: "
                       "set train.grad_accum=0 (derived) or give the micro-batch as a number")
    if micro_batch is None:
      raise ValueError("train.micro_batch_per_device=auto needs a measured micro-batch (memory_fit)")
    requested, source = micro_batch, source or "train.micro_batch_per_device=auto"
  if requested is None:
    given = (f"train.grad_accum={accum}" if accum
             else "the whole per-device batch at once: no micro-batch or grad_accum set")
    accum = accum or 1
    if per_device % accum:
      raise ValueError(f"train.grad_accum={accum} does not divide the per-device batch ({where}): use a divisor "
                       f"of {per_device}, or set train.micro_batch_per_device instead")
    return BatchPlan(batch, train_cfg.seq_len, batch_devices, per_device // accum, accum, source or given)
  if per_device % requested:
    raise ValueError(f"train.micro_batch_per_device={requested} does not divide the per-device batch ({where}): "
                     f"use one of {divisors_desc(per_device)}")
  derived = per_device // requested
  if accum and accum != derived:
    raise ValueError(f"train.grad_accum={accum} contradicts train.micro_batch_per_device={requested} ({where} -> "
                     f"accum {derived}): set train.grad_accum=0 to derive it")
  return BatchPlan(batch, train_cfg.seq_len, batch_devices, requested, derived,
                   source or f"train.micro_batch_per_device={requested}")
