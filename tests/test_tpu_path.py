"""The decoders on a TPU backend (jax.default_backend() reporting "tpu"): every platform choice takes
its non-GPU branch, no Pallas Triton kernel is traced, and greedy AR and TiDAR decoding with
attention="auto" give the tokens of the uncached model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_decode_ar import (CFG, GREEDY, MASK_ID, PROMPT_LENGTHS, greedy_by_full_forward, random_params,
                            random_prompts)
from tidar_jax import attention, masks
from tidar_jax.decode import engine, gemv, loop, multi_token_attention, one_token_attention, split_kv_attention
from tidar_jax.decode.ar import generate_ar
from tidar_jax.decode.tidar import generate_tidar

pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture
def on_tpu(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")

  def never(*args, **kwargs):
    raise AssertionError("a GPU Pallas kernel was traced on the TPU path")

  for module, name in ((split_kv_attention, "step_attention"), (one_token_attention, "attend"),
                       (multi_token_attention, "attend"), (gemv, "gemv")):
    monkeypatch.setattr(module, name, never)


def test_platform_choices_on_tpu(on_tpu):
  step_mask = masks.decode_step_mask(8)
  assert attention.auto_implementation(jnp.bfloat16) == "splash"  # the training attention
  assert engine.attention_kernel("auto", jnp.bfloat16, step_mask, 2048, 1) == "dense"
  assert engine.attention_kernel("splash", jnp.bfloat16, step_mask, 2048, 1) == "dense"
  assert not gemv.use() and not loop.use_gpu_compiler_options() and loop.cache_slots(130) == 130


def test_platform_choices_on_gpu_differ(monkeypatch):
  """The negative control: the same calls on a "gpu" backend take the kernels."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  step_mask = masks.decode_step_mask(8)
  assert engine.attention_kernel("auto", jnp.bfloat16, step_mask, 2048, 1) == "split_kv"
  assert gemv.use() and loop.cache_slots(130) == 256


def test_greedy_decoding_on_the_tpu_path(on_tpu):
  """fp32 weights and compute here (the comparison is exact), attention="auto" as a TPU config has it."""
  cfg = dataclasses.replace(CFG, attention="auto")
  params = random_params(cfg, seed=0, std=0.3)
  prompts = random_prompts(1, PROMPT_LENGTHS, cfg.vocab_size)
  expected = greedy_by_full_forward(params, prompts, PROMPT_LENGTHS, 9)
  ar = generate_ar(params, cfg, prompts, PROMPT_LENGTHS, max_new_tokens=9, sampling=GREEDY,
                   key=jax.random.key(0), eos_id=None)
  tidar = generate_tidar(params, cfg, prompts, PROMPT_LENGTHS, max_new_tokens=9, sampling=GREEDY,
                         key=jax.random.key(0), eos_id=None, mask_id=MASK_ID, block_size=4)
  np.testing.assert_array_equal(ar.tokens, expected)
  np.testing.assert_array_equal(tidar.tokens, expected)
