"""The accelerator table: device kinds as jax reports them map to their datasheet peaks (or to none,
so no MFU is quoted against another chip), and every named device is one the dry run can size."""

import pytest

from tidar_jax import accelerators, dry_run


@pytest.mark.parametrize("kind, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
    ("NVIDIA GH200 480GB", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("TPU v5 lite", 197.0),
    ("TPU v5p", 459.0), ("cpu", None), ("NVIDIA H20", None)])
def test_bf16_peak_by_device_kind(kind, peak):
  assert accelerators.bf16_peak_tflops(kind) == peak


def test_every_named_device_is_a_dry_run_target():
  for a in accelerators.ACCELERATORS:
    assert dry_run.target_device(a.name) == (a.name, a.platform, a.memory_gib)
    assert accelerators.of_kind(f"NVIDIA {a.kind}" if a.platform == "gpu" else a.kind) == a
