"""TiDAR 8B: the Qwen3-8B shape, block size 16, gradient checkpointing (docs/method.md §3).

    python -m tidar_jax.train --config=configs/8b.py --dry_run
"""

from ml_collections import ConfigDict

from configs import tiny


def get_config() -> ConfigDict:
  c = tiny.get_config()
  m = c.model
  m.vocab_size = 151936  # Qwen3's padded vocab; <|mask|> takes an unused padded row
  m.d_model = 4096
  m.num_layers = 36
  m.num_heads = 32
  m.num_kv_heads = 8
  m.head_dim = 128
  m.mlp_dim = 12288
  m.qkv_bias = False
  m.qk_norm = True
  m.tie_embeddings = False
  m.rope_theta = 1e6
  m.norm_eps = 1e-6
  m.dtype = "bfloat16"
  m.param_dtype = "float32"
  m.scan_layers = True
  m.remat = "full"  # the paper uses gradient checkpointing at 8B
  m.attention = "auto"

  c.tidar.block_size = 16
  c.tidar.loss_alpha = 1.0
  c.tidar.verify_beta = 0.0  # the paper's 8B decodes best trusting diffusion (beta = 0)

  c.data.dataset = "local_code"  # replace with your tfds dataset
  c.data.tokenizer = ""  # the converted checkpoint dir

  t = c.train
  t.seq_len = 4096
  t.batch_size = 512  # 2M tokens per step
  t.micro_batch_per_device = "auto"  # the largest that fits the device; grad_accum follows
  t.steps = 71526  # 150B tokens
  t.learning_rate = 1e-5
  t.min_learning_rate = 3e-6
  t.warmup_steps = 715
  t.weight_decay = 0.0
  t.grad_clip = 1.0
  t.eval_every = 1000
  t.eval_batches = 16
  t.checkpoint_every = 500

  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  return c
