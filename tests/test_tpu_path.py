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
from tidar_jax import dispatch
from tidar_jax.kernels import int8_gemv, multi_token_attention, one_token_attention, small_row_gemm, split_kv_attention
from tidar_jax.decode.ar import generate_ar
from tidar_jax.decode.tidar import generate_tidar

pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture
def on_tpu(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")

  def never(*args, **kwargs):
    raise AssertionError("a GPU Pallas kernel was traced on the TPU path")

  for module, name in ((split_kv_attention, "step_attention"), (one_token_attention, "attend"),
                       (multi_token_attention, "attend"), (int8_gemv, "gemv"),
                       (small_row_gemm, "gemm")):
    monkeypatch.setattr(module, name, never)


def test_platform_choices_on_tpu(on_tpu):
  assert dispatch.training_attention(jnp.bfloat16) == "splash"
  assert dispatch.decode_attention("auto", jnp.bfloat16, 72, 2048, 1) == "dense"
  assert dispatch.decode_attention("splash", jnp.bfloat16, 72, 2048, 1) == "dense"
  assert not dispatch.int8_gemv(1) and not dispatch.use_gpu_compiler_options() and dispatch.cache_slots(130) == 130


def test_platform_choices_on_gpu_differ(monkeypatch):
  """The negative control: the same calls on a "gpu" backend take the kernels."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert dispatch.training_attention(jnp.bfloat16) == "cudnn"
  assert dispatch.decode_attention("auto", jnp.bfloat16, 72, 2048, 1) == "split_kv"
  assert dispatch.int8_gemv(1) and not dispatch.int8_gemv(2) and dispatch.cache_slots(130) == 256


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
