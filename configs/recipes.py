"""Model shapes and training recipes that configs combine (each a dict of fields to set).

A config is `base.get_config()` with a shape written into `c.model` and a recipe into the other
sections, so the 1p5b and 8b configs differ only in what really differs between them.
"""

from ml_collections import ConfigDict

# Qwen2.5-1.5B: <|mask|> takes an unused row of the padded 151936-id vocab (151665 real tokens).
QWEN2P5_1P5B = dict(vocab_size=151936, d_model=1536, num_layers=28, num_heads=12, num_kv_heads=2, head_dim=128,
                    mlp_dim=8960, qkv_bias=True, qk_norm=False, tie_embeddings=True, rope_theta=1e6)
# Qwen3-8B: qk-norm, untied LM head, the same padded vocab.
QWEN3_8B = dict(vocab_size=151936, d_model=4096, num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
                mlp_dim=12288, qkv_bias=False, qk_norm=True, tie_embeddings=False, rope_theta=1e6)
# SmolLM2-135M (llama): tied embeddings; 49152 ids + <|mask|> and the converter's added special token,
# padded to a multiple of 64 rows for the LM head's matmul. norm_eps is the GGUF's float32 1e-5.
SMOLLM2_135M = dict(vocab_size=49216, d_model=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                    mlp_dim=1536, qkv_bias=False, qk_norm=False, tie_embeddings=True, rope_theta=100000.0,
                    norm_eps=9.999999747378752e-06)

# bf16 compute on fp32 master weights, layers scanned, "auto" attention (cuDNN flash on a GPU,
# splash on a TPU): what every accelerator config uses.
ACCELERATOR = dict(dtype="bfloat16", param_dtype="float32", scan_layers=True, attention="auto", norm_eps=1e-6)

PAPER_BATCH_TOKENS = 512 * 4096  # the paper's global batch: 2M tokens per step


def paper_recipe(c: ConfigDict, *, tokens: float, block_size: int) -> ConfigDict:
  """The paper's continual pretraining (docs/method.md §3): seq 4096, 2M-token global batches,
  cosine LR 1e-5 -> 3e-6 after a 1% warmup, alpha = 1, full masking; `tokens` trained in all.
  Micro-batches are sized to the device ("auto") and params/optimizer sharded over every device."""
  c.tidar.update(block_size=block_size, loss_alpha=1.0)
  c.data.update(dataset="local_code", tokenizer="")  # your tfds dataset; the converted checkpoint dir
  c.train.update(seq_len=4096, batch_size=512, micro_batch_per_device="auto", steps=round(tokens / PAPER_BATCH_TOKENS),
                 learning_rate=1e-5, min_learning_rate=3e-6, warmup_steps=0.01, weight_decay=0.0, grad_clip=1.0,
                 log_every=10, eval_every=1000, eval_batches=16, checkpoint_every=1000)
  c.mesh.update(data=1, fsdp=-1, tensor=1)  # ZeRO-3 style: every device holds a slice of everything
  return c
