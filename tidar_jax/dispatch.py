"""Every platform choice of the framework in one place: the attention a training step or a decode step
runs, whether a decode step's matmuls take a Pallas kernel (one int8 row, or a few bf16 rows), how a
decode cache is aligned, and the compiler options a decode compiles with. The kernels
(`tidar_jax.kernels`) only know how to run: compiled on their platform, interpreted elsewhere.

Every choice reads the backend when it is made (at trace time), never at import: a process may pick
its platform after importing tidar_jax, and the tests pretend to be a GPU or a TPU.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp

from tidar_jax.config import ModelConfig
from tidar_jax.kernels import support


def training_attention(dtype: Any, backend: str | None = None) -> str:
  """`attention="auto"` for training and the prefill: cuDNN on a GPU in 16-bit dtypes (its flash
  kernels), splash attention on a TPU (the TiDAR training attention; every other attention there is
  the dense einsum), else dense. backend: the platform to choose for (default: this process's; the
  dry run sizes other ones)."""
  backend = backend or jax.default_backend()
  if backend == "tpu":
    return "splash"
  return "cudnn" if backend == "gpu" and dtype in (jnp.bfloat16, jnp.float16) else "dense"


DECODE_KERNELS = ("dense", "cudnn", "split_kv")

# "auto" takes the split-KV kernel for steps of up to SPLIT_KV_MAX_ROWS tokens over the whole batch:
# it beats cuDNN where cuDNN's (batch x heads x query tiles) grid leaves SMs idle and, with the
# fused attention block around it, up to the largest step timed (batch 8 x k=16's 8 x 272 rows).
SPLIT_KV_MAX_ROWS = 2176


def decode_attention(setting: str, dtype: Any, tokens: int, max_len: int, batch: int) -> str:
  """cfg.attention -> a decode step's attention over its cache (one of DECODE_KERNELS). "auto" is, on
  a GPU in 16-bit dtypes, the split-KV kernel where it applies (max_len % 16 == 0) and pays (batch x
  tokens <= SPLIT_KV_MAX_ROWS), cuDNN otherwise; elsewhere the dense einsum (cuDNN and Triton have
  no CPU kernels; on a TPU the einsum is XLA's own)."""
  if setting == "auto":
    if training_attention(dtype) != "cudnn":
      return "dense"
    if batch * tokens <= SPLIT_KV_MAX_ROWS and support.split_kv(max_len):
      return "split_kv"
    return "cudnn"
  return "cudnn" if setting == "cudnn" and jax.default_backend() == "gpu" else "dense"


def fused_attention(cfg: ModelConfig, tokens: int, max_len: int) -> bool:
  """Whether a step on the split-KV path runs its whole attention block in Pallas (`engine`'s
  `fused_attention`): `one_token_attention` at one token, `multi_token_attention` at more."""
  if tokens == 1:
    return support.one_token(cfg.head_dim, cfg.num_heads // cfg.num_kv_heads, max_len)
  return support.multi_token(cfg.head_dim, max_len)


def int8_gemv(rows: int) -> bool:
  """Whether an int8 matmul of `rows` rows takes `kernels.int8_gemv`: one row, compiled on a GPU
  (XLA's int8 row reduction streams at about half its bf16 byte rate). Elsewhere XLA's product is
  faster than the interpreted kernel (tests switch it on to check it in the step)."""
  return rows == 1 and jax.default_backend() == "gpu"


# Steps of 2..SMALL_ROW_GEMM_MAX_ROWS rows over the whole batch take `kernels.small_row_gemm` on a GPU.
# 0 (none) until `benchmarks/step_matmuls` measures it faster than XLA's GEMM at those rows on the
# device: XLA's product is the reference and the fallback.
SMALL_ROW_GEMM_MAX_ROWS = 0


def small_row_gemm(rows: int) -> bool:
  """Whether a matmul of `rows` rows against a weight of the input's dtype takes
  `kernels.small_row_gemm`: compiled on a GPU, for a pruned TiDAR step's few rows (one row has its own
  paths). Elsewhere XLA's product is faster than the interpreted kernel (tests switch it on)."""
  return 1 < rows <= SMALL_ROW_GEMM_MAX_ROWS and jax.default_backend() == "gpu"


# On a GPU the cache is allocated with max_len rounded up to a multiple of this many slots, so the
# split-KV step attention's 64-slot key blocks tile it (at 16-slot blocks it is several times
# slower); slots past max_len are never written or read.
CACHE_ALIGN = 128


def cache_slots(max_len: int) -> int:
  """Slots to allocate for a cache of `max_len`: rounded up to CACHE_ALIGN on a GPU, where "auto"
  attention takes the split-KV kernel; elsewhere exactly max_len, since the dense attention reads
  every slot (padding a CPU test's 17-slot cache to 128 made its decoding 2.5x slower). Either way
  the tokens are the same: slots past max_len are never written or read."""
  if jax.default_backend() != "gpu":
    return max_len
  return -(-max_len // CACHE_ALIGN) * CACHE_ALIGN


# On a GPU, XLA records the whole decode loop -- the while loop and its body -- as one CUDA graph
# (a conditional WHILE node), instead of launching the body's kernels and graphs from the host on
# every step: same tokens, less host time per step. The first six types are XLA's default list.
GPU_COMPILER_OPTIONS = {
    "xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,WHILE,CONDITIONAL",
    "xla_gpu_graph_min_graph_size": 1,  # the default (5) leaves short stretches of the body out of the graph
}


def use_gpu_compiler_options() -> bool:
  """Whether decodes compile with GPU_COMPILER_OPTIONS: on a GPU backend, unless the user's XLA_FLAGS
  set one of those options themselves (theirs win)."""
  flags = os.environ.get("XLA_FLAGS", "")
  return jax.default_backend() == "gpu" and not any(name in flags for name in GPU_COMPILER_OPTIONS)
