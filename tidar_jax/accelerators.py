"""The accelerators the framework knows by name: platform, memory and dense bf16 peak. The trainer
and benchmarks quote MFU against the peak of the device jax reports; the dry run sizes a step for a
named device (`--dry_run_device`) without one attached.

Peaks are the vendors' dense bf16 tensor-core datasheet figures (TFLOP/s, without sparsity); memory
is per device in GiB as the dry run budgets it.
"""

from __future__ import annotations

import re
from typing import NamedTuple


class Accelerator(NamedTuple):
  name: str  # as `--dry_run_device` takes it
  kind: str  # how jax's device_kind names it, matched as a whole word, case-insensitive
  platform: str  # "gpu" or "tpu"
  memory_gib: float
  bf16_tflops: float


# Most specific kind first (a PCIe variant before the bare name): the first match wins.
ACCELERATORS: tuple[Accelerator, ...] = (
    Accelerator("h100-pcie", "H100 PCIe", "gpu", 80.0, 756.0),
    Accelerator("h100", "H100", "gpu", 80.0, 989.0),
    Accelerator("h200", "H200", "gpu", 140.0, 989.0),  # the SXM part's tensor cores
    Accelerator("gh200", "GH200", "gpu", 96.0, 989.0),
    Accelerator("b200", "B200", "gpu", 180.0, 2250.0),
    Accelerator("a100", "A100", "gpu", 80.0, 312.0),
    Accelerator("tpu-v4", "TPU v4", "tpu", 32.0, 275.0),
    Accelerator("tpu-v5e", "TPU v5 lite", "tpu", 16.0, 197.0),
    Accelerator("tpu-v5p", "TPU v5p", "tpu", 95.0, 459.0),
    Accelerator("tpu-v6e", "TPU v6 lite", "tpu", 32.0, 918.0),
)
BY_NAME = {a.name: a for a in ACCELERATORS}


def of_kind(device_kind: str) -> Accelerator | None:
  """The entry for a device_kind such as "NVIDIA H200", or None when the table does not know it."""
  kind = device_kind.upper()
  for a in ACCELERATORS:
    if re.search(rf"(^|\W){re.escape(a.kind.upper())}(\W|$)", kind):
      return a
  return None


def bf16_peak_tflops(device_kind: str) -> float | None:
  """The datasheet bf16 peak of a device_kind, or None for an unknown device (then no MFU is
  reported, rather than one against another chip)."""
  a = of_kind(device_kind)
  return None if a is None else a.bf16_tflops
