"""The platform choices (`tidar_jax.dispatch`): which attention a decode step runs where, the
cache's alignment and the Pallas matmuls' use. The decoders' tests show the choices give the same tokens
(tests/test_decode_ar.py, tests/test_tpu_path.py)."""

import functools

import jax
import jax.numpy as jnp

from tidar_jax import dispatch


def test_auto_attention_choice_on_a_gpu(monkeypatch):
  """What attention="auto" picks where cuDNN is available (a rule timed on the GPU):
  split-KV for up to SPLIT_KV_MAX_ROWS step tokens over the batch (AR and TiDAR steps up to batch
  8 x k=16), cuDNN above that and where the kernel does not apply; the dense einsum off the GPU."""
  ar, k8, k16 = 1, 72, 272  # step tokens
  on_gpu = jax.default_backend() == "gpu"  # the suite also runs on a GPU machine
  assert dispatch.decode_attention("auto", jnp.bfloat16, k16, 2304, 1) == ("split_kv" if on_gpu else "dense")
  assert dispatch.decode_attention("auto", jnp.float32, k16, 2304, 1) == "dense"  # fp32: no cuDNN flash kernel
  monkeypatch.setattr(dispatch, "training_attention", lambda dtype: "cudnn")
  pick = functools.partial(dispatch.decode_attention, "auto", jnp.bfloat16)
  assert pick(ar, 2304, 1) == "split_kv" and pick(ar, 2304, 8) == "split_kv"
  assert pick(k8, 2304, 1) == "split_kv" and pick(k16, 2304, 1) == "split_kv"
  assert pick(k8, 2304, 8) == "split_kv" and pick(k16, 2304, 8) == "split_kv"  # up to 8 x 272 step tokens
  assert pick(k16, 2304, 9) == "cudnn"  # 2448 step tokens: past the largest step measured
  assert pick(k16, 2300, 1) == "cudnn"  # no key block tiles 2300 slots
  # cudnn asked: taken on a GPU only
  assert dispatch.decode_attention("cudnn", jnp.bfloat16, k16, 2304, 1) == ("cudnn" if on_gpu else "dense")


def test_cache_alignment_and_gemv_use_follow_the_backend(monkeypatch):
  for backend, slots, gemv in (("cpu", 130, False), ("tpu", 130, False), ("gpu", 256, True)):
    monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
    assert dispatch.cache_slots(130) == slots and dispatch.cache_slots(256) == 256
    assert dispatch.int8_gemv(1) is gemv and not dispatch.int8_gemv(8)


def test_small_row_gemm_rule(monkeypatch):
  """The Pallas small-row GEMM takes a step's matmuls only on a GPU, for 2..SMALL_ROW_GEMM_MAX_ROWS
  rows (one row has its own paths), and none until it is measured faster (the constant's 0)."""
  def taken() -> list[int]:
    return [r for r in range(1, 200) if dispatch.small_row_gemm(r)]

  for limit in (dispatch.SMALL_ROW_GEMM_MAX_ROWS, 64):
    monkeypatch.setattr(dispatch, "SMALL_ROW_GEMM_MAX_ROWS", limit)
    for backend in ("cpu", "tpu", "gpu"):
      monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
      assert taken() == (list(range(2, limit + 1)) if backend == "gpu" else [])
