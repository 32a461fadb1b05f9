"""Model FLOPs: what MFU is measured with (trainer and benchmarks).

MFU = model FLOPs (6 x matmul params x tokens through the model, LM head included, + the attention
score and value products over the (query, key) pairs the mask allows; no remat recompute) / time /
the device's dense bf16 datasheet peak (`accelerators.bf16_peak_tflops`).
"""

from __future__ import annotations

from tidar_jax.config import ModelConfig

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
