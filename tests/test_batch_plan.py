"""The batch plan: global batch = devices x micro-batch x accumulation, contradictions named; the auto
rule's search (compile counts, stepping down, refusal) on a stated memory law."""

import pytest
from ml_collections import ConfigDict

from tidar_jax import batch_plan, memory_fit


def train_cfg(batch=512, micro=None, accum=0, seq_len=4096):
  return ConfigDict({"batch_size": batch, "micro_batch_per_device": micro, "grad_accum": accum, "seq_len": seq_len})


def test_plan_from_micro_batch_or_grad_accum():
  p = batch_plan.plan(train_cfg(micro=2), batch_devices=8)
  assert (p.per_device_batch, p.micro_batch, p.grad_accum) == (64, 2, 32)
  assert p.describe() == "global 512 x 4096 = 8 devices x micro 2 x accum 32 (train.micro_batch_per_device=2)"
  p = batch_plan.plan(train_cfg(accum=4), batch_devices=8)
  assert (p.micro_batch, p.grad_accum) == (16, 4)
  p = batch_plan.plan(train_cfg(batch=8), batch_devices=1)  # neither given: the whole batch at once
  assert (p.micro_batch, p.grad_accum) == (8, 1) and "no micro-batch or grad_accum set" in p.source
  assert batch_plan.plan(train_cfg(accum=4), 8).source == "train.grad_accum=4"
  assert batch_plan.plan(train_cfg(micro=2, accum=32), 8).grad_accum == 32  # both, agreeing
  assert batch_plan.plan(train_cfg(micro="4"), 8).micro_batch == 4  # a CLI override of a string field
  p = batch_plan.plan(train_cfg(micro="auto"), 8, micro_batch=8, source="auto: measured")
  assert (p.micro_batch, p.grad_accum, p.source) == (8, 8, "auto: measured")


@pytest.mark.parametrize("kwargs, devices, message", [
    (dict(micro=3), 8, r"train.micro_batch_per_device=3 does not divide the per-device batch .* = 64 per device\): "
                       r"use one of \[64, 32, 16, 8, 4, 2, 1\]"),
    (dict(micro=2, accum=4), 8, r"train.grad_accum=4 contradicts train.micro_batch_per_device=2 .* accum 32\): "
                                r"set train.grad_accum=0"),
    (dict(micro="auto", accum=4), 8, r"train.grad_accum=4 and train.micro_batch_per_device=auto contradict"),
    (dict(accum=3), 8, r"train.grad_accum=3 does not divide the per-device batch"),
    (dict(batch=12), 8, r"train.batch_size=12 is not divisible by the 8 data x fsdp devices"),
    (dict(micro=-1), 8, r"train.micro_batch_per_device=-1: use a positive integer"),
])
def test_contradictions_are_one_line_errors(kwargs, devices, message):
  with pytest.raises(ValueError, match=message) as e:
    batch_plan.plan(train_cfg(**kwargs), devices)
  assert "\n" not in str(e.value)


def test_auto_search_takes_the_line_then_steps_down():
  """Memory 10 + 3m GiB up to m = 8, then superlinear: the line from m = 1, 2 says 16 fits a 60 GiB
  budget, the compiled 16 does not, so 8 is taken; 3 + 1 compiles, never m = 32 or 64."""
  law = {1: 13, 2: 16, 4: 22, 8: 34, 16: 70, 32: 200, 64: 500}
  measured = []

  def measure(m):
    measured.append(m)
    return law[m]

  assert memory_fit.choose_micro_batch(64, measure, budget=60) == (8, {1: 13, 2: 16, 16: 70, 8: 34})
  assert measured == [1, 2, 16, 8]
  assert memory_fit.choose_micro_batch(64, lambda m: law[m], budget=1000)[0] == 64
  assert memory_fit.choose_micro_batch(1, lambda m: law[m], budget=20) == (1, {1: 13})
  with pytest.raises(ValueError, match=r"even 1 sequence per device needs 13, over the 12 budget"):
    memory_fit.choose_micro_batch(64, lambda m: law[m], budget=12)
  # a step whose compile ran out of memory (NO_FIT) is over any budget, and the refusal says so
  assert memory_fit.choose_micro_batch(64, lambda m: memory_fit.NO_FIT if m >= 16 else law[m], budget=60)[0] == 8
  with pytest.raises(ValueError, match=r"needs more than the device \(compiling ran out of memory\), over"):
    memory_fit.choose_micro_batch(64, lambda m: memory_fit.NO_FIT, budget=12)
