"""Model FLOPs and the devices' bf16 peaks: what MFU is measured against (trainer and benchmarks).

MFU = model FLOPs (6 x matmul params x tokens through the model, LM head included, + the attention
score and value products over the (query, key) pairs the mask allows; no remat recompute) / time /
the device's dense bf16 datasheet peak.
"""

from __future__ import annotations

import re

from tidar_jax.config import ModelConfig

# Dense bf16 tensor-core peaks from the vendors' datasheets (TFLOP/s, without sparsity), matched
# against the device_kind jax reports, most specific name first (a PCIe variant before the bare
# name). MFU is quoted against the device's own peak. The H200 and GH200 have the tensor cores of the
# SXM part before them.
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("B200", 2250.0),
    ("A100", 312.0), ("TPU v4", 275.0), ("TPU v5 lite", 197.0), ("TPU v5p", 459.0), ("TPU v6 lite", 918.0),
)


def bf16_peak_tflops(device_kind: str) -> float | None:
  """The datasheet bf16 peak of a device_kind such as "NVIDIA H200", or None when the
  table does not know the device (then no MFU is reported, rather than one against another chip)."""
  kind = device_kind.upper()
  for name, tflops in BF16_PEAK_TFLOPS:
    if re.search(rf"(^|\W){re.escape(name.upper())}(\W|$)", kind):
      return tflops
  return None


def count_params(cfg: ModelConfig) -> dict[str, int]:
  """Parameter counts from the shape alone: total, per-token matmul weights (layers + LM head)."""
  d, H, Hkv, D, F, L, V = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim,
                           cfg.num_layers, cfg.vocab_size)
  layer_matmul = d * H * D + 2 * d * Hkv * D + H * D * d + 3 * d * F
  layer_other = 2 * d + (H * D + 2 * Hkv * D if cfg.qkv_bias else 0) + (2 * D if cfg.qk_norm else 0)
  embed = V * d
  head = 0 if cfg.tie_embeddings else V * d
  return {
      "total": L * (layer_matmul + layer_other) + embed + head + d,
      "layer_matmul": L * layer_matmul,  # per token through the layers
      "lm_head": V * d,  # per row the LM head runs on
      "embedding_table": embed,
  }


def train_step_flops(cfg: ModelConfig, batch: int, seq_len: int, objective: str, block_size: int) -> dict[str, float]:
  """Model FLOPs of one training step (forward + backward = 3x forward), no remat recompute.

  Tokens through the model: L (AR) or 2L (TiDAR, clean + mask halves); the LM head runs on all of
  them. Attention counts the (query, key) pairs the mask allows (causal: L(L+1)/2)."""
  from tidar_jax import masks
  c = count_params(cfg)
  if objective == "ar":
    tokens, pairs = seq_len, seq_len * (seq_len + 1) // 2
  else:
    tokens, pairs = 2 * seq_len, int(masks.training_mask(seq_len, block_size).sum())
  dense = 6.0 * (c["layer_matmul"] + c["lm_head"]) * tokens * batch
  attn = 3.0 * 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * pairs * batch
  return {"dense": dense, "attention": attn, "total": dense + attn, "model_tokens": tokens * batch}
